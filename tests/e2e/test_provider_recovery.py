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
from fairbus.roster import Role, Roster
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.failpoints import ENV, KILLED
from fairbus.runtime.local import CLI, STANDBY, LocalTask
from fairbus.runtime.provider import load_task_data, machine_config
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
        initial_params(t.model_name, t.seed),
        machine_config(config, load_task_data(config), len(roster.with_role(Role.USER))),
        replayed, blobs,
    )  # fmt: skip
    return machine.global_params


PHASES = ["negotiation", "upload", "announcement", "evaluation", "decision"]
"""The phases the provider dies in, one kill per round from :data:`FIRST_KILL` on, in
one deployment (ten deployments would cost CI ten start-ups)."""

FAILPOINTS = {
    "announcement": "announce",  # committed, never published
    "negotiation": "published-announce",  # the users have it and go on without a provider
    "evaluation": "evaluation",
    "decision": "decision",
}
"""Phases too short to hit with a signal: the provider dies right after the ledger
commits that transaction of the round (:mod:`fairbus.runtime.failpoints`)."""

FIRST_KILL = 2
ROUNDS_WITH_KILLS = FIRST_KILL + len(PHASES)


def _failpoint(kill: int) -> dict[str, str] | None:
    """The environment of the provider process that is to die in kill number ``kill``
    (0-based): a failpoint for its phase, or none (a signal, or no kill left)."""
    if kill >= len(PHASES) or PHASES[kill] not in FAILPOINTS:
        return None
    return {ENV: f"{FAILPOINTS[PHASES[kill]]}:{FIRST_KILL + kill}"}


def _die(task: LocalTask, provider: int, kill: int) -> None:
    """Have the active provider process ``provider`` die in phase ``PHASES[kill]`` of
    round ``FIRST_KILL + kill``: by its failpoint, or by kill -9 once a user uploaded."""
    phase, round = PHASES[kill], FIRST_KILL + kill
    if phase in FAILPOINTS:
        code = task.processes[provider].wait(ROUND_TIMEOUT)
        assert code == KILLED, f"the provider did not die at its {phase} failpoint: {code}"
        return
    _wait(lambda: _uploaded(task, round), ROUND_TIMEOUT, f"an upload in round {round}")
    task.kill(provider)


def _resumed(task: LocalTask) -> int:
    return sum(p.read_text().count("resuming task") for p in task.root.glob("participant-*.log"))


def test_a_provider_killed_in_each_phase_is_restarted_and_training_goes_on(
    tmp_path: Path,
) -> None:
    """kill -9 of the provider in every phase, a round each; each time a restart with
    the same identity rebuilds it from the ledger. Every round completes, none is
    decided twice, and the final model is the one the ledger implies."""
    with LocalTask(tmp_path, 9, ROUNDS_WITH_KILLS, ATTACKS, store="sqlite",
                   broker="embedded",
                   provider_env=_failpoint(0) or {}) as task:  # fmt: skip
        for kill, phase in enumerate(PHASES):
            _die(task, 0, kill)
            task.start_provider(_failpoint(kill + 1))
            _wait(lambda: _resumed(task) > kill, ROUND_TIMEOUT, f"a resume after {phase}")  # noqa: B023
        _finished(task, [0], ROUNDS_WITH_KILLS)
        _the_final_model_is_the_ledgers(task, ROUNDS_WITH_KILLS)


def test_a_standby_takes_over_whenever_the_active_provider_dies(tmp_path: Path) -> None:
    """Provider 0 is elected the active one through etcd, then a standby starts (data
    and model loaded, waiting for the lease), then the users. The active provider dies
    in every phase, a round each; each time the standby takes over from the ledger
    within seconds and the dead one comes back as the next standby. Every round
    completes, none is decided twice, and the final model is the one the ledger
    implies."""
    find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    find_service_binary("etcd", "/usr/bin/etcd")
    logs = {0: tmp_path / "participant-0.log", STANDBY: tmp_path / "participant-standby.log"}
    with LocalTask(tmp_path, 9, ROUNDS_WITH_KILLS, ATTACKS, store="etcd", broker="mosquitto",
                   standby=True,
                   provider_env=_failpoint(0) or {}, defer_users=True) as task:  # fmt: skip
        _wait(lambda: "elected the active provider" in logs[0].read_text(), ROUND_TIMEOUT,
              "provider 0's election")  # fmt: skip
        # Process k dies in kill k: the first standby in kill 1, and each one started
        # after kill k - 1 (the dead one back as a standby) in kill k + 1.
        task.start_standby(STANDBY, _failpoint(1))
        waiting = "waiting for its lease"
        _wait(lambda: logs[STANDBY].exists() and waiting in logs[STANDBY].read_text(),
              ROUND_TIMEOUT, "the standby")  # fmt: skip
        task.start_users()
        active, spare = 0, STANDBY  # the dead one restarts as participant-<key>-standby.log
        for kill, phase in enumerate(PHASES):
            _die(task, active, kill)
            died = time.monotonic()
            _wait(lambda: _resumed(task) > kill, 60.0, f"the takeover after {phase}")  # noqa: B023
            assert time.monotonic() - died < 30.0, phase  # `fairbus bench failover` measures it
            task.start_standby(active, _failpoint(kill + 2))
            active, spare = spare, active
        records = _finished(task, [active], ROUNDS_WITH_KILLS)
        last = f"round {records[-1]['round']}: accuracy"
        assert any(last in log.read_text() for log in tmp_path.glob("participant-*standby.log"))
        _the_final_model_is_the_ledgers(task, ROUNDS_WITH_KILLS)


def _the_final_model_is_the_ledgers(task: LocalTask, rounds: int) -> None:
    _audit(task)
    final = np.load(task.root / "state" / "provider" / "global_model.npy")
    assert np.array_equal(final, _model_the_ledger_implies(task, rounds))
