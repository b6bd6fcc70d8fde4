"""A provider rebuilt from the ledger (issue 14, item 1): the real machines and the
ledger's own rules over an in-memory network, the provider replaced mid-task by one
:meth:`ProviderMachine.restore` builds from the recorded transactions and blobs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fairbus import envelope
from fairbus.aggregation import CleanGroupAverage
from fairbus.envelope import GENESIS
from fairbus.ledger.records import Transaction
from fairbus.protocol.events import (
    PROVIDER,
    CloseAttempt,
    Commit,
    Evaluate,
    RoundDone,
    StartRound,
    Tick,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig, ProviderMachine, ProviderPhase
from fairbus.protocol.recovery import LedgerHistory, RecoveryError, replay
from fairbus.task import DEFAULT_DETECTION
from fairbus.wire.messages import Announce, Decision, Dropout
from tests.support_machines import Driver, Task, initial_model, kinds, make_task, of_type

CONFIG = ProviderConfig(seed=3)
BY_RANK = ProviderConfig(seed=3, strategy=CleanGroupAverage(rank_margin=0.3))
ALONG_LAST_STEP = ProviderConfig(
    seed=3, detection=dataclasses.replace(DEFAULT_DETECTION, contribution_direction="last_step")
)


def _accuracy(effect: Evaluate) -> float:
    """Differs from group to group (so Alg. 6 has something to find), the same on
    every run for the same group model."""
    return round(0.95 - 40 * float(np.abs(effect.params).mean() - 0.25) ** 2, 6)


def _transactions(task: Task, drop_last: int = 0) -> list[Transaction]:
    txs = [tx for block in task.ledger.blocks for tx in block.txs]
    return txs[: len(txs) - drop_last]


def _blobs(driver: Driver) -> dict[bytes, bytes]:
    """Every model-sized payload committed so far, as the ledger nodes' blob stores hold."""
    return {
        c.envelope.header.payload_sha256: c.envelope.payload
        for c in of_type((out for _, out in driver.log), Commit)
    }


def _restore(
    driver: Driver, drop_last: int = 0, config: ProviderConfig = CONFIG
) -> ProviderMachine:
    task = driver.task
    history = LedgerHistory.of(_transactions(task, drop_last))
    replayed = replay(task.roster, history)
    return ProviderMachine.restore(
        task.provider_identity, task.roster, initial_model(), config, replayed, _blobs(driver),
        online=driver.online,
    )  # fmt: skip


def test_a_restored_provider_goes_on_exactly_as_the_uninterrupted_one() -> None:
    """Four rounds straight, and two rounds, a restore from the ledger, two more: the
    same groupings, decisions and global models bit for bit."""
    straight = Driver(make_task(9, config=CONFIG), accuracy=_accuracy)
    expected = [straight.play_round(float(r)) for r in range(4)]

    driver = Driver(make_task(9, config=CONFIG), accuracy=_accuracy)
    for r in range(2):
        driver.play_round(float(r))
    original = driver.task.provider
    restored = _restore(driver)
    assert restored.next_round == 3 and restored.phase is ProviderPhase.IDLE
    assert np.array_equal(restored.global_params, original.global_params)
    assert (restored.excluded, restored.key_users) == (original.excluded, original.key_users)
    assert restored.prev == original.prev != GENESIS
    assert all(restored.chain_head(u) == original.chain_head(u) for u in range(1, 10))
    driver.task.provider = restored
    got = [driver.play_round(float(r)) for r in range(2, 4)]
    for want, have in zip(expected[2:], got, strict=True):
        assert [g.members for g in have.groups] == [g.members for g in want.groups]
        assert (have.key_users, have.violators) == (want.key_users, want.violators)
        assert np.array_equal(have.global_params, want.global_params)
    assert driver.refusals() == []


def _at_chance(effect: Evaluate) -> float:
    """Every group model near a guess, so the aggregation chooses by rank."""
    return round(0.1 + float(np.abs(effect.params).mean()) % 0.05, 6)


def _rank(effect: Evaluate) -> float:
    """Differs from group to group, the same on every run for the same group model."""
    return round(4.5 - 8 * float(np.abs(effect.params).mean() - 0.25) ** 2, 6)


def test_a_restored_provider_aggregates_by_the_recorded_ranks_as_the_uninterrupted_one() -> None:
    """While every group is at chance the best-ranked clean group alone makes the
    global model; the ranks are on the ledger, so the restored provider's models are
    the uninterrupted one's, also when it redoes a decision (the ledger before it)."""
    straight = Driver(make_task(9, config=BY_RANK), accuracy=_at_chance, rank=_rank)
    expected = [straight.play_round(float(r)) for r in range(3)]
    unranked = Driver(make_task(9, config=BY_RANK), accuracy=_at_chance)
    other = [unranked.play_round(float(r)) for r in range(3)]
    assert not np.array_equal(other[0].global_params, expected[0].global_params)

    driver = Driver(make_task(9, config=BY_RANK), accuracy=_at_chance, rank=_rank)
    driver.play_round(0.0)
    driver.play_round(1.0)
    restored = _restore(driver, drop_last=1, config=BY_RANK)  # round 2's decision redone
    (redone,) = of_type(restored.handle(StartRound(2.0)), RoundDone)
    assert np.array_equal(redone.global_params, expected[1].global_params)
    driver.task.provider = restored
    have = driver.play_round(3.0)
    assert np.array_equal(have.global_params, expected[2].global_params)
    assert driver.refusals() == []


def test_a_round_evaluated_but_not_decided_is_decided_as_the_ledger_would() -> None:
    """The provider died between its evaluation and its decision: the restored one
    commits the decision Alg. 6 gives on the recorded evaluation, and the same model."""
    driver = Driver(make_task(9, config=CONFIG), accuracy=_accuracy)
    driver.play_round(0.0)
    done = driver.play_round(1.0)
    decision = driver.commits("decision")[-1]
    restored = _restore(driver, drop_last=1)  # the ledger as it was before the decision
    assert restored.next_round == 2
    out = restored.handle(StartRound(2.0))
    assert kinds(out) == ["Commit:decision", "RoundDone"]
    again = envelope.verify(of_type(out, Commit)[0].envelope, driver.task.roster).message
    want = envelope.verify(decision.envelope, driver.task.roster).message
    assert isinstance(again, Decision) and again == want
    (redone,) = of_type(out, RoundDone)
    assert np.array_equal(redone.global_params, done.global_params)


def _killed_while_collecting(late: set[int], config: ProviderConfig = CONFIG) -> Driver:
    """Round 1 played; round 2 announced and the users in ``late`` still training when
    the provider dies (kill -9: what was on its way to it is lost); the provider is
    replaced by one restored from the ledger."""
    driver = Driver(make_task(9, config=config), accuracy=_accuracy)
    driver.play_round(0.0)
    driver.hold = lambda target, event: target in late and isinstance(event, Trained)
    driver.handle(PROVIDER, StartRound(1.0))
    driver.pump()
    recorded = driver.task.ledger.uploads(2, 0)
    assert not {u for _, u in recorded} & late
    driver.queue = type(driver.queue)(e for e in driver.queue if e[0] != PROVIDER)
    restored = _restore(driver, config=config)
    assert restored.next_round == 2
    driver.task.provider = restored
    return driver


def test_an_attempt_with_recorded_uploads_collects_the_rest_after_a_restore() -> None:
    """The provider died with some uploads of round 2 recorded and others not made yet:
    the restored one decrypts the groups complete on the ledger from its blobs, takes
    the late users' uploads as they come, and finishes the round on the same attempt,
    with the model the uninterrupted run gives."""
    late = {1, 4, 7}
    straight = Driver(make_task(9, config=ALONG_LAST_STEP), accuracy=_accuracy)
    straight.play_round(0.0)
    want = straight.play_round(1.0)
    driver = _killed_while_collecting(late, ALONG_LAST_STEP)
    since = len(driver.log)
    out = driver.handle(PROVIDER, StartRound(2.0))
    complete = [g for g in _announce(driver, 0).groups if not set(g.members) & late]
    assert complete and kinds(out) == ["Evaluate"] * len(complete)
    assert driver.task.provider.phase is ProviderPhase.COLLECTING
    driver.pump()
    driver.hold = lambda target, event: False
    driver.release()  # the late users' models, uploaded to attempt 0
    done = driver.round_done(since)
    assert (done.round, done.attempts) == (2, 1) and not driver.commits("dropout")
    assert np.array_equal(done.global_params, want.global_params)
    # its contributions are measured along the step from round 1's recorded model, as the
    # uninterrupted provider's were
    again, first = (envelope.verify(d.commits("evaluation")[-1].envelope, d.task.roster).message
                    for d in (driver, straight))  # fmt: skip
    assert again == first
    assert driver.refusals() == []
    replay(driver.task.roster, LedgerHistory.of(_transactions(driver.task)))  # all rules hold


def test_a_restored_attempt_drops_who_never_uploads_at_a_fresh_deadline() -> None:
    """The late users never upload (they died with the provider): the restored
    provider's fresh phase deadline drops them with a dropout naming them, and the
    survivors finish the round on a new attempt with fresh keys."""
    late = {1, 4, 7}
    driver = _killed_while_collecting(late, ProviderConfig(seed=3, phase_timeout=30.0))
    driver.online -= late
    driver.held = []
    driver.hold = lambda target, event: False
    since = len(driver.log)
    driver.handle(PROVIDER, StartRound(50.0))
    driver.pump()
    assert driver.handle(PROVIDER, Tick(79.0)) == []  # 30 s from the restart
    out = driver.handle(PROVIDER, Tick(81.0))
    assert kinds(out) == ["Commit:dropout", "CloseAttempt"]
    body = envelope.verify(of_type(out, Commit)[0].envelope, driver.task.roster).message
    assert isinstance(body, Dropout) and set(body.users) == late
    driver.pump()
    done = driver.round_done(since)
    assert done.round == 2 and done.attempts >= 2 and done.dropped == late
    assert all(not set(g.members) & late for g in done.groups)
    replay(driver.task.roster, LedgerHistory.of(_transactions(driver.task)))


def test_an_attempt_nobody_uploaded_to_is_closed_and_regrouped_with_fresh_keys() -> None:
    """The provider died before any upload of round 2 was recorded (the users may never
    have seen the announcement): the restored one closes the attempt at once (a
    dropout naming nobody, voiding every group) and regroups with fresh keys; the users
    finish the round on the new attempt."""
    everyone = set(range(1, 10))
    driver = _killed_while_collecting(everyone)
    since = len(driver.log)
    out = driver.handle(PROVIDER, StartRound(2.0))
    assert kinds(out) == ["Commit:dropout", "CloseAttempt"]
    assert of_type(out, CloseAttempt)[0] == CloseAttempt(2, 0)
    body = envelope.verify(of_type(out, Commit)[0].envelope, driver.task.roster).message
    assert isinstance(body, Dropout) and body.users == ()
    assert body.voided_groups == tuple(sorted(g.gid for g in _announce(driver, 0).groups))
    driver.pump()  # the dropout and the new announcement reach the users
    assert [a.envelope.header.attempt for a in driver.commits("announce")][-1] == 1
    driver.hold = lambda target, event: False
    driver.release()  # the trained models: uploaded to the new attempt only
    done = driver.round_done(since)
    assert done.round == 2 and done.attempts == 2
    assert driver.refusals() == []
    replay(driver.task.roster, LedgerHistory.of(_transactions(driver.task)))


def test_a_restore_with_other_task_parameters_is_refused() -> None:
    driver = Driver(make_task(6, config=CONFIG), accuracy=_accuracy)
    driver.play_round(0.0)
    other = ProviderConfig(seed=3, detection=DEFAULT_DETECTION.__class__(key_score=0.5))
    with pytest.raises(RecoveryError, match="task parameters"):
        _restore(driver, config=other)


def test_a_missing_or_altered_blob_is_refused() -> None:
    driver = Driver(make_task(6, config=CONFIG), accuracy=_accuracy)
    driver.play_round(0.0)
    task = driver.task
    replayed = replay(task.roster, LedgerHistory.of(_transactions(task)))
    blobs = {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in _blobs(driver).items()}
    with pytest.raises(RecoveryError, match="does not match its hash"):
        ProviderMachine.restore(task.provider_identity, task.roster, initial_model(), CONFIG,
                                replayed, blobs)  # fmt: skip


def test_a_round_whose_uploads_were_all_recorded_finishes_on_them() -> None:
    """The provider died after the last upload was recorded, before it decrypted it:
    every group is complete on the ledger, so the restored one finishes the round on
    its groups from the blobs, with no new attempt (a regrouping with all of them known
    could expose someone)."""
    driver = Driver(make_task(9, config=CONFIG), accuracy=_accuracy)
    straight = Driver(make_task(9, config=CONFIG), accuracy=_accuracy)
    straight.play_round(0.0)
    want = straight.play_round(1.0)
    driver.play_round(0.0)
    driver.hold = lambda target, event: target == PROVIDER
    driver.handle(PROVIDER, StartRound(1.0))
    driver.pump()
    announced = _announce(driver, 0)
    assert len(driver.task.ledger.uploads(2, 0)) == sum(len(g.members) for g in announced.groups)
    driver.held = []  # lost with the old process
    driver.hold = lambda target, event: False
    driver.task.provider = _restore(driver)
    since = len(driver.log)
    driver.handle(PROVIDER, StartRound(2.0))
    driver.pump()
    done = driver.round_done(since)
    assert done.attempts == 1 and len(driver.commits("announce")) == 2  # rounds 1, 2 only
    assert np.array_equal(done.global_params, want.global_params)
    assert driver.refusals() == []


def _announce(driver: Driver, attempt: int) -> Announce:
    for c in reversed(driver.commits("announce")):
        if c.envelope.header.attempt == attempt:
            message = envelope.verify(c.envelope, driver.task.roster).message
            assert isinstance(message, Announce)
            return message
    raise AssertionError(f"no announcement of attempt {attempt}")
