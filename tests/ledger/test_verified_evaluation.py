"""Issue 13, item 1: nothing in a decision rests on the provider's word. The ledger
re-derives every evaluation from the recorded uploads, the recorded global model and the
committed test set (:mod:`fairbus.ledger.verify`): an accuracy off by one test sample, a
contribution scaled by 1.01, a decision computed from altered numbers are refused with
``contract_violation`` and change nothing; ``fairbus audit`` names an altered evaluation
in an exported ledger; and the exact evaluation is the same whatever the thread count
or batch size, equal to a pure int64 computation.

The round is a real one: a simulation of 9 users on digits (its in-process ledger
re-derives every number too), whose blocks and blobs are replayed here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fairbus import envelope, evaluation
from fairbus.detection import detect, needs_anchor
from fairbus.errors import SchemaError
from fairbus.evaluation import ExactEvaluator, ExactScore, QuantizedTestSet
from fairbus.identity import Identity
from fairbus.ledger.records import Block, Transaction
from fairbus.ledger.state import LedgerState, RefusalReason, RefusedError, grouping_of
from fairbus.ledger.verify import EvaluationCheck
from fairbus.protocol.provider import ProviderConfig
from fairbus.simulator import Simulation, SimulationConfig
from fairbus.task import DEFAULT_DETECTION
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.data import load_digits
from fairbus.training.local import TrainConfig
from fairbus.training.models import initial_params
from fairbus.wire import messages
from fairbus.wire.limits import DEFAULT_LIMITS
from fairbus.wire.messages import (
    CommittedTestSet,
    Decision,
    Evaluation,
    EvaluationSpec,
    Message,
    TaskStart,
    UserScore,
    decode_body,
)
from fairbus_ledger_service.audit import audit
from fairbus_ledger_service.blobs import BlobStore


@dataclasses.dataclass
class Recorded:
    """One simulated round: its blocks and blobs, and the provider's identity."""

    sim: Simulation
    blocks: list[Block]
    blobs: dict[bytes, bytes]

    @property
    def provider(self) -> Identity:
        return self.sim.provider.identity

    def index_of(self, kind: str) -> int:
        return next(k for k, b in enumerate(self.blocks) if b.txs[0].envelope.header.type == kind)

    def state_before(self, kind: str) -> LedgerState:
        """A ledger node that re-derives evaluations, with every block before the first
        ``kind`` transaction applied."""
        state = LedgerState(self.sim.roster, evaluations=EvaluationCheck(self.blobs.get))
        for block in self.blocks[: self.index_of(kind)]:
            state.apply_block(block)
        return state


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    return _simulated(
        SimulationConfig(users=9, rounds=1, seed=3, train=TrainConfig(local_epochs=2))
    )


def _simulated(config: SimulationConfig) -> Recorded:
    """The task ``config`` describes, simulated with its blocks and blobs kept; every
    round must complete with nothing refused."""
    blocks: list[Block] = []
    blobs: dict[bytes, bytes] = {}
    sim = Simulation(config, on_block=blocks.append, on_blob=blobs.__setitem__)
    records = sim.run()
    assert all(r.failed is None and not r.refusals for r in records), records
    return Recorded(sim, blocks, blobs)


def _signed(rec: Recorded, state: LedgerState, message: Message) -> Transaction:
    scope = {"round": 1, "attempt": 0} if message.SCOPED else {}
    env = envelope.sign(rec.provider, rec.sim.roster.task, message,
                        prev=state.head(rec.provider.participant_id), **scope)  # fmt: skip
    return Transaction.from_envelope(env)


def _snapshot(state: LedgerState) -> tuple[object, ...]:
    return (state.height, dict(state.heads), dict(state.rounds), state.excluded,
            state.key_users)  # fmt: skip


def _refused(state: LedgerState, tx: Transaction, *words: str) -> None:
    before = _snapshot(state)
    with pytest.raises(RefusedError) as caught:
        state.draft().admit(tx)
    assert caught.value.reason is RefusalReason.CONTRACT_VIOLATION, caught.value
    for word in words:
        assert word in caught.value.detail, caught.value.detail
    assert _snapshot(state) == before


def _honest_evaluation(rec: Recorded) -> Evaluation:
    tx = rec.blocks[rec.index_of("evaluation")].txs[0]
    body = decode_body("evaluation", tx.payload or b"", DEFAULT_LIMITS)
    assert isinstance(body, Evaluation)
    return body


def _altered(evaluation_: Evaluation, gid: int, **change: object) -> Evaluation:
    return Evaluation(
        tuple(dataclasses.replace(e, **change) if e.gid == gid else e  # type: ignore[arg-type]
              for e in evaluation_.accuracies),
        evaluation_.class_samples,
    )  # fmt: skip


def test_the_honest_evaluation_is_re_derived_and_admitted(recorded: Recorded) -> None:
    state = recorded.state_before("evaluation")
    honest = _honest_evaluation(recorded)
    state.draft().admit(_signed(recorded, state, honest))


def test_an_accuracy_off_by_one_test_sample_is_refused(recorded: Recorded) -> None:
    state = recorded.state_before("evaluation")
    honest = _honest_evaluation(recorded)
    samples = len(recorded.sim.evaluator.test_set)
    first = honest.accuracies[0]
    correct = round(first.accuracy * samples)
    assert correct / samples == first.accuracy  # the accuracy is a count of samples
    for wrong in (correct + 1, correct - 1):
        forged = _altered(honest, first.gid, accuracy=wrong / samples)
        _refused(state, _signed(recorded, state, forged), f"group {first.gid}", "accuracy")


def test_a_contribution_scaled_by_1_01_is_refused(recorded: Recorded) -> None:
    state = recorded.state_before("evaluation")
    honest = _honest_evaluation(recorded)
    last = honest.accuracies[-1]
    assert last.contribution is not None and last.contribution != 0.0
    forged = _altered(honest, last.gid, contribution=last.contribution * 1.01)
    _refused(state, _signed(recorded, state, forged), f"group {last.gid}", "contribution")


def test_a_rank_off_by_one_test_sample_or_missing_is_refused(recorded: Recorded) -> None:
    """The true class's rank sum, one sample's rank moved by one, or the rank left out:
    the aggregation reads it, so it is re-derived like the accuracy."""
    state = recorded.state_before("evaluation")
    honest = _honest_evaluation(recorded)
    samples = len(recorded.sim.evaluator.test_set)
    first = honest.accuracies[0]
    assert first.rank is not None
    rank_sum = round(first.rank * samples)
    assert rank_sum / samples == first.rank  # the rank is a sum over samples
    for wrong in ((rank_sum + 1) / samples, (rank_sum - 1) / samples, None):
        forged = _altered(honest, first.gid, rank=wrong)
        _refused(state, _signed(recorded, state, forged), f"group {first.gid}", "rank")


def test_class_counts_off_by_one_sample_missing_or_not_adding_up_are_refused(
    recorded: Recorded,
) -> None:
    """Each group's predictions by class (detection reads them with ``class_lead``) are
    re-derived like the accuracy: one sample moved from one class's right count to
    another's, one group's counts or every group's left out, the test set's samples per
    class misstated, or counts that cannot be (more right than called) are refused, and
    nothing changes."""
    state = recorded.state_before("evaluation")
    honest = _honest_evaluation(recorded)
    samples = recorded.sim.evaluator.test_set.class_samples
    assert honest.class_samples == samples
    first = honest.accuracies[0]
    right, called = first.class_right, first.class_called
    assert right is not None and called is not None and sum(right) > 0
    hit = next(c for c, n in enumerate(right) if n > 0)
    other = (hit + 1) % len(right)
    moved = tuple(n - (c == hit) + (c == other) for c, n in enumerate(right))
    moved_calls = tuple(n - (c == hit) + (c == other) for c, n in enumerate(called))
    forged = _altered(honest, first.gid, class_right=moved, class_called=moved_calls)
    if all(r <= n for r, n in zip(moved, samples, strict=True)):
        _refused(state, _signed(recorded, state, forged), f"group {first.gid}", "by class")
    left_out = _altered(honest, first.gid, class_right=None, class_called=None)
    _refused(state, _signed(recorded, state, left_out), "class counts")
    misstated = Evaluation(honest.accuracies, (samples[0] + 1, samples[1] - 1, *samples[2:]))
    _refused(state, _signed(recorded, state, misstated), "samples per class")
    impossible = _altered(honest, first.gid, class_called=(0,) * len(called))
    _refused(state, _signed(recorded, state, impossible), "class counts")
    # nor may every group's counts be left out: the provider would choose whom they keep
    uncounted = Evaluation(
        tuple(
            dataclasses.replace(e, class_right=None, class_called=None) for e in honest.accuracies
        )
    )
    _refused(state, _signed(recorded, state, uncounted), "samples per class")


def test_an_evaluation_too_large_to_count_by_class_carries_no_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beyond ``MAX_CLASS_CELLS`` groups × classes no evaluation carries class counts
    (they would not fit a message): the provider leaves them out and decides without
    them, and the ledger, which re-derives every number, admits that and nothing else.
    The cap is lowered here below one round's groups × classes (9 users)."""
    monkeypatch.setattr(messages, "MAX_CLASS_CELLS", 10)
    run = _simulated(SimulationConfig(users=9, rounds=2, seed=3, train=TrainConfig(local_epochs=2)))
    uncounted = _honest_evaluation(run)  # the run's own ledger admitted it: no refusal
    assert uncounted.class_samples is None
    assert all(e.class_right is None and e.class_called is None for e in uncounted.accuracies)
    state = run.state_before("evaluation")
    state.draft().admit(_signed(run, state, uncounted))
    samples = run.sim.evaluator.test_set.class_samples
    with pytest.raises(SchemaError, match="at most 10 groups × classes"):
        Evaluation(uncounted.accuracies, samples)  # counted: does not fit


def test_a_decision_based_on_altered_numbers_is_refused(recorded: Recorded) -> None:
    """The honest evaluation is recorded; a decision that Alg. 6 gives on other
    accuracies (one group's lowered to nothing) is refused."""
    state = recorded.state_before("decision")
    honest = state.rounds[1].evaluation
    assert honest is not None
    low = honest.accuracies[0].gid
    altered = {e.gid: (0.0 if e.gid == low else e.accuracy) for e in honest.accuracies}
    contributions = {e.gid: e.contribution for e in honest.accuracies}
    task = state.task
    assert task is not None
    result = detect(grouping_of(state.rounds[1].announce), altered, task.detection,
                    contributions, state.carried, state.history)  # type: ignore[arg-type]  # fmt: skip
    scores = tuple(UserScore(a.user, a.score, a.conf_lo, a.conf_up)
                   for a in result.assessments.values())  # fmt: skip
    forged = Decision(result.tau, scores, tuple(sorted(result.new_key_users)),
                      tuple(sorted(result.violators)))  # fmt: skip
    before = _snapshot(state)
    with pytest.raises(RefusedError) as caught:
        state.draft().admit(_signed(recorded, state, forged))
    assert caught.value.reason is RefusalReason.CONTRACT_VIOLATION
    assert _snapshot(state) == before


def test_audit_names_an_altered_evaluation(recorded: Recorded, tmp_path: Path) -> None:
    """An exported ledger whose evaluation block was replaced by one with an altered
    accuracy (signed by the provider, linked correctly): the audit names that block."""
    at = recorded.index_of("evaluation")
    state = recorded.state_before("evaluation")
    honest = _honest_evaluation(recorded)
    forged = _altered(honest, honest.accuracies[0].gid, accuracy=0.5)
    tx = _signed(recorded, state, forged)
    blocks = list(recorded.blocks[:at])
    blocks.append(Block.build(at, blocks[-1].hash, 0.0, [tx]))
    store = BlobStore(tmp_path / "blobs")
    for digest, data in recorded.blobs.items():
        store.put(digest, data)
    report = audit([b.to_bytes() for b in blocks], recorded.sim.roster, store)
    assert not report.ok
    assert f"block {at}" in str(report.problem) and "contract_violation" in str(report.problem)
    honest_report = audit([b.to_bytes() for b in recorded.blocks], recorded.sim.roster, store)
    assert honest_report.ok, honest_report.problem


# --- the exact evaluation -------------------------------------------------------------------


def _digits_test_set() -> QuantizedTestSet:
    _, test = load_digits(seed=0)
    return QuantizedTestSet.quantize(test.x.numpy(), test.y.numpy(), test.num_classes)


def _trained_like(seed: int) -> npt.NDArray[np.float32]:
    """Parameters spread well beyond an initial model's (a deterministic formula)."""
    params = initial_params("digits_cnn", seed)
    ramp = np.sin(np.arange(params.size, dtype=np.float64) * 0.37) * 0.3
    return (params * 4.0 + ramp).astype(np.float32)


def test_the_exact_evaluation_does_not_depend_on_threads_or_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    evaluator = ExactEvaluator("digits_cnn", _digits_test_set())
    params = _trained_like(1)
    threads = torch.get_num_threads()
    try:
        counts = set()
        for n_threads, batch in ((1, 256), (2, 256), (1, 7), (2, 450)):
            torch.set_num_threads(n_threads)
            monkeypatch.setattr(evaluation, "BATCH", batch)
            counts.add(evaluator.score_unbatched(params))
            counts.add(evaluator.scores([params])[0])
    finally:
        torch.set_num_threads(threads)
    assert len(counts) == 1


def test_the_exact_evaluation_equals_integer_arithmetic() -> None:
    """The float64 fixed-point forward pass gives the logits a pure int64 computation
    gives (numpy's integer matmul never rounds), for every test sample."""
    test_set = _digits_test_set()
    params = _trained_like(2)
    evaluator = ExactEvaluator("digits_cnn", test_set)
    weights = evaluation._quantized_weights(params.astype(np.float64), evaluator.layers)
    with torch.no_grad():
        fast = evaluation._forward(torch.from_numpy(test_set.inputs), evaluator.layers, weights)
    slow = _int64_forward(test_set.inputs.astype(np.int64), evaluator.layers, weights)
    assert np.array_equal(fast.numpy().astype(np.int64), slow)
    predicted = slow.argmax(axis=1)
    hits = predicted == test_set.labels
    right = int(hits.sum())
    truth = slow[np.arange(len(slow)), test_set.labels]
    ranks = int((slow > truth[:, None]).sum())
    classes = test_set.classes
    per_class = tuple(int((hits & (test_set.labels == c)).sum()) for c in range(classes))
    called = tuple(int((predicted == c).sum()) for c in range(classes))
    want = ExactScore(right, ranks, len(test_set), per_class, called)
    assert evaluator.scores([params]) == [want]
    assert evaluator.correct(params) == right


def _int64_forward(
    x: npt.NDArray[np.int64],
    layers: list[evaluation._Layer],
    weights: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]],
) -> npt.NDArray[np.int64]:
    shift = evaluation.WEIGHT_FRAC_BITS
    limit = evaluation.ACT_LIMIT
    params = iter(weights)
    for layer in layers:
        if layer.kind == "relu":
            x = np.maximum(x, 0)
        elif layer.kind == "pool":
            n, c, h, w = x.shape
            k = layer.kernel
            x = (
                x[:, :, : h // k * k, : w // k * k]
                .reshape(n, c, h // k, k, w // k, k)
                .max(axis=(3, 5))
            )
        elif layer.kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            w_f, b_f = next(params)
            w_q, b_q = w_f.astype(np.int64), b_f.astype(np.int64)
            if layer.kind == "conv":
                p, k = layer.padding, layer.kernel
                padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
                windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))
                n, c, oh, ow = windows.shape[:4]
                cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n, oh * ow, c * k * k)
                z = (cols @ w_q.T + b_q).transpose(0, 2, 1).reshape(n, -1, oh, ow)
            else:
                z = x @ w_q.T + b_q
            x = np.clip(z >> shift, -limit, limit)
    return x


# --- the task start and its test set ----------------------------------------------------------


def _fresh(rec: Recorded) -> LedgerState:
    return LedgerState(rec.sim.roster, evaluations=EvaluationCheck(rec.blobs.get))


def _admit(state: LedgerState, tx: Transaction) -> None:
    draft = state.draft()
    draft.admit(tx)
    state.commit(draft, Block.build(state.height + 1, state.head_hash, 0.0, draft.txs))


def _start(rec: Recorded, evaluation_: EvaluationSpec | None) -> TaskStart:
    """The simulated task's parameters with another evaluation spec."""
    task = rec.sim.provider.config.task
    return dataclasses.replace(task, evaluation=evaluation_).to_message()


def test_a_task_start_must_name_the_recorded_test_set(recorded: Recorded) -> None:
    state = _fresh(recorded)
    test_set = recorded.sim.provider.config.test_set
    assert test_set is not None
    digest = hashlib.sha256(test_set.payload()).digest()
    # No test set recorded yet, none named, another named, an unknown model.
    _refused(state, _signed(recorded, state, _start(recorded, None)), "names no test set")
    ours = EvaluationSpec("digits_cnn", digest)
    _refused(state, _signed(recorded, state, _start(recorded, ours)), "ledger recorded none")
    _admit(state, _signed(recorded, state, test_set))
    other = EvaluationSpec("digits_cnn", bytes(32))
    _refused(state, _signed(recorded, state, _start(recorded, other)), "names test set")
    unknown = EvaluationSpec("resnet_152", digest)
    _refused(state, _signed(recorded, state, _start(recorded, unknown)), "resnet_152")
    with pytest.raises(RefusedError) as caught:  # a second test set
        state.draft().admit(_signed(recorded, state, test_set))
    assert caught.value.reason is RefusalReason.OUT_OF_ORDER
    _admit(state, _signed(recorded, state, _start(recorded, ours)))
    assert state.task is not None and state.task.evaluation is not None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"inputs": bytes(2 * 2 * 4 - 1)}, "input bytes"),
        ({"labels": bytes(3)}, "input bytes"),
        ({"inputs": (2000).to_bytes(2, "little") + bytes(2 * 2 * 4 - 2)}, "out of range"),
        ({"labels": bytes([10, 0])}, "out of range"),
    ],
)
def test_a_malformed_test_set_is_refused_by_name(change: dict[str, bytes], words: str) -> None:
    good = CommittedTestSet((1, 2, 2), 10, bytes(2 * 2 * 4), bytes(2))
    QuantizedTestSet.from_message(good)
    with pytest.raises(SchemaError, match=words):
        QuantizedTestSet.from_message(dataclasses.replace(good, **change))  # type: ignore[arg-type]


def test_a_node_lacking_an_upload_refuses_until_it_has_it(recorded: Recorded) -> None:
    """A ledger node takes payloads from the bus and may miss one: it refuses the
    evaluation as ``missing_payload`` (the provider relays the uploads and submits again)
    and admits it once the payload is there."""
    record_state = recorded.state_before("evaluation")
    upload = dict(record_state.rounds[1].upload_blobs)[next(iter(record_state.rounds[1].uploads))]
    held = {d: b for d, b in recorded.blobs.items() if d != upload}
    state = LedgerState(recorded.sim.roster, evaluations=EvaluationCheck(held.get))
    for block in recorded.blocks[: recorded.index_of("evaluation")]:
        state.apply_block(block)
    tx = _signed(recorded, state, _honest_evaluation(recorded))
    before = _snapshot(state)
    with pytest.raises(RefusedError) as caught:
        state.draft().admit(tx)
    assert caught.value.reason is RefusalReason.MISSING_PAYLOAD, caught.value
    assert upload.hex()[:16] in caught.value.detail
    assert _snapshot(state) == before
    held[upload] = recorded.blobs[upload]
    state.draft().admit(tx)


def test_a_test_set_that_does_not_fit_the_model_is_refused_by_name() -> None:
    digits = _digits_test_set()
    with pytest.raises(evaluation.EvaluationError, match="do not fit mnist_cnn"):
        ExactEvaluator("mnist_cnn", digits)
    three = QuantizedTestSet(digits.inputs, digits.labels % 3, 3)
    with pytest.raises(evaluation.EvaluationError, match="10 classes"):
        ExactEvaluator("digits_cnn", three)


# --- contributions along the global model's last step ----------------------------------------


@pytest.fixture(scope="module")
def two_rounds() -> Recorded:
    along = dataclasses.replace(DEFAULT_DETECTION, contribution_direction="last_step")
    return _simulated(SimulationConfig(users=9, rounds=2, seed=3,
                                       train=TrainConfig(local_epochs=4),
                                       provider=ProviderConfig(detection=along)))  # fmt: skip


def _second(rec: Recorded, kind: str) -> int:
    """The index of the block of round 2's ``kind`` transaction."""
    return next(
        k
        for k, b in enumerate(rec.blocks)
        if b.txs[0].envelope.header.type == kind and b.txs[0].envelope.header.round == 2
    )


def test_round_two_contributions_are_measured_along_the_last_step(two_rounds: Recorded) -> None:
    """The task's direction is the last step: round 2's evaluation is
    re-derived along M_2 − M_1, both recorded; the same numbers along the median of the
    basic groups' updates, what a provider that ignores the recorded direction reports,
    are refused with ``contract_violation`` and change nothing."""
    at = _second(two_rounds, "evaluation")
    check = EvaluationCheck(two_rounds.blobs.get)
    state = LedgerState(two_rounds.sim.roster, evaluations=check)
    for block in two_rounds.blocks[:at]:
        state.apply_block(block)
    assert state.task is not None and state.task.detection.contribution_direction == "last_step"
    assert state.task.evaluation is not None
    record = state.rounds[2]
    assert record.previous_global_blob == state.rounds[1].global_blob != record.global_blob
    tx = two_rounds.blocks[at].txs[0]
    honest = decode_body("evaluation", tx.payload or b"", DEFAULT_LIMITS)
    assert isinstance(honest, Evaluation)
    gids = [e.gid for e in honest.accuracies]
    along_median = check.numbers(state.task.evaluation, record.recorded(), gids, DEFAULT_DETECTION)
    assert any(along_median[e.gid][1] != e.contribution for e in honest.accuracies)
    forged = Evaluation(
        tuple(dataclasses.replace(e, contribution=along_median[e.gid][1])
              for e in honest.accuracies),
        honest.class_samples,
    )  # fmt: skip
    prev = state.head(two_rounds.provider.participant_id)
    env = envelope.sign(two_rounds.provider, two_rounds.sim.roster.task, forged, prev=prev,
                        round=2, attempt=tx.envelope.header.attempt)  # fmt: skip
    _refused(state, Transaction.from_envelope(env), "contribution")
    state.draft().admit(tx)  # the provider's own, along the last step


def test_the_accurate_median_is_re_derived_over_the_basic_groups_that_beat_the_bar(
    two_rounds: Recorded,
) -> None:
    """With ``accurate_median`` the ledger measures contributions along the median of the
    basic groups whose re-derived accuracy beats the recorded parameters' bar: with the
    bar at τ they differ from the plain median's, with a bar every group beats they are
    the plain median's, and the accuracies and ranks never move. With
    ``leading_median`` along the median of those above τ less the recorded
    ``tolerance``, whatever its ``relative_tolerance``."""
    at = _second(two_rounds, "evaluation")
    state = LedgerState(two_rounds.sim.roster)
    for block in two_rounds.blocks[:at]:
        state.apply_block(block)
    assert state.task is not None and state.task.evaluation is not None
    spec, round_two = state.task.evaluation, state.rounds[2].recorded()
    honest = decode_body("evaluation", two_rounds.blocks[at].txs[0].payload or b"", DEFAULT_LIMITS)
    assert isinstance(honest, Evaluation)
    gids = [e.gid for e in honest.accuracies]
    check = EvaluationCheck(two_rounds.blobs.get)
    plain = dataclasses.replace(DEFAULT_DETECTION, contribution_direction="median")
    median = check.numbers(spec, round_two, gids, plain)
    at_tau = dataclasses.replace(DEFAULT_DETECTION, contribution_direction="accurate_median",
                                 tolerance=0.0, relative_tolerance=None,
                                 rank_below=None)  # fmt: skip
    accurate = check.numbers(spec, round_two, gids, at_tau)
    basic = [g.gid for g in round_two.announce.groups if g.kind == "basic"]
    tau = sum(median[gid][0] for gid in basic) / len(basic)
    assert 0 < len([gid for gid in basic if median[gid][0] > tau]) < len(basic)
    assert {g: (n[0], n[2]) for g, n in accurate.items()} == {
        g: (n[0], n[2]) for g, n in median.items()
    }
    assert any(accurate[gid][1] != median[gid][1] for gid in gids)
    every_group_beats = dataclasses.replace(at_tau, tolerance=1.0)
    assert check.numbers(spec, round_two, gids, every_group_beats) == median
    # ``leading_median`` takes the groups above τ − tolerance whatever relative_tolerance:
    # at tolerance 0 those of the bar at τ, at 1 every group
    leading = dataclasses.replace(
        at_tau, contribution_direction="leading_median", relative_tolerance=0.3
    )
    assert check.numbers(spec, round_two, gids, leading) == accurate
    assert check.numbers(spec, round_two, gids, dataclasses.replace(leading, tolerance=1.0)) == (
        median
    )


@pytest.fixture(scope="module")
def ranked() -> Recorded:
    """One round among three poisoners of nine, recorded with ``rank_below`` 0.35 and
    ``accurate_median`` (with ``leading_median`` the groups above τ − tolerance are the
    ranked ones in this round, and the test could not tell the two apart)."""
    near_chance = dataclasses.replace(
        DEFAULT_DETECTION, rank_below=0.35, contribution_direction="accurate_median"
    )
    poisoners = {u: Attack(Behaviour.POISONER) for u in (1, 2, 3)}
    # 30 local epochs: with 2 every group's rank is within 0.1 of the model it started from
    return _simulated(SimulationConfig(users=9, rounds=1, seed=3,
                                       train=TrainConfig(local_epochs=30), attacks=poisoners,
                                       provider=ProviderConfig(detection=near_chance)))  # fmt: skip


def test_near_chance_the_ledger_re_derives_the_median_over_groups_ranking_with_the_global_model(
    ranked: Recorded,
) -> None:
    """Round 1 starts at chance (τ below the recorded ``rank_below``): the ledger
    evaluates the recorded global model too and measures contributions along the median
    of the basic groups whose re-derived rank is no worse than its own (within
    ``RANK_SLACK``), as the provider did. The same evaluation with the contributions the
    groups at least as accurate as τ give, what a provider that ignores ``rank_below``
    reports, is refused with ``contract_violation`` and changes nothing."""
    state = ranked.state_before("evaluation")
    assert state.task is not None and state.task.evaluation is not None
    detection = state.task.detection
    assert detection.rank_below is not None and detection.contribution_direction == (
        "accurate_median"
    )
    round_one = state.rounds[1].recorded()
    honest = _honest_evaluation(ranked)
    gids = [e.gid for e in honest.accuracies]
    check = EvaluationCheck(ranked.blobs.get)
    by_rank = check.numbers(state.task.evaluation, round_one, gids, detection)
    unranked = check.numbers(
        state.task.evaluation, round_one, gids, dataclasses.replace(detection, rank_below=None)
    )
    basic = [g.gid for g in round_one.announce.groups if g.kind == "basic"]
    accuracies = {gid: numbers[0] for gid, numbers in by_rank.items()}
    assert needs_anchor(detection, basic, accuracies)
    assert {g: (n[0], n[2]) for g, n in unranked.items()} == {
        g: (n[0], n[2]) for g, n in by_rank.items()
    }
    assert {e.gid: e.contribution for e in honest.accuracies} == {
        g: n[1] for g, n in by_rank.items()
    }
    assert any(by_rank[gid][1] != unranked[gid][1] for gid in gids)
    forged = Evaluation(
        tuple(dataclasses.replace(e, contribution=unranked[e.gid][1])
              for e in honest.accuracies),
        honest.class_samples,
    )  # fmt: skip
    state = ranked.state_before("evaluation")
    _refused(state, _signed(ranked, state, forged), "contribution")
    state.draft().admit(ranked.blocks[ranked.index_of("evaluation")].txs[0])
