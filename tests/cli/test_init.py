"""``fairbus init DIR``: the task it writes passes ``fairbus roster check``, every secret is
0600 in a 0700 folder, every configuration loads with its command's own loader and
matches configs/fairbus.example.toml, the systemd files fit the units in systemd/; an
operator's mistake is one line and exit status 2; and the task runs: the real broker
(embedded amqtt), a ledger node, the provider and 3 users, each its own ``fairbus``
process started from the files ``init`` wrote, train a round on digits that
``fairbus audit`` then checks."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fairbus.identity import Identity, load_broker_password
from fairbus.roster import Role, Roster
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.local import CLI
from fairbus_broker.config import BrokerConfig
from fairbus_cli import init as init_module
from fairbus_cli.errors import OPERATOR_EXIT
from fairbus_cli.main import app
from fairbus_ledger_service.config import LedgerConfig
from fairbus_ledger_service.deployment import stop_processes, wait_for_port
from fairbus_ledger_service.etcd_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
ROUND_TIMEOUT = 90.0
runner = CliRunner()


def fairbus(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``fairbus`` command in its own process."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused ``fairbus init`` printed: exit 2, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == OPERATOR_EXIT, output
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("cannot initialise the task: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def default_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fairbus init`` with every default: 9 users, 3 ledger nodes on etcd."""
    task = tmp_path_factory.mktemp("init") / "digits-task"
    result = fairbus("init", str(task))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fairbus provider --config" in result.stdout  # the next commands
    return task


# --- what it writes ---------------------------------------------------------------------------


def test_init_output_passes_roster_check(default_task: Path) -> None:
    result = fairbus("roster", "check", str(default_task / "roster.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "digits-task" in result.stdout
    roster = Roster.load(default_task / "roster.toml")
    assert roster.task == "digits-task" and roster.provider == 0
    assert roster.with_role(Role.USER) == list(range(1, 10))
    assert roster.with_role(Role.LEDGER) == [101, 102, 103]
    assert roster.with_role(Role.ADMIN) == [200]


def test_every_identity_has_its_secrets_in_0600_files(default_task: Path) -> None:
    keys = default_task / "keys"
    roster = Roster.load(default_task / "roster.toml")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE(default_task.stat().st_mode) == 0o700  # it holds the keys
    files = sorted(keys.iterdir())
    assert len(files) == 3 * len(roster)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    secrets = set()
    for pid in roster:
        identity = Identity.load(keys, pid)
        assert identity.public.verify_hex == roster[pid].identity.verify_hex
        assert identity.public.box_hex == roster[pid].identity.box_hex
        password = load_broker_password(keys, pid)
        assert password is not None
        secrets |= {bytes(identity.signing_key), bytes(identity.box_key), password.encode()}
    assert len(secrets) == 3 * len(roster)  # fresh, never one secret twice


def test_configurations_load_with_their_commands_loaders(default_task: Path) -> None:
    broker = BrokerConfig.load(default_task / "broker.toml")
    assert (broker.host, broker.port, broker.persistence) == ("127.0.0.1", 1883, True)
    assert broker.roster == default_task / "roster.toml"
    assert broker.keys == default_task / "keys"
    assert broker.data_dir == default_task / "state" / "broker"
    for node in (101, 102, 103):
        ledger = LedgerConfig.load(default_task / f"ledger-{node}.toml")
        assert ledger.store == "etcd" and ledger.broker == ("127.0.0.1", 1883)
        assert ledger.etcd == (("127.0.0.1", 2379), ("127.0.0.1", 22379), ("127.0.0.1", 32379))
        assert ledger.blobs == default_task / "state" / f"ledger-{node}" / "blobs"
    assert not list(default_task.glob("ledger-104.toml"))

    ours = RuntimeConfig.load(default_task / "task.toml")
    example = RuntimeConfig.load(REPO / "configs" / "fairbus.example.toml")
    assert ours.state == default_task / "state" and ours.keys == default_task / "keys"
    assert ours.roster == default_task / "roster.toml"
    for setting in ("broker", "training", "provider", "detection", "collusion", "ledger_timeout"):
        assert getattr(ours, setting) == getattr(example, setting), setting


def test_systemd_files_fit_the_units(default_task: Path) -> None:
    """An environment file per unit instance naming its configuration (where the task
    is installed, /etc/fairbus), and per unit of systemd/ a drop-in whose command is the
    unit's own with that configuration."""
    folder = default_task / "systemd"
    instances = {
        "fairbus-provider": "task.toml",
        **{f"fairbus-user@{u}": "task.toml" for u in range(1, 10)},
        **{f"fairbus-ledger@{n}": f"ledger-{n}.toml" for n in (101, 102, 103)},
    }
    assert sorted(p.name for p in folder.glob("*.env")) == sorted(f"{i}.env" for i in instances)
    for instance, config in instances.items():
        lines = (folder / f"{instance}.env").read_text().splitlines()
        assert f"FAIRBUS_CONFIG=/etc/fairbus/{config}" in lines
        assert (default_task / config).is_file()
    units = sorted(p.name for p in (REPO / "systemd").glob("*.service"))
    drop_ins = sorted(
        p.parent.name.removesuffix(".d") for p in folder.glob("*.service.d/fairbus-init.conf")
    )
    assert drop_ins == units
    for unit in units:
        (exec_start,) = re.findall(r"^ExecStart=(.+)$", (REPO / "systemd" / unit).read_text(), re.M)
        text = (folder / f"{unit}.d" / "fairbus-init.conf").read_text()
        assert "EnvironmentFile=/etc/fairbus/systemd/%N.env" in text.splitlines()
        ours = re.findall(r"^ExecStart=(.*)$", text, re.M)
        assert ours[0] == ""  # clears the unit's, then sets one
        assert ours[1] == re.sub(r"--config \S+", "--config ${FAIRBUS_CONFIG}", exec_start)
    readme = (default_task / "README.txt").read_text()
    for command in ("fairbus broker --config broker.toml", "fairbus ledger --node N",
                    "fairbus provider --config task.toml", "fairbus user --id N"):  # fmt: skip
        assert command in readme


def test_options_shape_the_task(tmp_path: Path) -> None:
    task = tmp_path / "t"
    result = runner.invoke(
        app,
        ["init", str(task), "--users", "4", "--ledger-nodes", "1", "--store", "sqlite",
         "--task", "small", "--broker-host", "bus.example.org", "--broker-port", "8883",
         "--rounds", "2", "--local-epochs", "3", "--threads", "1",
         "--state-dir", "/var/lib/fairbus"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    roster = Roster.load(task / "roster.toml")
    assert roster.task == "small" and sorted(roster) == [0, 1, 2, 3, 4, 101, 200]
    broker = BrokerConfig.load(task / "broker.toml")
    assert (broker.host, broker.port) == ("0.0.0.0", 8883)  # reachable from the others
    assert broker.data_dir == Path("/var/lib/fairbus/broker")
    ledger = LedgerConfig.load(task / "ledger-101.toml")
    assert ledger.store == "sqlite" and ledger.broker == ("bus.example.org", 8883)
    assert ledger.sqlite == Path("/var/lib/fairbus/ledger-101/ledger.sqlite")
    config = RuntimeConfig.load(task / "task.toml")
    assert config.broker == ("bus.example.org", 8883)
    assert config.state == Path("/var/lib/fairbus")
    assert (config.provider.rounds, config.training.train.local_epochs) == (2, 3)
    assert config.training.threads == 1
    # the units may write there already: no extra ReadWritePaths in the drop-ins
    drop_in = (task / "systemd" / "fairbus-user@.service.d" / "fairbus-init.conf").read_text()
    assert "ReadWritePaths" not in drop_in


# --- operator mistakes ------------------------------------------------------------------------


def test_a_folder_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "keys").mkdir()
    (task / "keys" / "0.sign.key").write_text("precious\n")
    line = one_error_line(fairbus("init", str(task)))
    assert f"{task} is not empty" in line
    assert (task / "keys" / "0.sign.key").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no staging left


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    task = tmp_path / "empty"
    task.mkdir()
    result = runner.invoke(app, ["init", str(task), "--users", "3"])
    assert result.exit_code == 0, result.output
    assert (task / "roster.toml").is_file() and (task / "keys" / "3.mqtt.key").is_file()


def test_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    """Under a regular file (not a folder: refused to root as well)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    line = one_error_line(fairbus("init", str(blocker / "task")))
    assert line.endswith(f"{blocker} is not a folder"), line


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--store", "sqlite"], "a sqlite ledger has exactly one node"),
        (["--etcd", "no-port"], "--etcd 'no-port' is not host:port"),
        (["--dataset", "imagenet"], "--dataset 'imagenet'"),
        (["--model", "resnet"], "--model 'resnet'"),
        (["--task", "no spaces"], "task 'no spaces' must be"),
        (["--install-dir", "etc/fairbus"], "must be an absolute path"),
    ],
)
def test_inconsistent_options_are_one_line(tmp_path: Path, options: list[str], says: str) -> None:
    result = runner.invoke(app, ["init", str(tmp_path / "task"), *options])
    assert result.exit_code == OPERATOR_EXIT, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.output
    assert not (tmp_path / "task").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk after the keys are written: no half-made task, no staging folder."""

    def full(root: Path, plan: init_module.Plan) -> None:
        assert (root / "keys" / "0.sign.key").is_file()  # got that far
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(init_module, "_read_back", full)
    result = runner.invoke(app, ["init", str(tmp_path / "task")])
    assert result.exit_code == OPERATOR_EXIT, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# --- it runs a task ---------------------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield started
    finally:
        stop_processes(started.values())


def test_init_output_runs_a_task(
    tmp_path: Path, processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    """One round of 3 users on digits, every participant a ``fairbus`` process reading
    only what ``fairbus init`` wrote: the broker (embedded, the roster's logins and ACL),
    ledger node 101 (SQLite), the provider and users 1-3."""
    task, port, users = tmp_path / "task", free_port(), (1, 2, 3)
    made = fairbus(
        "init", str(task), "--users", "3", "--ledger-nodes", "1", "--store", "sqlite",
        "--rounds", "1", "--local-epochs", "1", "--threads", "1",
        "--broker-port", str(port),
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 — the child's
        processes[name] = subprocess.Popen([*CLI, *args], stdout=log, stderr=log)
        return processes[name]

    broker = start("broker", "broker", "--embedded", "--config", str(task / "broker.toml"))
    wait_for_port(port, broker, timeout=30)
    start("ledger", "ledger", "--node", "101", "--config", str(task / "ledger-101.toml"))
    provider = start("provider", "provider", "--config", str(task / "task.toml"))
    for user in users:
        start(f"user-{user}", "user", "--id", str(user), "--config", str(task / "task.toml"))

    rounds = task / "state" / "provider" / "rounds.jsonl"
    deadline = time.monotonic() + ROUND_TIMEOUT
    while provider.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log"))
    assert provider.returncode == 0, logs  # it exits when its rounds are done
    (record,) = [json.loads(line) for line in rounds.read_text().splitlines() if line]
    assert record["round"] == 1 and record["failed"] is None, record
    assert {m for g in record["groups"] for m in g["members"]} == set(users)
    assert all(len(g["members"]) >= 3 for g in record["groups"])
    assert record["excluded"] == [] and record["dropped"] == []

    audit = fairbus("audit", "--config", str(task / "ledger-101.toml"))
    assert audit.returncode == 0 and "audit: OK" in audit.stdout, audit.stdout + audit.stderr
    for name in ("broker", "ledger", *(f"user-{u}" for u in users)):
        assert processes[name].poll() is None, f"{name} stopped: {logs}"
    assert os.listdir(task / "state" / "ledger-101" / "blobs")  # the node kept the uploads
