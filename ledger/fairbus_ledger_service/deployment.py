"""A replicated ledger on one machine: Mosquitto, etcd members and ledger node processes,
all on loopback with free ports, each with its own files under one directory.

Used by the failover tests and ``fairbus bench ledger``; the same configuration files a
deployment would use are written (roster, key files 0600, one ledger TOML per node).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fairbus.errors import FairbusError
from fairbus.identity import Identity, new_broker_password
from fairbus.roster import Member, Role, Roster
from fairbus_broker.mosquitto import find_mosquitto
from fairbus_ledger_service.etcd_cluster import EtcdCluster, find_etcd, free_port
from fairbus_ledger_service.stores import EtcdStore

NODE_START_TIMEOUT = 60.0
FAIRBUS_COMMAND = (sys.executable, "-m", "fairbus_cli")
"""The ``fairbus`` command with this interpreter: how local deployments start a process."""


class DeploymentError(FairbusError):
    pass


def toml_values(values: Mapping[str, object]) -> str:
    """``key = value`` lines of a TOML table (strings, numbers, booleans, lists of them):
    how every configuration file of a provisioned task is written."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def provision_identities(
    root: Path,
    task: str,
    roles: Mapping[int, Role],
    *,
    names: Mapping[int, str] | None = None,
    broker_passwords: bool = True,
) -> dict[int, Identity]:
    """Fresh keys for every participant of ``roles`` and the task's roster.

    Writes ``root/keys/<id>.sign.key`` and ``<id>.box.key`` (and ``<id>.mqtt.key``, the
    broker password, unless ``broker_passwords`` is false), each from libsodium's CSPRNG
    with mode 0600 in a 0700 folder, and ``root/roster.toml`` with their public keys.
    Refuses to overwrite a key file. What ``fairbus init`` and :class:`LocalLedger` write.
    """
    names = names or {}
    identities = {pid: Identity.generate(pid) for pid in roles}
    roster = Roster(
        task,
        [Member(identities[pid].public, role, names.get(pid, "")) for pid, role in roles.items()],
    )
    keys = root / "keys"
    for pid, identity in identities.items():
        identity.save(keys)
        if broker_passwords:
            new_broker_password(keys, pid)
    (root / "roster.toml").write_text(roster.to_toml(), encoding="utf-8")
    return identities


def broker_config_toml(
    port: int, *, host: str = "127.0.0.1", data_dir: str = "broker", persistence: bool = True
) -> str:
    """A broker configuration (``fairbus broker --config``) for the roster and key files
    beside it; the other settings keep :class:`fairbus_broker.config.BrokerConfig`'s
    defaults."""
    return toml_values(
        {"roster": "roster.toml", "keys": "keys", "data_dir": data_dir, "host": host,
         "port": port, "persistence": persistence}
    )  # fmt: skip


def ledger_config_toml(
    *,
    store: str,
    data_dir: str,
    broker: tuple[str, int],
    etcd: Sequence[tuple[str, int]] = (),
) -> str:
    """A ledger node's configuration (``fairbus ledger --node N --config``) for the roster
    and key files beside it: an ``etcd`` store on those members, or a ``sqlite`` one, and
    this node's files (blobs, the SQLite store) under ``data_dir``."""
    where: dict[str, object] = (
        {"store": "etcd", "etcd": [f"{h}:{p}" for h, p in etcd]}
        if store == "etcd"
        else {"store": "sqlite", "sqlite": f"{data_dir}/ledger.sqlite"}
    )
    return toml_values(
        {"roster": "roster.toml", "keys": "keys", **where, "blobs": f"{data_dir}/blobs",
         "broker": f"{broker[0]}:{broker[1]}"}
    )  # fmt: skip


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise DeploymentError(f"nothing listened on port {port} within {timeout} s")


def stop_processes(processes: Iterable[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every process still running, then wait; kill those that outlast ``grace``."""
    processes = list(processes)
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class LocalLedger:
    """Use as a context manager; everything is stopped on exit."""

    root: Path
    task: str = "ledger-local"
    nodes: tuple[int, ...] = (101, 102, 103)
    users: tuple[int, ...] = tuple(range(1, 10))
    etcd_members: int = 3
    mosquitto: str | None = None
    etcd_binary: str | None = None
    store: str = "etcd"
    """``etcd`` (a Raft-replicated log on ``etcd_members`` members) or ``sqlite`` (one node)."""
    broker: str = "open"
    """``mosquitto`` (passwords and the roster's ACL), ``embedded`` (amqtt, the same), or
    ``open`` (Mosquitto with anonymous access, no ACL)."""
    broker_persistence: bool = False
    """Mosquitto keeps sessions and retained messages across a restart (in ``root``)."""
    identities: dict[int, Identity] = field(default_factory=dict)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    configs: dict[int, Path] = field(default_factory=dict)
    broker_port: int = 0
    _broker: subprocess.Popen[bytes] | None = None
    broker_config: Path | None = None
    _etcd: EtcdCluster | None = None
    metrics_ports: dict[int, int] = field(default_factory=dict)
    """Node → the port it serves Prometheus metrics on (``metrics_port`` in its file)."""

    @property
    def etcd(self) -> EtcdCluster:
        assert self._etcd is not None
        return self._etcd

    @property
    def roster(self) -> Roster:
        return Roster.load(self.root / "roster.toml")

    def _write_files(self) -> None:
        roles = {0: Role.PROVIDER, 200: Role.ADMIN}
        roles.update(dict.fromkeys(self.users, Role.USER))
        roles.update(dict.fromkeys(self.nodes, Role.LEDGER))
        self.identities = provision_identities(
            self.root, self.task, roles, broker_passwords=self.broker != "open"
        )

    def _start_broker(self) -> None:
        self.broker_port = free_port()
        if self.broker != "open":
            self._start_guarded_broker()
            return
        binary = self.mosquitto or find_mosquitto()
        conf = self.root / "mosquitto.conf"
        conf.write_text(
            f"listener {self.broker_port} 127.0.0.1\nallow_anonymous true\n"
            "set_tcp_nodelay true\nmax_queued_messages 1000000\nmax_inflight_messages 0\n"
            "persistence false\n"
        )
        log = open(self.root / "mosquitto.log", "ab")  # noqa: SIM115 — owned by the child
        self._broker = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        wait_for_port(self.broker_port, self._broker)

    def _start_guarded_broker(self) -> None:
        """``fairbus broker`` in its own process: the roster's logins and ACL."""
        self.broker_config = self.root / "broker.toml"
        self.broker_config.write_text(
            broker_config_toml(self.broker_port, persistence=self.broker_persistence)
        )
        log = open(self.root / "broker.log", "ab")  # noqa: SIM115 — owned by the child
        argv = [*FAIRBUS_COMMAND, "broker",
                "--config", str(self.broker_config)]  # fmt: skip
        if self.broker == "embedded":
            argv.append("--embedded")
        self._broker = subprocess.Popen(argv, stdout=log, stderr=log)
        wait_for_port(self.broker_port, self._broker, timeout=30)

    def restart_broker(self, down_for: float = 1.0) -> None:
        """Stop the broker (SIGTERM), leave the bus down ``down_for`` seconds, start it
        again on the same port: every client must reconnect by itself."""
        if self._broker is None or self.broker == "open":
            raise DeploymentError("only a `fairbus broker` broker can be restarted here")
        self._broker.terminate()
        self._broker.wait(timeout=10)
        time.sleep(down_for)
        self._start_guarded_broker()

    def _write_configs(self) -> None:
        for node in self.nodes:
            cfg = self.root / f"ledger-{node}.toml"
            etcd = self.etcd.endpoints if self.store == "etcd" else ()
            broker = ("127.0.0.1", self.broker_port)
            cfg.write_text(
                ledger_config_toml(
                    store=self.store, data_dir=f"node-{node}", etcd=etcd, broker=broker
                )
            )
            if node in self.metrics_ports:
                with cfg.open("a", encoding="utf-8") as f:
                    f.write(toml_values({"metrics_port": self.metrics_ports[node]}))
            self.configs[node] = cfg

    def start_node(self, node: int) -> None:
        log = open(self.root / f"ledger-{node}.log", "ab")  # noqa: SIM115 — owned by the child
        argv = [*FAIRBUS_COMMAND, "ledger",
                "--node", str(node), "--config", str(self.configs[node])]  # fmt: skip
        self.processes[node] = subprocess.Popen(argv, stdout=log, stderr=log)

    def kill_node(self, node: int) -> None:
        """kill -9, as a crash would."""
        self.processes[node].kill()
        self.processes[node].wait()

    async def writer(self) -> int | None:
        """The node holding the writer key now."""
        store = await EtcdStore.connect(self.alive_endpoints(), self.task)
        try:
            got = await store.client.get(store.writer_key)
        finally:
            await store.close()
        return None if got is None else int(got.value.split(b":")[0])

    async def wait_for_writer(self, timeout: float = NODE_START_TIMEOUT) -> int:
        import asyncio

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FairbusError):
                node = await self.writer()
                if node is not None:
                    return node
            await asyncio.sleep(0.1)
        raise DeploymentError(f"no ledger writer within {timeout} s; see {self.root}")

    def alive_endpoints(self) -> list[tuple[str, int]]:
        return [m.endpoint for m in self.etcd.members if m.alive]

    async def blocks(self) -> list[bytes]:
        store = await EtcdStore.connect(self.alive_endpoints(), self.task)
        try:
            return await store.read(0)
        finally:
            await store.close()

    def __enter__(self) -> LocalLedger:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._write_files()
            self._start_broker()
            if self.store == "etcd":
                binary = self.etcd_binary or find_etcd()
                self._etcd = EtcdCluster(self.root / "etcd", self.etcd_members, binary)
                self._etcd.__enter__()
            elif len(self.nodes) != 1:
                raise DeploymentError("a SQLite ledger has exactly one node")
            self._write_configs()
            for node in self.nodes:
                self.start_node(node)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_processes(self.processes.values())
        if self._etcd is not None:
            self._etcd.stop()
        if self._broker is not None:
            self._broker.terminate()
            self._broker.wait(timeout=10)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
