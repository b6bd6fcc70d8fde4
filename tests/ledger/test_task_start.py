"""The task start: the ledger takes the task's parameters from the provider's first
transaction, once, and re-derives every decision with them (no node configures its own)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fairbus import envelope
from fairbus.detection import DetectionParams
from fairbus.envelope import GENESIS
from fairbus.identity import Identity
from fairbus.ledger.state import LedgerState, RefusalReason
from fairbus.roster import Roster
from fairbus.task import DEFAULT_DETECTION, TaskParams
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.local import TrainConfig
from fairbus.wire.messages import (
    Announce,
    DetectionPolicy,
    GlobalModel,
    GroupSpec,
    TaskStart,
)
from tests.conftest import TASK
from tests.support_ledger import RecordedRun, admit_all, record_run, with_task

PAPER = TaskParams(DetectionParams())  # Alg. 6 as written: not what the run's provider used


def _start(identity: Identity, task: TaskParams = PAPER, prev: bytes = GENESIS) -> bytes:
    return envelope.sign(identity, TASK, task.to_message(), prev=prev).to_bytes()


def _model(identity: Identity, prev: bytes = GENESIS) -> bytes:
    message = GlobalModel(2, bytes(8))
    return envelope.sign(identity, TASK, message, prev=prev, round=1, attempt=0).to_bytes()


def _announce(identity: Identity, prev: bytes = GENESIS) -> bytes:
    groups = (GroupSpec(0, "basic", (1, 2, 3), None, 3), GroupSpec(1, "basic", (4, 5, 6), None, 3))
    message = Announce(bytes(32), 2, 16, groups, (), (), (), 1.0, 1.0, 1)
    return envelope.sign(identity, TASK, message, prev=prev, round=1, attempt=0).to_bytes()


def test_a_task_start_is_admitted_once_and_sets_the_parameters(
    identities: dict[int, Identity], roster: Roster
) -> None:
    provider = identities[0]
    first = _start(provider)
    state, refused = admit_all(roster, [first])
    assert refused == [] and state.task == PAPER
    again = _start(provider, TaskParams(), prev=state.head(0))
    state, refused = admit_all(roster, [first, again])
    assert [(k, e.reason) for k, e in refused] == [(1, RefusalReason.OUT_OF_ORDER)]
    assert "once" in refused[0][1].detail
    assert state.task == PAPER and state.height == 0  # the refused one changed nothing


def test_only_the_provider_may_start_the_task(
    identities: dict[int, Identity], roster: Roster
) -> None:
    for who in (3, 8, 9):  # a user, a ledger node, the admin
        state, refused = admit_all(roster, [_start(identities[who])])
        assert [e.reason for _, e in refused] == [RefusalReason.ROLE_NOT_ALLOWED], who
        assert state.task is None


def test_nothing_round_scoped_is_admitted_before_the_task_start(
    identities: dict[int, Identity], roster: Roster
) -> None:
    provider = identities[0]
    for data in (_announce(provider), _model(provider)):
        state, refused = admit_all(roster, [data])
        assert [e.reason for _, e in refused] == [RefusalReason.OUT_OF_ORDER]
        assert "before the task started" in refused[0][1].detail
        assert state.height == -1 and state.current_round == 0
    # after it, the same announcement is admitted
    start = _start(provider)
    state, _ = admit_all(roster, [start])
    model = _model(provider, prev=state.head(0))
    state, _ = admit_all(roster, [start, model])
    state, refused = admit_all(roster, [start, model, _announce(provider, prev=state.head(0))])
    assert refused == [] and state.current_round == 1


def test_an_invalid_policy_is_refused_as_malformed(
    identities: dict[int, Identity], roster: Roster
) -> None:
    policy = dataclasses.asdict(DEFAULT_DETECTION) | {"evidence_window": 2, "min_evidence": 4}
    message = TaskStart(DetectionPolicy(**policy), 1)
    data = envelope.sign(identities[0], TASK, message, prev=GENESIS).to_bytes()
    state, refused = admit_all(roster, [data])
    assert [e.reason for _, e in refused] == [RefusalReason.MALFORMED]
    assert "evidence_window" in refused[0][1].detail and state.task is None


def test_a_ledger_state_takes_no_parameters_from_outside(roster: Roster) -> None:
    with pytest.raises(TypeError):
        LedgerState(roster, DEFAULT_DETECTION)  # type: ignore[call-arg, arg-type]
    with pytest.raises(TypeError):
        LedgerState(roster, task=TaskParams())  # type: ignore[call-arg]


# --- a real run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run() -> RecordedRun:
    return record_run(rounds=2)


def test_the_run_starts_with_the_providers_parameters(run: RecordedRun) -> None:
    kinds = [envelope.parse(e).header.type for e in run.envelopes]
    assert kinds[:2] == ["test_set", "task_start"]
    assert kinds.count("task_start") == kinds.count("test_set") == 1
    state, refused = admit_all(run.roster, run.envelopes)
    assert refused == [] and state.task == run.task
    recorded_training = {"local_steps": None, "absent_class_scale": None, "proximal_mu": None}
    assert dataclasses.replace(run.task, evaluation=None, **recorded_training) == TaskParams()
    assert run.task.local_steps is not None  # equal steps for every user, recorded
    assert (run.task.absent_class_scale, run.task.proximal_mu) == (0.5, 0.0)  # the defaults
    assert run.task.evaluation is not None and run.task.evaluation.model == "digits_cnn"
    assert state.current_round == 2


def test_decisions_are_checked_against_the_recorded_parameters(run: RecordedRun) -> None:
    """The same run, its task start recording another policy (the provider's chain signed
    again after it): the first decision, made with the provider's policy, is refused,
    and nothing before it is."""
    envelopes = with_task(run, PAPER)
    state, refused = admit_all(run.roster, envelopes)
    assert state.task == PAPER
    assert refused, "a decision made with another policy was admitted"
    k, error = refused[0]
    first_decision = next(
        n for n, e in enumerate(envelopes) if envelope.parse(e).header.type == "decision"
    )
    assert (k, error.reason) == (first_decision, RefusalReason.CONTRACT_VIOLATION), error


@pytest.fixture(scope="module")
def three_and_three() -> RecordedRun:
    """Three poisoners and three free-riders among nine, full local training, five rounds:
    the contribution fit convicts all six by round 5 (``convict_below``). Trained on one
    thread, as the detection benchmark does: how torch splits a sum over threads changes
    the last bits of every update, and five rounds later the groupings."""
    poisoner, free_rider = Attack(Behaviour.POISONER), Attack(Behaviour.FREE_RIDER)
    attacks = {u: poisoner for u in (1, 2, 3)} | {u: free_rider for u in (4, 5, 6)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return record_run(rounds=5, seed=1, attacks=attacks, train=TrainConfig())
    finally:
        torch.set_num_threads(threads)


def test_the_ledger_re_derives_a_conviction_by_the_contribution_fit(
    three_and_three: RecordedRun,
) -> None:
    run = three_and_three
    assert run.task.detection.convict_below is not None
    state, refused = admit_all(run.roster, run.envelopes)
    assert refused == [] and state.excluded == frozenset({1, 2, 3, 4, 5, 6})
    # recorded without convict_below, the decision that excluded them is refused
    unconvicting = dataclasses.replace(
        run.task, detection=dataclasses.replace(run.task.detection, convict_below=None)
    )
    envelopes = with_task(run, unconvicting)
    state, refused = admit_all(run.roster, envelopes)
    assert refused, "a decision the recorded policy does not make was admitted"
    k, error = refused[0]
    assert envelope.parse(envelopes[k]).header.type == "decision"
    assert error.reason == RefusalReason.CONTRACT_VIOLATION, error
    assert not state.excluded & {1, 2, 3, 4, 5, 6}


def test_a_task_start_after_an_announcement_is_refused(run: RecordedRun) -> None:
    announced = next(
        n for n, e in enumerate(run.envelopes) if envelope.parse(e).header.type == "announce"
    )
    state, _ = admit_all(run.roster, run.envelopes[: announced + 1])
    assert state.current_round == 1
    late = envelope.sign(
        run.identities[0], run.roster.task, TaskParams().to_message(), prev=state.head(0)
    ).to_bytes()
    state, refused = admit_all(run.roster, [*run.envelopes[: announced + 1], late])
    assert [e.reason for _, e in refused] == [RefusalReason.OUT_OF_ORDER]
