"""A whole task on one machine, each participant in its own process: the broker, the
ledger (:class:`fairbus_ledger_service.deployment.LocalLedger`), the provider and the users.

What ``fairbus demo``, the end-to-end tests and ``fairbus bench round`` run. The files
are the ones a deployment uses: the roster, 0600 key files, the broker, ledger and task
configurations (``task.toml``, read by ``fairbus provider`` and ``fairbus user``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fairbus.errors import FairbusError
from fairbus.training.attacks import Behaviour
from fairbus_ledger_service.deployment import (
    FAIRBUS_COMMAND,
    LocalLedger,
    stop_processes,
    toml_values,
)

CLI = list(FAIRBUS_COMMAND)
STANDBY = -1
"""The key of a standby provider's process in :attr:`LocalTask.processes`."""


def task_config_toml(
    broker: tuple[str, int],
    *,
    state: str = "state",
    top: Mapping[str, object] | None = None,
    training: Mapping[str, object] | None = None,
    provider: Mapping[str, object] | None = None,
) -> str:
    """The task's configuration (``fairbus provider/user --config``; see
    :class:`fairbus.runtime.config.RuntimeConfig`) for the roster and key files beside it:
    ``top`` adds top-level keys (``ledger_timeout``, ``collusion``), ``training`` and
    ``provider`` fill those tables. What ``fairbus init`` and :class:`LocalTask` write."""
    head = {"roster": "roster.toml", "keys": "keys", "state": state,
            "broker": f"{broker[0]}:{broker[1]}", **(top or {})}  # fmt: skip
    return (
        toml_values(head)
        + "\n[training]\n"
        + toml_values(training or {})
        + "\n[provider]\n"
        + toml_values(provider or {})
    )


class LocalTaskError(FairbusError):
    pass


@dataclass
class LocalTask:
    root: Path
    users: int = 9
    rounds: int = 3
    attacks: dict[int, Behaviour] = field(default_factory=dict)
    store: str = "sqlite"
    broker: str = "embedded"
    training: dict[str, object] = field(default_factory=lambda: {"local_epochs": 2})
    provider: dict[str, object] = field(default_factory=dict)
    task: str = "local-task"
    ledger: LocalLedger | None = None
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    provider_env: dict[str, str] = field(default_factory=dict)
    """Environment for the first provider process only (a failpoint)."""
    broker_persistence: bool = False
    """Mosquitto persists sessions and retained presence across a restart."""
    standby: bool = False
    """Providers elect the active one through the ledger's etcd (``store="etcd"``); a
    second provider process waits as a hot standby (:meth:`start_standby`)."""
    top: dict[str, object] = field(default_factory=dict)
    """More top-level keys of the task's configuration (``keying``, ``collusion``)."""
    defer_users: bool = False
    """The user processes wait for :meth:`start_users` (a standby to load first)."""
    metrics: dict[str, object] = field(default_factory=dict)
    """The task's ``[metrics]`` table (``provider_port``, ``user_port``); empty: none."""
    _providers: set[int] = field(default_factory=lambda: {0})
    """The keys in :attr:`processes` of provider processes (the first and any standby)."""
    ledger_metrics_ports: dict[int, int] = field(default_factory=dict)
    """Ledger node → its metrics port (:attr:`LocalLedger.metrics_ports`)."""

    @property
    def config(self) -> Path:
        return self.root / "task.toml"

    @property
    def provider_process(self) -> subprocess.Popen[bytes]:
        return self.processes[0]

    def __enter__(self) -> LocalTask:
        nodes = (101,) if self.store == "sqlite" else (101, 102, 103)
        self.ledger = LocalLedger(self.root, self.task, nodes, tuple(range(1, self.users + 1)),
                                  store=self.store, broker=self.broker,
                                  broker_persistence=self.broker_persistence,
                                  metrics_ports=self.ledger_metrics_ports)  # fmt: skip
        try:
            self.ledger.__enter__()
            self._write_config()
            self.start_provider(self.provider_env or None)
            if not self.defer_users:
                self.start_users()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self) -> None:
        assert self.ledger is not None
        provider: dict[str, object] = {
            "rounds": self.rounds, "join_timeout": 60, "phase_timeout": 30
        }  # fmt: skip
        if self.standby:
            provider["etcd"] = [f"{h}:{p}" for h, p in self.ledger.alive_endpoints()]
        self.config.write_text(
            task_config_toml(
                ("127.0.0.1", self.ledger.broker_port),
                top={"ledger_timeout": 2.0, **self.top},
                # every participant shares this machine's cores: one torch thread each
                training={"threads": 1, **self.training},
                provider={**provider, **self.provider},
            )
        )
        if self.metrics:
            with self.config.open("a", encoding="utf-8") as f:
                f.write("\n[metrics]\n" + toml_values(self.metrics))

    def _spawn(
        self, pid: int, argv: list[str], name: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        log_path = self.root / f"participant-{name or pid}.log"
        log = open(log_path, "ab")  # noqa: SIM115 — the child's
        environment = None if env is None else {**os.environ, **env}
        self.processes[pid] = subprocess.Popen(argv, stdout=log, stderr=log, env=environment)

    def start_provider(self, env: dict[str, str] | None = None) -> None:
        """``env``: more environment for it (a failpoint, :mod:`fairbus.runtime.failpoints`)."""
        self._spawn(0, [*CLI, "provider", "--config", str(self.config)], env=env)

    def start_standby(self, key: int = STANDBY, env: dict[str, str] | None = None) -> None:
        """A provider process waiting as a hot standby, kept as ``processes[key]`` (its
        log: ``participant-standby.log``, or ``participant-<key>-standby.log``); ``env``
        as for :meth:`start_provider`."""
        argv = [*CLI, "provider", "--standby", "--config", str(self.config)]
        self._spawn(key, argv, "standby" if key == STANDBY else f"{key}-standby", env=env)
        self._providers.add(key)

    def start_users(self) -> None:
        for user in range(1, self.users + 1):
            self.start_user(user)

    def start_user(self, user: int) -> None:
        attack = self.attacks.get(user, Behaviour.HONEST)
        argv = [*CLI, "user", "--id", str(user), "--config", str(self.config),
                "--attack", attack.value]  # fmt: skip
        self._spawn(user, argv)

    def kill(self, pid: int) -> None:
        """kill -9, as a crash would."""
        self.processes[pid].kill()
        self.processes[pid].wait()

    def rounds_done(self) -> list[dict[str, object]]:
        path = self.root / "state" / "provider" / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_for_round(self, n: int, timeout: float) -> list[dict[str, object]]:
        """Block until ``n`` rounds are recorded; :class:`LocalTaskError` on a timeout or
        a provider that exits before."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.rounds_done()
            if len(done) >= n:
                return done
            providers = [self.processes[k] for k in sorted(self._providers)]
            if all(p.poll() is not None for p in providers) and len(self.rounds_done()) < n:
                codes = [p.returncode for p in providers]
                raise LocalTaskError(
                    f"every provider process exited ({codes}) after {len(done)} rounds; "
                    f"see {self.root / 'participant-0.log'}"
                )
            time.sleep(0.2)
        raise LocalTaskError(f"{n} rounds not done within {timeout} s; see {self.root}")

    def stop(self) -> None:
        stop_processes(self.processes.values())
        if self.ledger is not None:
            self.ledger.stop()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
