"""A wrong broker password against real brokers (Mosquitto and the embedded amqtt one,
both set up by ``fairbus broker``'s code from the roster and the keys): the participant's
bus fails at once with one line naming the login and the password file, instead of
retrying for ever; the right password still gets in.

The Mosquitto tests are marked ``services``: under CI=true a missing binary fails them,
elsewhere they skip (:func:`tests.conftest.find_service_binary`).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from fairbus.identity import (
    Identity,
    broker_password_path,
    new_broker_password,
    require_broker_password,
)
from fairbus.roster import Roster
from fairbus.runtime.connection import BrokerLoginError, BusConnection
from fairbus_broker.config import BrokerConfig
from fairbus_broker.mosquitto import MosquittoBroker
from fairbus_cli.errors import OPERATOR_EXIT
from fairbus_ledger_service.deployment import FAIRBUS_COMMAND
from fairbus_ledger_service.etcd_cluster import free_port
from tests.conftest import find_service_binary
from tests.integration.test_broker import running

USER = 3
OTHER = 4
BROKERS = [pytest.param("mosquitto", marks=pytest.mark.services), "embedded"]


def write_task(root: Path, identities: dict[int, Identity], roster: Roster) -> BrokerConfig:
    """Roster, keys (each with a broker password), a broker and a task configuration on
    one free port; returns the broker's."""
    (root / "roster.toml").write_text(roster.to_toml())
    for pid in roster:
        identities[pid].save(root / "keys")
        new_broker_password(root / "keys", pid)
    port = free_port()
    (root / "broker.toml").write_text(
        f'roster = "roster.toml"\nkeys = "keys"\ndata_dir = "broker"\nport = {port}\n'
        "persistence = false\n"
    )
    (root / "task.toml").write_text(
        f'roster = "roster.toml"\nkeys = "keys"\nstate = "state"\nbroker = "127.0.0.1:{port}"\n'
        "[training]\nthreads = 1\n"
    )
    return BrokerConfig.load(root / "broker.toml")


def use_wrong_password(keys: Path) -> Path:
    """User 3's password file now holds user 4's password (mode 0600 kept)."""
    path = broker_password_path(keys, USER)
    path.unlink()
    shutil.copy(broker_password_path(keys, OTHER), path)
    path.chmod(0o600)
    return path


def user_bus(host: str, port: int, keys: Path) -> BusConnection:
    return BusConnection(
        host,
        port,
        task="test-task",
        role="user",
        pid=USER,
        password=require_broker_password(keys, USER),
        password_file=broker_password_path(keys, USER),
        subscriptions=[],
        on_message=lambda topic, data: None,
        backoff=(0.05, 0.2),
    )


@pytest.mark.parametrize("kind", BROKERS)
async def test_a_wrong_password_fails_at_once_and_the_right_one_gets_in(
    kind: str, tmp_path: Path, identities: dict[int, Identity], roster: Roster
) -> None:
    config = write_task(tmp_path, identities, roster)
    async with running(kind, config) as (host, port):
        right = user_bus(host, port, config.keys)

        async def online() -> None:
            await right.connected.wait()

        # the right password gets in: connected within the timeout (else TimeoutError)
        async with asyncio.timeout(10):
            await right.serve(online())

        wrong_file = use_wrong_password(config.keys)
        wrong = user_bus(host, port, config.keys)
        async with asyncio.timeout(10):
            with pytest.raises(BrokerLoginError) as error:
                await wrong.serve(asyncio.sleep(60))
    message = str(error.value)
    assert f"refused the login 'user-{USER}'" in message and str(wrong_file) in message
    assert f"{host}:{port}" in message and "\n" not in message


@pytest.mark.services
def test_fairbus_user_with_a_wrong_password_exits_2_in_one_line(
    tmp_path: Path, identities: dict[int, Identity], roster: Roster
) -> None:
    """The real process (its logging on): stderr holds the one error line, nothing else."""
    binary = find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    config = write_task(tmp_path, identities, roster)
    argv = [*FAIRBUS_COMMAND, "user", "--id", str(USER), "--config", str(tmp_path / "task.toml")]
    with MosquittoBroker(config, binary=binary):
        wrong_file = use_wrong_password(config.keys)  # after the broker read the keys
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == OPERATOR_EXIT, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the broker at ")
    assert f"'user-{USER}'" in lines[0] and str(wrong_file) in lines[0]
