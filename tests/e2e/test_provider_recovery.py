"""kill -9 of the provider process, then a restart with the same identity: it rebuilds
its state from the ledger and training goes on (issue 14, item 1). Real processes: the
embedded broker, a ledger node on SQLite, the provider and nine users."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fairbus.identity import Identity
from fairbus.ledger.records import Block
from fairbus.protocol.provider import ProviderMachine
from fairbus.protocol.recovery import LedgerHistory, blobs_needed, replay
from fairbus.roster import Roster
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.local import CLI, LocalTask
from fairbus.runtime.provider import machine_config
from fairbus.training.models import initial_params
from fairbus_ledger_service.audit import read_export
from fairbus_ledger_service.blobs import BlobStore
from tests.conftest import find_service_binary
from tests.e2e.test_runtime import ATTACKS, ROUND_TIMEOUT, _audit, _check_rounds, _wait

pytestmark = pytest.mark.services

ROUNDS = 4


def _uploaded(task: LocalTask, round: int) -> bool:
    """Whether some user has uploaded in ``round`` (its stats say so)."""
    for user in range(1, task.users + 1):
        try:
            stats = json.loads((task.root / "state" / f"user-{user}" / "stats.json").read_text())
        except (OSError, ValueError):
            continue
        if stats["round"] == round:
            return True
    return False


def _model_the_ledger_implies(task: LocalTask) -> np.ndarray:
    """The global model after the last decided round, re-derived from the ledger node's
    blocks and blobs alone."""
    export = task.root / "blocks.export"
    subprocess.run([*CLI, "ledger", "export", "--config", str(task.root / "ledger-101.toml"),
                    "--out", str(export)], check=True, capture_output=True, timeout=60)  # fmt: skip
    roster = Roster.load(task.root / "roster.toml")
    txs = [tx for data in read_export(export) for tx in Block.from_bytes(data).txs]
    replayed = replay(roster, LedgerHistory.of(txs))
    store = BlobStore(task.root / "node-101" / "blobs")
    blobs = {d: store.get(d) for d in blobs_needed(replayed, roster.provider)}
    config = RuntimeConfig.load(task.config)
    t = config.training
    machine = ProviderMachine.restore(
        Identity.load(task.root / "keys", roster.provider), roster,
        initial_params(t.model_name, t.seed), machine_config(config), replayed, blobs,
    )  # fmt: skip
    return machine.global_params


@pytest.mark.parametrize("when", ["negotiation", "upload", "between-rounds"])
def test_a_provider_killed_mid_task_is_restarted_and_training_goes_on(
    tmp_path: Path, when: str
) -> None:
    epochs = 40 if when == "negotiation" else 2
    with LocalTask(tmp_path, 9, ROUNDS, ATTACKS, store="sqlite", broker="embedded",
                   training={"local_epochs": epochs}) as task:  # fmt: skip
        task.wait_for_round(1, ROUND_TIMEOUT)
        if when == "negotiation":
            time.sleep(0.3)  # round 2 announced, models still training
        elif when == "upload":
            _wait(lambda: _uploaded(task, 2), ROUND_TIMEOUT, "an upload in round 2")
        task.kill(0)
        task.start_provider()
        records = task.wait_for_round(ROUNDS, ROUNDS * ROUND_TIMEOUT)
        numbers = [int(r["round"]) for r in records]  # type: ignore[call-overload]
        # none decided twice, none lost (a round that failed on a busy machine is
        # retried under the next number)
        assert len(numbers) == ROUNDS and numbers == sorted(set(numbers)), numbers
        _check_rounds(records, ROUNDS)
        log = (tmp_path / "participant-0.log").read_text()
        assert "resuming task" in log
        _audit(task)
        final = np.load(tmp_path / "state" / "provider" / "global_model.npy")
        assert np.array_equal(final, _model_the_ledger_implies(task))


def test_a_standby_takes_over_when_the_active_provider_dies(tmp_path: Path) -> None:
    """Two provider processes elect the active one through etcd; kill -9 of the active
    one mid-task: the standby (data and model loaded, waiting for the lease) takes over
    from the ledger within seconds, and training completes every round."""
    find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    find_service_binary("etcd", "/usr/bin/etcd")
    rounds = ROUNDS + 2  # rounds long enough for the standby to load before the end
    with LocalTask(tmp_path, 9, rounds, ATTACKS, store="etcd", broker="mosquitto",
                   standby=True, training={"local_epochs": 20}) as task:  # fmt: skip
        first = tmp_path / "participant-0.log"
        _wait(lambda: "elected the active provider" in first.read_text(), ROUND_TIMEOUT,
              "the first provider elected")  # fmt: skip
        task.start_standby()
        standby = tmp_path / "participant-standby.log"
        _wait(lambda: "waiting for its lease" in standby.read_text(), ROUND_TIMEOUT,
              "the standby")  # fmt: skip
        task.wait_for_round(1, ROUND_TIMEOUT)
        assert len(task.rounds_done()) < rounds, "the task ended before the kill"
        killed = time.monotonic()
        task.kill(0)
        _wait(lambda: "resuming task" in standby.read_text(), 60.0, "the takeover")
        assert time.monotonic() - killed < 30.0  # `fairbus bench failover` measures it
        records = task.wait_for_round(rounds, rounds * ROUND_TIMEOUT)
        numbers = [int(r["round"]) for r in records]  # type: ignore[call-overload]
        assert len(numbers) == rounds and numbers == sorted(set(numbers)), numbers
        _check_rounds(records, rounds)
        assert f"round {numbers[-1]}: accuracy" in standby.read_text()  # it finished the task
        _audit(task)
        final = np.load(tmp_path / "state" / "provider" / "global_model.npy")
        assert np.array_equal(final, _model_the_ledger_implies(task))
