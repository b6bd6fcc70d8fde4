"""Operator mistakes with ``fairbus provider`` and ``fairbus user``: each is one line on
the console, no traceback, exit status 2, and the line names the file (or the TOML table)
to fix. A refused broker login fails at once; an unreachable broker is waited for and
reported at the first failure and then every ``report_every`` seconds.

Everything here runs without a broker (the real-broker checks are in
``tests/integration/test_operator_login.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from rich.console import Console
from typer.testing import CliRunner, Result

from fairbus.errors import FairbusError, IdentityError, OperatorError
from fairbus.identity import (
    Identity,
    broker_password_path,
    load_broker_password,
    new_broker_password,
    require_broker_password,
)
from fairbus.roster import Member, Role, Roster
from fairbus.runtime.connection import BrokerLoginError, BusConnection
from fairbus.runtime.state import PROBE, StateError, prepare_state_folder, write_atomic
from fairbus.runtime.user_state import UserState
from fairbus_broker.mqtt import login_refused
from fairbus_cli.errors import OPERATOR_EXIT, exit_status, one_line, say
from fairbus_cli.main import app
from fairbus_ledger_service.etcd_cluster import free_port

runner = CliRunner()
USER = 3
DEV_FULL = Path("/dev/full")
as_root = os.geteuid() == 0


@dataclass(frozen=True)
class Task:
    """A task's files on disk: roster (provider 0, users 1-3), keys with broker
    passwords, and ``task.toml`` naming a broker port nobody listens on."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "task.toml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def write_config(self, extra: str = "", *, state: str = "state") -> Path:
        self.config.write_text(
            f'roster = "roster.toml"\nkeys = "keys"\nstate = "{state}"\n'
            f'broker = "127.0.0.1:{free_port()}"\n{extra}'
        )
        return self.config


@pytest.fixture
def task(tmp_path: Path) -> Task:
    roles = {0: Role.PROVIDER, 1: Role.USER, 2: Role.USER, USER: Role.USER}
    identities = {pid: Identity.generate(pid) for pid in roles}
    members = [Member(identities[pid].public, role) for pid, role in roles.items()]
    (tmp_path / "roster.toml").write_text(Roster("operator-errors", members).to_toml())
    for pid, identity in identities.items():
        identity.save(tmp_path / "keys")
        new_broker_password(tmp_path / "keys", pid)
    t = Task(tmp_path)
    t.write_config()
    return t


Command = Callable[[Task], Result]


def provider(task: Task) -> Result:
    return runner.invoke(app, ["provider", "--config", str(task.config)])


def user(task: Task, user_id: int = USER) -> Result:
    return runner.invoke(app, ["user", "--id", str(user_id), "--config", str(task.config)])


def one_error_line(result: Result) -> str:
    """The single line the command printed; it exited 2 without a traceback."""
    assert result.exit_code == OPERATOR_EXIT, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # nothing escaped
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# --- the configuration: table names survive -------------------------------------------------


@pytest.mark.parametrize("command", [provider, user])
@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ('[provider]\nrounds = "x"\n', "[provider]: 'rounds' must be int"),
        ('[training]\nlr = "fast"\n', "[training]: 'lr' must be a number"),
        ("[provider]\nspeed = 1\n", "[provider]: unknown keys ['speed']"),
        ("[detection]\nbound_score = 'x'\n", "[detection]"),
    ],
)
def test_configuration_errors_keep_their_table_names(
    task: Task, command: Command, extra: str, says: str
) -> None:
    task.write_config(extra)
    line = one_error_line(command(task))
    assert says in line and str(task.config) in line


def test_a_missing_or_broken_configuration_file_is_one_line(task: Task) -> None:
    task.config.unlink()
    line = one_error_line(provider(task))
    assert str(task.config) in line and "No such file or directory" in line
    task.config.write_text("roster = [")
    assert str(task.config) in one_error_line(user(task))


def test_markup_in_any_message_is_printed_as_it_is() -> None:
    console = Console(record=True, width=40, file=open(os.devnull, "w"))  # noqa: SIM115
    message = "t.toml [provider]: 'rounds' must be int,\n  got [bold]'x'[/bold] " + "y" * 60
    say(console, "error", message)
    text = console.export_text()
    assert text == f"error: {one_line(message)}\n"  # one line, brackets kept, not wrapped
    console.file.close()


# --- the roster and the key files ------------------------------------------------------------


@pytest.mark.parametrize(("pid", "says"), [(9, "not in the roster"), (0, "is a provider")])
def test_a_user_id_the_roster_does_not_allow_is_one_line(task: Task, pid: int, says: str) -> None:
    line = one_error_line(user(task, pid))
    assert "roster.toml" in line and says in line


@pytest.mark.parametrize(("command", "pid"), [(provider, 0), (user, USER)])
def test_a_missing_broker_password_is_refused_not_anonymous(
    task: Task, command: Command, pid: int
) -> None:
    path = broker_password_path(task.keys, pid)
    path.unlink()
    line = one_error_line(command(task))
    assert str(path) in line and "does not exist" in line
    with pytest.raises(IdentityError, match="does not exist"):
        require_broker_password(task.keys, pid)
    assert load_broker_password(task.keys, pid) is None  # the broker's view: no login


def test_an_over_readable_broker_password_is_refused(task: Task) -> None:
    path = broker_password_path(task.keys, USER)
    path.chmod(0o644)
    line = one_error_line(user(task))
    assert str(path) in line and "mode 0644" in line and "0600" in line


def test_an_unreadable_broker_password_is_one_line(task: Task) -> None:
    """A key 'file' that cannot be read (here a folder with the right mode, which even
    root cannot read as a file) names the file and the OS's reason."""
    path = broker_password_path(task.keys, USER)
    path.unlink()
    path.mkdir(mode=0o700)
    line = one_error_line(user(task))
    assert f"cannot read broker password file {path}: Is a directory" in line


def test_a_key_file_this_account_cannot_read_is_one_line(
    task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode 0000 (root reads it anyway: there the refusal is what the OS would say)."""
    path = task.keys / f"{USER}.sign.key"
    path.chmod(0)
    if as_root:
        read_bytes = Path.read_bytes

        def refuse(self: Path) -> bytes:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    try:
        line = one_error_line(user(task))
    finally:
        path.chmod(0o600)
    assert f"cannot read key file {path}: Permission denied" in line


# --- the state folder ----------------------------------------------------------------------


@pytest.mark.parametrize(("command", "folder"), [(provider, "provider"), (user, f"user-{USER}")])
def test_a_state_folder_under_a_file_is_one_line(task: Task, command: Command, folder: str) -> None:
    (task.root / "blocker").write_text("not a folder")
    task.write_config(state="blocker/state")
    line = one_error_line(command(task))
    state = task.root / "blocker" / "state" / folder
    assert f"cannot create the state folder {state}: Not a directory" in line


@pytest.mark.parametrize("command", [provider, user])
def test_a_read_only_state_folder_is_one_line(
    task: Task, command: Command, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode 0500 (root writes there anyway: there the refusal is what the OS would say)."""
    task.state.mkdir(mode=0o500)
    if as_root:
        os_open = os.open

        def refuse(path: str | os.PathLike[str], flags: int, *args: int, **kw: object) -> int:
            if str(path).startswith(str(task.state)) and flags & os.O_CREAT:
                raise PermissionError(13, "Permission denied", str(path))
            return os_open(path, flags, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", refuse)
    try:
        line = one_error_line(command(task))
    finally:
        task.state.chmod(0o700)
    assert str(task.state) in line and "Permission denied" in line


@pytest.mark.parametrize(("command", "folder"), [(provider, "provider"), (user, f"user-{USER}")])
def test_a_full_state_folder_is_one_line(task: Task, command: Command, folder: str) -> None:
    """The start-up write test meets a full device (its file leads to /dev/full, which
    answers every write with ENOSPC)."""
    directory = task.state / folder
    directory.mkdir(parents=True)
    (directory / PROBE).symlink_to(DEV_FULL)
    line = one_error_line(command(task))
    assert f"cannot write in the state folder {directory}: No space left on device" in line


def test_state_writes_on_a_full_disk_are_state_errors(tmp_path: Path) -> None:
    state = UserState(tmp_path / "user-3")
    (state.directory / "chain_head.tmp").symlink_to(DEV_FULL)
    with pytest.raises(StateError) as error:
        state.save_chain_head(b"\x01" * 32)
    assert str(error.value) == (
        f"cannot write {state.directory / 'chain_head'}: No space left on device"
    )
    assert isinstance(error.value, OperatorError) and exit_status(error.value) == OPERATOR_EXIT
    assert not (state.directory / "chain_head").exists()
    write_atomic(tmp_path / "ok", b"fine")  # an ordinary write still works
    assert (tmp_path / "ok").read_bytes() == b"fine"
    assert stat.S_IMODE((tmp_path / "ok").stat().st_mode) == 0o600


def test_prepare_state_folder_leaves_no_probe(tmp_path: Path) -> None:
    folder = prepare_state_folder(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_console_script_prints_one_line_on_stderr(task: Task) -> None:
    """The real process: stderr holds the error line and nothing else, stdout nothing."""
    (task.root / "blocker").write_text("")
    task.write_config(state="blocker/state")
    result = subprocess.run(
        [sys.executable, "-m", "fairbus_cli", "provider", "--config", str(task.config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == OPERATOR_EXIT, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot create")


# --- the broker login -----------------------------------------------------------------------


def connack(name: str) -> MqttConnectError:
    return MqttConnectError(ReasonCode(PacketTypes.CONNACK, name))


@pytest.mark.parametrize(
    ("exc", "refused"),
    [
        (connack("Bad user name or password"), True),  # CONNACK 4 (3.1.1), 0x86 (5)
        (connack("Not authorized"), True),  # CONNACK 5 (3.1.1), 0x87 (5)
        (MqttConnectError(4), True),  # paho 1's bare 3.1.1 codes
        (MqttConnectError(5), True),
        (connack("Server unavailable"), False),
        (MqttConnectError(3), False),
        (aiomqtt.MqttError("[Errno 111] Connection refused"), False),
        (aiomqtt.MqttCodeError(5, "Unexpected disconnection"), False),
        (aiomqtt.MqttCodeError(4, "Could not publish message"), False),
    ],
)
def test_login_refusals_are_told_from_other_failures(exc: Exception, refused: bool) -> None:
    assert login_refused(exc) is refused


class RefusingClient:
    """Stands in for the aiomqtt client: every CONNECT is refused as ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.attempts = 0

    async def __aenter__(self) -> RefusingClient:
        self.attempts += 1
        raise connack(self.reason)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class DroppingClient:
    """Stands in for the aiomqtt client: the first CONNECT gets in and the connection
    drops at once; every later one finds nobody listening."""

    def __init__(self) -> None:
        self.attempts = 0

    async def __aenter__(self) -> DroppingClient:
        self.attempts += 1
        if self.attempts > 1:
            raise aiomqtt.MqttError("[Errno 111] Connection refused")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def subscribe(self, topic: str, qos: int) -> None:
        return None

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        return None

    @property
    def messages(self) -> DroppingClient:
        return self

    def __aiter__(self) -> DroppingClient:
        return self

    async def __anext__(self) -> aiomqtt.Message:
        raise aiomqtt.MqttError("Disconnected during message iteration")


def bus(
    port: int,
    backoff: tuple[float, float],
    *,
    password_file: Path | None = None,
    report_every: float = 30.0,
) -> BusConnection:
    return BusConnection(
        "127.0.0.1",
        port,
        task="t",
        role="user",
        pid=USER,
        password="secret",
        subscriptions=[],
        on_message=lambda topic, data: None,
        backoff=backoff,
        password_file=password_file,
        report_every=report_every,
    )


@pytest.mark.parametrize("reason", ["Not authorized", "Bad user name or password"])
async def test_a_refused_login_fails_at_once(reason: str, tmp_path: Path) -> None:
    connection = bus(1883, (0.01, 0.01), password_file=tmp_path / "3.mqtt.key")
    refusing = RefusingClient(reason)
    connection.client = refusing  # type: ignore[assignment]
    cancelled = asyncio.Event()

    async def body() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cancelled.set()

    async with asyncio.timeout(5):
        with pytest.raises(BrokerLoginError) as error:
            await connection.serve(body())
    assert refusing.attempts == 1 and cancelled.is_set()
    message = str(error.value)
    assert "\n" not in message and reason in message and "'user-3'" in message
    assert "127.0.0.1:1883" in message and str(tmp_path / "3.mqtt.key") in message
    assert exit_status(error.value) == OPERATOR_EXIT


async def test_an_unreachable_broker_is_reported_now_and_then_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens on the port: the first refusal is a warning, then one every
    ``report_every`` seconds, while the attempts go on (debug lines); the work continues
    and nothing ends the process."""
    port = free_port()
    connection = bus(port, (0.02, 0.05), report_every=0.4)

    async def body() -> str:
        await asyncio.sleep(1.5)
        return "still running"

    with caplog.at_level(logging.DEBUG, logger="fairbus.bus"):
        assert await connection.serve(body()) == "still running"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    attempts = [r for r in caplog.records if r.name == "fairbus.bus"]
    assert warnings[0].startswith("user-3: cannot reach the broker (")
    assert f"retrying 127.0.0.1:{port}" in warnings[0]
    assert 2 <= len(warnings) <= 5, warnings  # ~ 1.5 s / 0.4 s, not one per attempt
    assert all("still cannot reach the broker" in w for w in warnings[1:])
    assert len(attempts) > len(warnings) + 5
    assert not connection.connected.is_set()


def test_fairbus_errors_that_are_not_mistakes_exit_1() -> None:
    assert exit_status(FairbusError("no ledger node shows round 3's dropout")) == 1
    assert exit_status(PermissionError(13, "Permission denied")) == OPERATOR_EXIT


async def test_a_lost_broker_is_one_warning_then_one_every_report_every(
    caplog: pytest.LogCaptureFixture,
) -> None:
    connection = bus(1883, (0.02, 0.05), report_every=0.4)
    dropping = DroppingClient()
    connection.client = dropping  # type: ignore[assignment]

    async def body() -> None:
        await asyncio.sleep(1.0)

    with caplog.at_level(logging.INFO, logger="fairbus.bus"):
        await connection.serve(body())
    messages = [r.getMessage() for r in caplog.records if r.name == "fairbus.bus"]
    assert messages[0] == "user-3: connected to 127.0.0.1:1883"
    assert messages[1].startswith("user-3: bus lost (Disconnected during message iteration)")
    assert 1 <= len(messages[2:]) <= 3, messages  # "still cannot reach", every 0.4 s
    assert all(m.startswith("user-3: still cannot reach the broker") for m in messages[2:])
    assert dropping.attempts > len(messages) + 3
