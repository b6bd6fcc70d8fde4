"""``fairbus init DIR``: provision a whole task in one folder.

Writes the roster, fresh keys for every identity (provider, users, ledger nodes, admin;
libsodium's CSPRNG, each secret 0600 in a 0700 ``keys/``), the broker, ledger and task
configurations, systemd environment files for the units in ``systemd/`` and a README
saying which command runs where. The files come from the same writers
:class:`~fairbus_ledger_service.deployment.LocalLedger` and
:class:`~fairbus.runtime.local.LocalTask` use, and each configuration is read back with
the loader of the command that will read it before ``DIR`` appears: everything is written
into a hidden sibling folder and renamed into place, so an interrupted ``init`` leaves no
half-made task.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fairbus.errors import FairbusError, OperatorError
from fairbus.identity import Identity, require_broker_password
from fairbus.roster import Role, Roster
from fairbus.runtime.local import task_config_toml
from fairbus.training.config import TrainConfig
from fairbus_broker.config import BrokerConfig
from fairbus_cli.errors import OPERATOR_EXIT, STOPPERS, say
from fairbus_ledger_service.config import LedgerConfig
from fairbus_ledger_service.deployment import (
    broker_config_toml,
    ledger_config_toml,
    provision_identities,
)

console = Console(highlight=False)

PROVIDER_ID = 0
DEFAULT_ETCD = ("127.0.0.1:2379", "127.0.0.1:22379", "127.0.0.1:32379")
"""The members of ``configs/ledger.example.toml``: three etcd members, Raft needs a majority."""
UNIT_FAIRBUS = "/opt/fairbus/venv/bin/fairbus"
"""The ``fairbus`` command the units in ``systemd/`` start (their ``ExecStart``)."""
UNIT_STATE = PurePosixPath("/var/lib/fairbus")
"""The units' ``StateDirectory``: writable under their ``ProtectSystem=strict``."""
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_LEDGER_NODES = 99


class InitError(OperatorError):
    """``fairbus init`` cannot provision the task as asked (``DIR`` is not an empty
    folder, a count or address is out of range)."""


class Store(StrEnum):
    ETCD = "etcd"
    SQLITE = "sqlite"


@dataclass(frozen=True)
class Plan:
    """Everything ``fairbus init`` writes, decided before anything is written."""

    task: str
    users: int
    ledger_nodes: int
    store: Store
    etcd: tuple[tuple[str, int], ...]
    broker_host: str
    broker_port: int
    dataset: str
    model: str | None
    rounds: int
    local_epochs: int
    threads: int
    state_dir: str
    install_dir: PurePosixPath

    @property
    def user_ids(self) -> range:
        return range(1, self.users + 1)

    @property
    def ledger_ids(self) -> range:
        """101, 102, … (``configs/roster.example.toml``'s), or past the users' ids when
        there are 100 or more: 201 for users 1..100."""
        first = 100 * (self.users // 100 + 1) + 1
        return range(first, first + self.ledger_nodes)

    @property
    def admin_id(self) -> int:
        """200 (the example roster's), else the first hundred past the ledger nodes."""
        return self.ledger_ids.start + 99

    def roles(self) -> dict[int, Role]:
        roles = {PROVIDER_ID: Role.PROVIDER}
        roles.update(dict.fromkeys(self.user_ids, Role.USER))
        roles.update(dict.fromkeys(self.ledger_ids, Role.LEDGER))
        roles[self.admin_id] = Role.ADMIN
        return roles

    def names(self) -> dict[int, str]:
        names = {PROVIDER_ID: "provider", self.admin_id: "operator"}
        names.update({u: f"user {u}" for u in self.user_ids})
        names.update({n: f"ledger node {k}" for k, n in enumerate(self.ledger_ids, 1)})
        return names

    @property
    def broker(self) -> tuple[str, int]:
        return self.broker_host, self.broker_port

    @property
    def listen_host(self) -> str:
        """Where the broker listens: loopback for a loopback address, else every
        interface (the clients connect to ``broker_host``)."""
        return "127.0.0.1" if self.broker_host in LOOPBACK else "0.0.0.0"  # noqa: S104

    def state(self, sub: str = "") -> str:
        """A writable path in the configurations (relative paths: to ``DIR``)."""
        return str(PurePosixPath(self.state_dir, sub)) if sub else self.state_dir

    @property
    def installed_state(self) -> PurePosixPath:
        """The state folder once ``DIR`` is installed as ``install_dir``."""
        state = PurePosixPath(self.state_dir)
        return state if state.is_absolute() else self.install_dir / state


@dataclass(frozen=True)
class Written:
    path: str
    what: str
    mode: int


def init(
    directory: Path = typer.Argument(
        ...,
        metavar="DIR",
        help="The task's folder; created, or an empty one. It will hold secret keys.",
    ),
    users: int = typer.Option(9, "--users", min=3, help="Users (ids 1..N); at least 3."),
    ledger_nodes: int = typer.Option(
        3,
        "--ledger-nodes",
        min=1,
        max=MAX_LEDGER_NODES,
        help="Ledger nodes (ids 101, 102, …). With the etcd store they share one "
        "Raft-replicated log and any one may die; sqlite takes exactly 1.",
    ),
    store: Store = typer.Option(
        Store.ETCD,
        help="The ledger's store: etcd (Raft-replicated; run 3 or 5 etcd members, e.g. the "
        "etcd-server package) or sqlite (one node, one machine, for trials).",
    ),
    etcd: list[str] = typer.Option(
        list(DEFAULT_ETCD),
        "--etcd",
        help="An etcd member as host:port (repeat for each); for --store etcd.",
    ),
    task: str = typer.Option(
        "", "--task", help="Task name (letters, digits, '_', '.', '-'); default: DIR's name."
    ),
    broker_host: str = typer.Option(
        "127.0.0.1",
        "--broker-host",
        help="The broker's address as every participant reaches it. A non-loopback one "
        "makes the broker listen on every interface.",
    ),
    broker_port: int = typer.Option(1883, "--broker-port", min=1, max=65535),
    dataset: str | None = typer.Option(
        None,
        help="digits (bundled), mnist, cifar10, …; default: configs/fairbus.example.toml's "
        "(the task loader's).",
    ),
    model: str | None = typer.Option(None, help="Model; default: the data set's."),
    rounds: int | None = typer.Option(
        None, min=1, help="Training rounds; default: configs/fairbus.example.toml's."
    ),
    local_epochs: int = typer.Option(
        TrainConfig.local_epochs, "--local-epochs", min=1, help="Local epochs per round."
    ),
    threads: int = typer.Option(
        0,
        min=0,
        help="torch threads per participant; 0: all cores. Several participants on one "
        "machine want 1 each.",
    ),
    state_dir: str = typer.Option(
        "state",
        "--state-dir",
        help="Where the participants, the broker and the ledger nodes write (relative: to "
        "DIR). Under the systemd units use /var/lib/fairbus, their writable StateDirectory.",
    ),
    install_dir: str = typer.Option(
        "/etc/fairbus",
        "--install-dir",
        help="Where DIR will be on each machine for the systemd units (they read "
        "/etc/fairbus); the environment files name their configurations there.",
    ),
) -> None:
    """Create a whole task in DIR, ready for `fairbus broker`, `ledger`, `provider`, `user`.

    Writes (every secret fresh from libsodium's CSPRNG, mode 0600, keys/ 0700):

      roster.toml       provider 0, users 1..N, ledger nodes 101.., admin 200
      keys/             each identity's signing key, box key and broker password
      broker.toml       for `fairbus broker --config` (Mosquitto; --embedded: amqtt)
      ledger-<id>.toml  for `fairbus ledger --node <id> --config`, one per node
      task.toml         for `fairbus provider/user --config`; training as in
                        configs/fairbus.example.toml
      systemd/          an environment file per unit instance, drop-ins to read them
      README.txt        which command runs where; copy each machine only its keys

    Default: 3 ledger nodes on an etcd store (Raft over 3 etcd members at --etcd),
    as in production. A one-machine trial: --ledger-nodes 1 --store sqlite --threads 1.

    DIR must be absent or empty (keys are never overwritten); a mistake is one line
    and exit status 2.
    """
    try:
        check_target(directory)  # first: it needs no heavy import
        plan = _plan(
            directory, users, ledger_nodes, store, etcd, task, broker_host, broker_port,
            dataset, model, rounds, local_epochs, threads, state_dir, install_dir,
        )  # fmt: skip
        written = provision(directory, plan)
    except OSError as exc:  # the folder, the disk
        where = f"{exc.filename}: " if exc.filename else ""
        say(console, "cannot initialise the task", f"{where}{exc.strerror or exc}")
        raise typer.Exit(OPERATOR_EXIT) from None
    except (FairbusError, *STOPPERS) as exc:  # every other input is an option
        say(console, "cannot initialise the task", exc)
        raise typer.Exit(OPERATOR_EXIT) from None
    _summary(directory, plan, written)


def _plan(
    directory: Path,
    users: int,
    ledger_nodes: int,
    store: Store,
    etcd: list[str],
    task: str,
    broker_host: str,
    broker_port: int,
    dataset: str | None,
    model: str | None,
    rounds: int | None,
    local_epochs: int,
    threads: int,
    state_dir: str,
    install_dir: str,
) -> Plan:
    """Check the options against each other; :class:`InitError` names the wrong one."""
    # imported here: the data sets' module loads torch, which no other command of
    # `fairbus` should wait for at start
    from fairbus.runtime.config import ProviderSettings, TrainingSettings
    from fairbus.training.data import DATASET_MODELS

    dataset = TrainingSettings.dataset if dataset is None else dataset
    if store is Store.SQLITE and ledger_nodes != 1:
        raise InitError(
            f"a sqlite ledger has exactly one node; use --ledger-nodes 1 or --store etcd "
            f"(got --ledger-nodes {ledger_nodes})"
        )
    if dataset not in DATASET_MODELS:
        raise InitError(f"--dataset {dataset!r}: one of {', '.join(DATASET_MODELS)}")
    if model is not None:
        from fairbus.training.models import MODELS

        if model not in MODELS:
            raise InitError(f"--model {model!r}: one of {', '.join(MODELS)}")
    if not broker_host or any(c.isspace() or c in "\"'\\" for c in broker_host):
        raise InitError(f"--broker-host {broker_host!r} is not a host name or address")
    install = PurePosixPath(install_dir)
    if not install.is_absolute():
        raise InitError(f"--install-dir {install_dir!r} must be an absolute path")
    if not state_dir or any(c in state_dir for c in "\n\r\0"):
        raise InitError(f"--state-dir {state_dir!r} is not a path")
    return Plan(
        task=task or directory.resolve().name,
        users=users,
        ledger_nodes=ledger_nodes,
        store=store,
        etcd=tuple(_endpoint(e) for e in etcd) if store is Store.ETCD else (),
        broker_host=broker_host,
        broker_port=broker_port,
        dataset=dataset,
        model=model,
        rounds=ProviderSettings.rounds if rounds is None else rounds,
        local_epochs=local_epochs,
        threads=threads,
        state_dir=state_dir,
        install_dir=install,
    )


def _endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InitError(f"--etcd {value!r} is not host:port")
    return host, int(port)


def check_target(directory: Path) -> Path:
    """``directory`` made absolute (``.`` and ``a/..`` too), if ``init`` may create it
    there: absent, or an empty folder, under folders; else :class:`InitError`."""
    directory = Path(os.path.abspath(directory))
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir() or directory.is_symlink():
            raise InitError(f"{directory} exists and is not a folder")
        if any(directory.iterdir()):
            raise InitError(
                f"{directory} is not empty; `fairbus init` never overwrites a task's keys "
                "(choose another folder, or remove this one)"
            )
    existing = next(p for p in directory.parents if p.exists())
    if not existing.is_dir():
        raise InitError(f"{existing} is not a folder")
    return directory


def provision(directory: Path, plan: Plan) -> list[Written]:
    """Write the task of ``plan`` into ``directory`` (absent or an empty folder) and
    return what was written. Nothing appears in ``directory`` unless every file was
    written and read back by its command's loader."""
    directory = check_target(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.init-", dir=parent))
    try:
        written = _write(staging, plan)
        _read_back(staging, plan)
        if directory.exists():
            directory.rmdir()  # empty (checked above); rename(2) would replace it anyway
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _write(root: Path, plan: Plan) -> list[Written]:
    written: list[Written] = []

    def record(name: str, what: str) -> None:
        written.append(Written(name, what, stat.S_IMODE((root / name).stat().st_mode)))

    def put(name: str, text: str, what: str) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        record(name, what)

    roles = plan.roles()
    provision_identities(root, plan.task, roles, names=plan.names())
    record("roster.toml", f"task {plan.task!r}: {len(roles)} members, public keys")
    for pid in roles:
        for kind, what in (("sign", "Ed25519 signing key"), ("box", "X25519 box key"),
                           ("mqtt", "broker password")):  # fmt: skip
            record(f"keys/{pid}.{kind}.key", f"{what} of {pid}")

    put(
        "broker.toml",
        broker_config_toml(plan.broker_port, host=plan.listen_host, data_dir=plan.state("broker")),
        f"`fairbus broker`: listens on {plan.listen_host}:{plan.broker_port}",
    )
    for node in plan.ledger_ids:
        put(
            f"ledger-{node}.toml",
            ledger_config_toml(
                store=plan.store.value,
                data_dir=plan.state(f"ledger-{node}"),
                etcd=plan.etcd,
                broker=plan.broker,
            ),
            f"`fairbus ledger --node {node}`: {plan.store.value} store",
        )
    put("task.toml", _task_toml(plan), "`fairbus provider` and `fairbus user`")
    for name, text, what in _systemd_files(plan):
        put(f"systemd/{name}", text, what)
    put("README.txt", _readme(plan), "which command runs where")
    if not PurePosixPath(plan.state_dir).is_absolute():
        (root / plan.state_dir).mkdir(parents=True, mode=0o700)
    return written


def _task_toml(plan: Plan) -> str:
    """The task's configuration, with configs/fairbus.example.toml's settings (the
    loader's defaults, written out so an operator sees and edits them)."""
    from fairbus.runtime.config import ProviderSettings, RuntimeConfig, TrainingSettings

    t, p, tc = TrainingSettings(), ProviderSettings(), TrainConfig()
    training: dict[str, object] = {"dataset": plan.dataset}
    if plan.model is not None:
        training["model"] = plan.model
    training.update(
        partition=t.partition, alpha=t.alpha, seed=t.seed, lr=tc.lr,
        batch_size=tc.batch_size, local_epochs=plan.local_epochs, momentum=tc.momentum,
        equal_steps=tc.equal_steps,
    )  # fmt: skip
    if plan.threads:
        training["threads"] = plan.threads
    provider = {
        "rounds": plan.rounds, "join_timeout": p.join_timeout,
        "phase_timeout": p.phase_timeout, "basic_groupings": p.basic_groupings,
        "key_repeats": p.key_repeats, "reference_groups": p.reference_groups,
        "regroup_every_round": p.regroup_every_round, "defended": p.defended,
    }  # fmt: skip
    defaults = RuntimeConfig.__dataclass_fields__
    top = {"ledger_timeout": defaults["ledger_timeout"].default,
           "collusion": defaults["collusion"].default}  # fmt: skip
    header = (
        f"# Task {plan.task!r}, written by `fairbus init`: read by `fairbus provider "
        "--config task.toml`\n# and `fairbus user --id N --config task.toml` (see "
        "configs/fairbus.example.toml). Every\n# participant must hold the same [training]; "
        "the [detection] policy takes the defaults of\n# fairbus/task.py unless a "
        "[detection] table is added (recorded on the ledger at task start).\n"
    )
    return header + task_config_toml(
        plan.broker, state=plan.state(), top=top, training=training, provider=provider
    )


UNITS = {
    "fairbus-provider.service": "provider --config ${FAIRBUS_CONFIG}",
    "fairbus-user@.service": "user --id %i --config ${FAIRBUS_CONFIG}",
    "fairbus-ledger@.service": "ledger --node %i --config ${FAIRBUS_CONFIG}",
}
"""The units of ``systemd/`` and the command each drop-in starts from its environment file."""
DROP_IN = "fairbus-init.conf"


def _systemd_files(plan: Plan) -> list[tuple[str, str, str]]:
    """One environment file per unit instance (``<unit>.env``, e.g.
    ``fairbus-user@3.env``) naming its configuration, and per unit a drop-in that reads
    it (the units themselves read the fixed ``/etc/fairbus/task.toml`` and
    ``ledger.toml``; a task has one configuration per ledger node)."""
    etc = plan.install_dir
    files: list[tuple[str, str, str]] = []

    def env(unit: str, config: str) -> None:
        text = (
            f"# {unit}.service of task {plan.task!r} (`fairbus init`): read by the drop-in "
            f"{{unit}}.d/{DROP_IN}\nFAIRBUS_CONFIG={etc / config}\n"
        ).replace("{unit}", _template(unit))
        files.append((f"{unit}.env", text, f"environment of {unit}.service"))

    env("fairbus-provider", "task.toml")
    for user in plan.user_ids:
        env(f"fairbus-user@{user}", "task.toml")
    for node in plan.ledger_ids:
        env(f"fairbus-ledger@{node}", f"ledger-{node}.toml")
    state = plan.installed_state
    writable = "" if _under(state, UNIT_STATE) else f"ReadWritePaths={state}\n"
    for unit, command in UNITS.items():
        text = (
            f"# Install as /etc/systemd/system/{unit}.d/{DROP_IN}, then `systemctl "
            f"daemon-reload`.\n# Each instance reads its own environment file from "
            f"{etc}/systemd/ (written by `fairbus init`).\n[Service]\n"
            f"EnvironmentFile={etc}/systemd/%N.env\nExecStart=\n"
            f"ExecStart={UNIT_FAIRBUS} {command}\n{writable}"
        )
        files.append((f"{unit}.d/{DROP_IN}", text, f"drop-in: {unit} reads its .env"))
    return files


def _template(unit: str) -> str:
    """``fairbus-user@3`` → ``fairbus-user@.service``."""
    name, at, _ = unit.partition("@")
    return f"{name}{at}.service"


def _under(path: PurePosixPath, folder: PurePosixPath) -> bool:
    return path == folder or folder in path.parents


def _readme(plan: Plan) -> str:
    from fairbus.runtime.config import ProviderSettings

    users = plan.user_ids
    nodes = plan.ledger_ids
    etcd = (
        f"the etcd members at {', '.join(f'{h}:{p}' for h, p in plan.etcd)}\n    (Raft: "
        "run 3 or 5, e.g. the etcd-server package; on one machine for trials\n    `fairbus "
        "ledger etcd-cluster`, then put the endpoints it prints in each ledger-<id>.toml)"
        if plan.store is Store.ETCD
        else "nothing else (a sqlite store: one node, one machine, for trials)"
    )
    return f"""Task {plan.task!r}, written by `fairbus init`. Run each command from this folder
(or give its configuration's full path); relative paths in the configurations are
relative to this folder. Writable data goes to {plan.state_dir!r}.

The broker (one machine):
    fairbus broker --config broker.toml
    (--embedded: the amqtt broker in-process instead of Mosquitto). Needs roster.toml
    and every keys/<id>.mqtt.key, of which it gives the broker only hashes.
Ledger node N, for N in {nodes.start}..{nodes.stop - 1} (a machine each):
    fairbus ledger --node N --config ledger-N.toml
    Needs keys/N.* and {etcd}.
The provider (id {PROVIDER_ID}):
    fairbus provider --config task.toml
    Needs keys/{PROVIDER_ID}.*
User N, for N in {users.start}..{users.stop - 1} (a device each):
    fairbus user --id N --config task.toml
    Needs keys/N.*
The operator (admin {plan.admin_id}), on a ledger node while its store is reachable:
    fairbus audit --config ledger-{nodes.start}.toml

Start the broker first, then the ledger nodes, then the provider and the users in any
order (the provider waits up to {ProviderSettings.join_timeout:g} s for every user, then
starts with those online). `fairbus roster check roster.toml` lists the members.

Secrets: keys/<id>.sign.key, .box.key and .mqtt.key are mode 0600 in a 0700 folder. Copy
to each machine only its own participant's keys (and roster.toml, the configurations); the
broker machine needs every <id>.mqtt.key, from which `fairbus broker` writes only hashes.
Never commit keys/.

systemd (the units in the repository's systemd/): copy this folder to {plan.install_dir}
on each machine, owned by the `fairbus` account (chown -R fairbus:fairbus), install
systemd/<unit>.d/{DROP_IN} under /etc/systemd/system/, run `systemctl daemon-reload`,
then for example `systemctl enable --now fairbus-ledger@{nodes.start}`, `fairbus-provider`,
`fairbus-user@{users.start}`. Each instance reads its systemd/<instance>.env
(fairbus-user@{users.start}.env, …), which names its configuration. The units write only
under {UNIT_STATE} (their StateDirectory) unless a drop-in allows more: create a task for
them with --state-dir {UNIT_STATE}.
"""


def _read_back(root: Path, plan: Plan) -> None:
    """Load every file with the loader of the command that reads it: the roster, each
    identity's keys and broker password, the broker, ledger and task configurations."""
    from fairbus.runtime.config import RuntimeConfig

    roster = Roster.load(root / "roster.toml")
    for pid in roster:
        identity = Identity.load(root / "keys", pid)
        if identity.public.verify_hex != roster[pid].identity.verify_hex:
            raise InitError(f"the key files of {pid} do not match the roster")
        require_broker_password(root / "keys", pid)
    BrokerConfig.load(root / "broker.toml")
    for node in plan.ledger_ids:
        LedgerConfig.load(root / f"ledger-{node}.toml")
    RuntimeConfig.load(root / "task.toml")


def _summary(directory: Path, plan: Plan, written: list[Written]) -> None:
    table = Table(title=f"fairbus init: task {plan.task!r} in {escape(str(directory))}")
    for column in ("file", "what", "mode"):
        table.add_column(column)
    keys = [w for w in written if w.path.startswith("keys/")]
    others = [w for w in written if not w.path.startswith("keys/")]
    envs = [w for w in others if w.path.startswith("systemd/")]
    for w in others:
        if w not in envs:
            table.add_row(escape(w.path), escape(w.what), f"{w.mode:04o}")
    table.add_row(
        "keys/",
        f"{len(keys)} secrets: signing key, box key, broker password of each of "
        f"{len(plan.roles())} identities (libsodium CSPRNG)",
        "0600 (folder 0700)",
    )
    table.add_row(
        "systemd/",
        f"{sum(w.path.endswith('.env') for w in envs)} environment files (one per unit "
        f"instance) and {len(UNITS)} drop-ins",
        f"{envs[0].mode:04o}",
    )
    console.print(table)
    dir_ = escape(str(directory))
    nodes, users = plan.ledger_ids, plan.user_ids
    store = (
        f"  # needs etcd at {', '.join(f'{h}:{p}' for h, p in plan.etcd)}"
        if plan.store is Store.ETCD
        else ""
    )
    console.print(
        "next (each on its machine; see "
        f"{dir_}/README.txt):\n"
        f"  fairbus roster check {dir_}/roster.toml\n"
        f"  fairbus broker --config {dir_}/broker.toml\n"
        f"  fairbus ledger --node {nodes.start} --config {dir_}/ledger-{nodes.start}.toml"
        f"{store}\n"
        f"  fairbus provider --config {dir_}/task.toml\n"
        f"  fairbus user --id {users.start} --config {dir_}/task.toml"
        f"   # … through {users.stop - 1}",
        soft_wrap=True,
    )
