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
from fairbus.runtime.failpoints import ENV, KILLED
from fairbus.runtime.local import CLI, STANDBY, LocalTask
from fairbus.runtime.provider import machine_config
from fairbus.training.models import initial_params
from fairbus_ledger_service.audit import read_export
from fairbus_ledger_service.blobs import BlobStore
from tests.conftest import find_service_binary
from tests.e2e.test_runtime import ATTACKS, ROUND_TIMEOUT, _audit, _check_rounds, _wait

pytestmark = pytest.mark.services

ROUNDS = 3


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


def _finished(task: LocalTask, providers: list[int], rounds: int) -> list[dict[str, object]]:
    """Wait for the provider processes to finish the task; its round records, checked:
    none twice, every round the ledger decided (a round decided just before a kill may
    have no line in rounds.jsonl: the ledger is the record)."""
    for key in providers:
        task.processes[key].wait(timeout=rounds * ROUND_TIMEOUT)
    records = task.rounds_done()
    numbers = [int(r["round"]) for r in records]  # type: ignore[call-overload]
    assert numbers == sorted(set(numbers)) and len(numbers) >= rounds - 1, numbers
    _check_rounds(records, len(records))
    return records


def _model_the_ledger_implies(task: LocalTask, rounds: int) -> np.ndarray:
    """The global model after the last decided round, re-derived from the ledger node's
    blocks and blobs alone (which must show ``rounds`` rounds decided)."""
    export = task.root / "blocks.export"
    subprocess.run([*CLI, "ledger", "export", "--config", str(task.root / "ledger-101.toml"),
                    "--out", str(export)], check=True, capture_output=True, timeout=60)  # fmt: skip
    roster = Roster.load(task.root / "roster.toml")
    txs = [tx for data in read_export(export) for tx in Block.from_bytes(data).txs]
    replayed = replay(roster, LedgerHistory.of(txs))
    assert replayed.decided_rounds == rounds
    store = BlobStore(task.root / "node-101" / "blobs")
    blobs = {d: store.get(d) for d in blobs_needed(replayed, roster.provider)}
    config = RuntimeConfig.load(task.config)
    t = config.training
    machine = ProviderMachine.restore(
        Identity.load(task.root / "keys", roster.provider), roster,
        initial_params(t.model_name, t.seed), machine_config(config), replayed, blobs,
    )  # fmt: skip
    return machine.global_params


FAILPOINTS = {"announcement": "announce:2", "evaluation": "evaluation:2", "decision": "decision:2"}
"""Phases too short to hit with a signal: the provider dies right after the ledger
commits that transaction of round 2, before publishing it (:mod:`fairbus.runtime.
failpoints`)."""


@pytest.mark.parametrize("when", ["announcement", "negotiation", "upload", "evaluation",
                                  "decision"])  # fmt: skip
def test_a_provider_killed_mid_task_is_restarted_and_training_goes_on(
    tmp_path: Path, when: str
) -> None:
    epochs = 40 if when == "negotiation" else 2
    crash = {ENV: FAILPOINTS[when]} if when in FAILPOINTS else {}
    with LocalTask(tmp_path, 9, ROUNDS, ATTACKS, store="sqlite", broker="embedded",
                   training={"local_epochs": epochs}, provider_env=crash) as task:  # fmt: skip
        task.wait_for_round(1, ROUND_TIMEOUT)
        if when == "negotiation":
            time.sleep(0.3)  # round 2 announced, models still training
        elif when == "upload":
            _wait(lambda: _uploaded(task, 2), ROUND_TIMEOUT, "an upload in round 2")
        if crash:
            assert task.provider_process.wait(ROUND_TIMEOUT) == KILLED
        else:
            task.kill(0)
        task.start_provider()
        _finished(task, [0], ROUNDS)
        log = (tmp_path / "participant-0.log").read_text()
        assert "resuming task" in log
        _audit(task)
        final = np.load(tmp_path / "state" / "provider" / "global_model.npy")
        assert np.array_equal(final, _model_the_ledger_implies(task, ROUNDS))


def test_a_standby_takes_over_when_the_active_provider_dies(tmp_path: Path) -> None:
    """Two provider processes elect the active one through etcd; kill -9 of the active
    one mid-task: the standby (data and model loaded, waiting for the lease) takes over
    from the ledger within seconds, and training completes every round."""
    find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    find_service_binary("etcd", "/usr/bin/etcd")
    rounds = ROUNDS + 2
    with LocalTask(tmp_path, 9, rounds, ATTACKS, store="etcd", broker="mosquitto",
                   standby=True, training={"local_epochs": 20}) as task:  # fmt: skip
        task.start_standby()
        logs = {0: tmp_path / "participant-0.log", STANDBY: tmp_path / "participant-standby.log"}

        def holding(text: str) -> list[int]:
            return [k for k, path in logs.items() if path.exists() and text in path.read_text()]

        _wait(lambda: holding("elected the active provider"), ROUND_TIMEOUT, "an election")
        (active,) = holding("elected the active provider")
        spare = STANDBY if active == 0 else 0
        _wait(lambda: spare in holding("waiting for its lease"), ROUND_TIMEOUT, "the standby")
        task.wait_for_round(1, ROUND_TIMEOUT)
        assert len(task.rounds_done()) < rounds, "the task ended before the kill"
        killed = time.monotonic()
        task.kill(active)
        _wait(lambda: spare in holding("resuming task"), 60.0, "the takeover")
        assert time.monotonic() - killed < 30.0  # `fairbus bench failover` measures it
        records = _finished(task, [spare], rounds)
        assert f"round {records[-1]['round']}: accuracy" in logs[spare].read_text()
        _audit(task)
        final = np.load(tmp_path / "state" / "provider" / "global_model.npy")
        assert np.array_equal(final, _model_the_ledger_implies(task, rounds))
