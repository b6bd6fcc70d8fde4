"""SecCL's consensus contract on the ledger (:mod:`fairbus.ledger.seccl`): the Borda
election and the new global model re-derived from what the ledger recorded, and every
refusal with its reason, nothing applied."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from fairbus import envelope
from fairbus.identity import Identity
from fairbus.ledger.inprocess import InProcessLedger
from fairbus.ledger.seccl import model_sha256
from fairbus.ledger.state import LedgerState, RefusalReason, RefusedError
from fairbus.ledger.verify import EvaluationCheck
from fairbus.protocol.user import model_digest
from fairbus.roster import Roster
from fairbus.seccl import aggregate, elect, top_changes
from fairbus.task import TaskParams
from fairbus.wire.messages import (
    Announce,
    BordaTotal,
    Candidates,
    CommittedTestSet,
    EvaluationSpec,
    GlobalModel,
    Message,
    PeerEvaluation,
    PeerScore,
    SecclAnnounce,
    SecclClose,
    SparseUpdate,
)
from tests.conftest import TASK
from tests.support_draws import SeededDraws

PARTICIPANTS = (1, 2, 3, 4, 5)
THETA, SHARE, M = 0.2, 0.4, 2  # k = 2 of 10 parameters; M = 0.4 · 5
LENGTH = 10
# evaluator → (target → F-score): the lower the id, the better the upload
VALUES = {
    u: {v: round(0.9 - 0.1 * v + (0.05 if u % 2 else 0.0), 3) for v in PARTICIPANTS if v != u}
    for u in PARTICIPANTS
}


def _params(seed: int) -> npt.NDArray[np.float32]:
    return SeededDraws(seed).normal(size=LENGTH).astype(np.float32)


class Board:
    """A SecCL task on an :class:`InProcessLedger` that re-derives everything."""

    def __init__(self, identities: dict[int, Identity], roster: Roster, **task: object) -> None:
        self.ids = identities
        self.blobs: dict[bytes, bytes] = {}
        self.ledger = InProcessLedger(
            roster, identities[8], on_blob=lambda d, p: self.blobs.__setitem__(d, p)
        )
        test_set = CommittedTestSet((1, 8, 8), 10, bytes(2 * 64 * 2), bytes(2))
        self.sign(0, test_set)
        spec = EvaluationSpec("digits_cnn", hashlib.sha256(test_set.payload()).digest())
        params = {"mode": "seccl", "theta": THETA, "candidate_share": SHARE, **task}
        self.sign(0, TaskParams(evaluation=spec, **params).to_message())  # type: ignore[arg-type]
        self.model = _params(0)

    def sign(self, sender: int, message: Message, r: int | None = None) -> bytes:
        scoped = {"round": r, "attempt": 0} if r is not None else {}
        prev = self.ledger.head(sender)
        env = envelope.sign(self.ids[sender], TASK, message, prev=prev, **scoped)
        return self.ledger.commit(env)

    def refused(self, sender: int, message: Message, r: int) -> RefusedError:
        """Commit, expecting a refusal that changes nothing."""
        state = self.ledger.state
        before = (state.height, dict(state.heads), dict(state.seccl_rounds), state.current_round)
        with pytest.raises(RefusedError) as info:
            self.sign(sender, message, r)
        after = (state.height, dict(state.heads), dict(state.seccl_rounds), state.current_round)
        assert after == before
        return info.value

    def announce(self, r: int, participants: tuple[int, ...] = PARTICIPANTS) -> None:
        self.sign(0, GlobalModel(LENGTH, self.model.astype("<f4").tobytes()), r)
        self.sign(
            0, SecclAnnounce(model_digest(self.model), LENGTH, participants, THETA, SHARE, M), r
        )

    def upload(self, r: int, users: tuple[int, ...] = PARTICIPANTS) -> None:
        for u in users:
            self.sign(u, SparseUpdate.of(top_changes(_params(u) * 0.1, THETA)), r)

    def evaluate(self, r: int, users: tuple[int, ...] = PARTICIPANTS) -> None:
        for u in users:
            self.sign(u, _evaluation(VALUES[u]), r)

    def election(self, r: int) -> Candidates:
        result = elect(VALUES, PARTICIPANTS, M)
        changes = {c: top_changes(_params(c) * 0.1, THETA) for c in result.candidates}
        new = aggregate(self.model, changes)
        totals = tuple(BordaTotal(u, p) for u, p in sorted(result.totals.items()))
        return Candidates(result.candidates, totals, model_digest(new))

    def play(self, r: int) -> Candidates:
        self.announce(r)
        self.upload(r)
        self.evaluate(r)
        candidates = self.election(r)
        self.sign(0, candidates, r)
        return candidates


def _evaluation(values: dict[int, float]) -> PeerEvaluation:
    return PeerEvaluation(tuple(PeerScore(u, v) for u, v in sorted(values.items())))


@pytest.fixture
def board(identities: dict[int, Identity], roster: Roster) -> Board:
    return Board(identities, roster)


def test_a_whole_round_is_admitted_and_the_next_starts_from_its_model(board: Board) -> None:
    candidates = board.play(1)
    record = board.ledger.state.seccl_rounds[1]
    assert record.candidates == candidates
    assert candidates.candidates == (1, 2)  # totals 8 and 5 (ballots of 1 and 2 skip themselves)
    assert [t.points for t in candidates.totals] == [8, 5, 2, 0, 0]
    assert model_sha256(board.model) == model_digest(board.model)  # one definition of the hash
    # round 2 must start from the model the candidates' changes give, and no other
    board.model = board.model.copy()
    old = board.model
    board.sign(0, GlobalModel(LENGTH, old.astype("<f4").tobytes()), 2)
    stale = SecclAnnounce(model_digest(old), LENGTH, PARTICIPANTS, THETA, SHARE, M)
    refused = board.refused(0, stale, 2)
    assert refused.reason is RefusalReason.CONTRACT_VIOLATION
    assert "last election" in refused.detail
    fresh = SecclAnnounce(candidates.model_sha256, LENGTH, PARTICIPANTS, THETA, SHARE, M)
    board.sign(0, fresh, 2)
    assert board.ledger.state.current_round == 2


def test_a_candidate_list_that_differs_from_the_borda_result_is_refused(board: Board) -> None:
    board.announce(1)
    board.upload(1)
    board.evaluate(1)
    right = board.election(1)
    for wrong in (
        replace(right, candidates=(1, 3)),
        replace(right, candidates=(2, 1)),  # the right set in the wrong order
        replace(right, totals=(*right.totals[:-1], BordaTotal(5, 1))),
    ):
        refused = board.refused(0, wrong, 1)
        assert refused.reason is RefusalReason.CONTRACT_VIOLATION
        assert "Borda election" in refused.detail
    assert board.ledger.state.seccl_rounds[1].candidates is None
    board.sign(0, right, 1)


def test_an_evaluation_by_a_non_participant_is_refused(board: Board) -> None:
    board.announce(1, participants=(1, 2, 3, 4, 5))
    board.upload(1)
    refused = board.refused(6, _evaluation({1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5}), 1)
    assert refused.reason is RefusalReason.NOT_PARTICIPANT
    refused = board.refused(6, SparseUpdate.of(top_changes(_params(6), THETA)), 1)
    assert refused.reason is RefusalReason.NOT_PARTICIPANT


def test_a_self_evaluation_is_refused(board: Board) -> None:
    board.announce(1)
    board.upload(1)
    refused = board.refused(1, _evaluation({**VALUES[1], 1: 1.0}), 1)
    assert refused.reason is RefusalReason.SELF_EVALUATION


def test_an_evaluation_must_cover_exactly_the_other_uploads(board: Board) -> None:
    board.announce(1)
    board.upload(1, (1, 2, 3, 4))
    refused = board.refused(1, _evaluation(VALUES[1]), 1)  # names 5, who did not upload
    assert refused.reason is RefusalReason.CONTRACT_VIOLATION
    partial = {v: VALUES[1][v] for v in (2, 3)}
    assert board.refused(1, _evaluation(partial), 1).reason is RefusalReason.CONTRACT_VIOLATION
    board.sign(1, _evaluation({v: VALUES[1][v] for v in (2, 3, 4)}), 1)
    # uploads close with the first evaluation; a second evaluation is refused
    late = SparseUpdate.of(top_changes(_params(5), THETA))
    assert board.refused(5, late, 1).reason is RefusalReason.OUT_OF_ORDER
    again = _evaluation({v: VALUES[1][v] for v in (2, 3, 4)})
    assert board.refused(1, again, 1).reason is RefusalReason.OUT_OF_ORDER


def test_a_global_model_that_does_not_follow_from_the_candidates_is_refused(
    board: Board,
) -> None:
    board.announce(1)
    board.upload(1)
    board.evaluate(1)
    right = board.election(1)
    # the average of all uploads, not of the candidates'
    everyone = {u: top_changes(_params(u) * 0.1, THETA) for u in PARTICIPANTS}
    for model in (aggregate(board.model, everyone), board.model, _params(99)):
        refused = board.refused(0, replace(right, model_sha256=model_digest(model)), 1)
        assert refused.reason is RefusalReason.CONTRACT_VIOLATION
        assert "does not follow from the candidates" in refused.detail
    board.sign(0, right, 1)


def test_the_candidates_wait_for_every_uploaders_evaluation(board: Board) -> None:
    board.announce(1)
    board.upload(1)
    board.evaluate(1, (1, 2, 3, 4))
    refused = board.refused(0, board.election(1), 1)
    assert refused.reason is RefusalReason.OUT_OF_ORDER and "[5]" in refused.detail


def test_an_announcement_must_name_the_tasks_theta_lambda_and_m(board: Board) -> None:
    board.sign(0, GlobalModel(LENGTH, board.model.astype("<f4").tobytes()), 1)
    digest = model_digest(board.model)
    for bad in (
        SecclAnnounce(digest, LENGTH, PARTICIPANTS, 0.5, SHARE, M),
        SecclAnnounce(digest, LENGTH, PARTICIPANTS, THETA, SHARE, 3),
        SecclAnnounce(digest, LENGTH, (2, 1, 3), THETA, SHARE, 1),
        SecclAnnounce(digest, LENGTH, (1, 2, 8), THETA, SHARE, 1),  # 8 is a ledger node
    ):
        assert board.refused(0, bad, 1).reason is RefusalReason.CONTRACT_VIOLATION


def test_each_modes_types_are_refused_in_the_other(
    identities: dict[int, Identity], roster: Roster, board: Board
) -> None:
    board.sign(0, GlobalModel(LENGTH, board.model.astype("<f4").tobytes()), 1)
    fairness = Announce(bytes(32), LENGTH, 16, (), (), (), (), 1.0, 1.0, 1)
    assert board.refused(0, fairness, 1).reason is RefusalReason.WRONG_MODE
    other = Board(identities, roster, mode="fairness", theta=None, candidate_share=None)
    other.sign(0, GlobalModel(LENGTH, other.model.astype("<f4").tobytes()), 1)
    announce = SecclAnnounce(model_digest(other.model), LENGTH, PARTICIPANTS, THETA, SHARE, M)
    assert other.refused(0, announce, 1).reason is RefusalReason.WRONG_MODE


def test_a_holder_without_the_changes_cannot_admit_the_candidates_yet(board: Board) -> None:
    board.play(1)
    blocks = board.ledger.blocks
    # a follower re-deriving with a blob missing: missing_payload on the candidates only
    candidate_change = board.ledger.state.seccl_rounds[1].uploads[1][1]  # user 2's
    held = {d: p for d, p in board.blobs.items() if d != candidate_change}
    state = LedgerState(board.ledger.state.roster, evaluations=EvaluationCheck(held.get))
    for block in blocks[:-1]:
        state.apply_block(block)
    assert candidate_change in state.payloads_needed(blocks[-1].txs)
    draft = state.draft()
    with pytest.raises(RefusedError) as info:
        draft.admit(blocks[-1].txs[0])
    assert info.value.reason is RefusalReason.MISSING_PAYLOAD
    # with every blob, an auditor replays the run and re-derives the same election
    full = LedgerState(board.ledger.state.roster, evaluations=EvaluationCheck(board.blobs.get))
    for block in blocks:
        full.apply_block(block)
    assert full.seccl_rounds[1] == board.ledger.state.seccl_rounds[1]


# --- phase deadlines: seccl_close ------------------------------------------------------------


def _kept_election(
    board: Board, uploaders: tuple[int, ...], evaluators: tuple[int, ...]
) -> Candidates:
    values = {u: {v: VALUES[u][v] for v in uploaders if v != u} for u in evaluators}
    result = elect(values, uploaders, M)
    changes = {c: top_changes(_params(c) * 0.1, THETA) for c in result.candidates}
    totals = tuple(BordaTotal(u, p) for u, p in sorted(result.totals.items()))
    return Candidates(result.candidates, totals, model_digest(aggregate(board.model, changes)))


def test_a_close_of_the_uploads_keeps_recorded_ones_and_takes_no_more(board: Board) -> None:
    board.announce(1)
    board.upload(1, (1, 2, 3, 4))
    for bad in (
        SecclClose("uploads", (1, 2, 5)),  # 5 recorded no upload
        SecclClose("uploads", (2, 1)),  # not ascending
        SecclClose("uploads", (1,)),  # nothing to elect
    ):
        assert board.refused(0, bad, 1).reason is RefusalReason.CONTRACT_VIOLATION
    # user 4's upload was recorded as the deadline passed: the close may leave it out
    board.sign(0, SecclClose("uploads", (1, 2, 3)), 1)
    assert board.ledger.state.seccl_rounds[1].uploaders == {1, 2, 3}
    late = SparseUpdate.of(top_changes(_params(5) * 0.1, THETA))
    assert board.refused(5, late, 1).reason is RefusalReason.OUT_OF_ORDER
    again = SecclClose("uploads", (1, 2))
    assert board.refused(0, again, 1).reason is RefusalReason.OUT_OF_ORDER
    # user 4 is out of the round: it may not evaluate, and nobody evaluates it
    four = _evaluation({v: VALUES[4][v] for v in (1, 2, 3)})
    assert board.refused(4, four, 1).reason is RefusalReason.CONTRACT_VIOLATION
    assert board.refused(1, _evaluation({v: VALUES[1][v] for v in (2, 3, 4)}), 1).reason is (
        RefusalReason.CONTRACT_VIOLATION
    )
    for u in (1, 2, 3):
        board.sign(u, _evaluation({v: VALUES[u][v] for v in (1, 2, 3) if v != u}), 1)
    board.sign(0, _kept_election(board, (1, 2, 3), (1, 2, 3)), 1)
    assert board.ledger.state.seccl_rounds[1].candidates is not None


def test_uploads_close_with_the_first_evaluation(board: Board) -> None:
    board.announce(1)
    board.upload(1)
    board.evaluate(1, (1,))
    late_close = SecclClose("uploads", PARTICIPANTS)
    assert board.refused(0, late_close, 1).reason is RefusalReason.OUT_OF_ORDER


def test_an_evaluation_without_an_own_upload_is_refused(board: Board) -> None:
    board.announce(1)
    board.upload(1, (1, 2, 3, 4))
    refused = board.refused(5, _evaluation({v: VALUES[5][v] for v in (1, 2, 3, 4)}), 1)
    assert refused.reason is RefusalReason.CONTRACT_VIOLATION and "no upload" in refused.detail


def test_a_close_of_the_evaluations_elects_on_the_kept_ones(board: Board) -> None:
    board.announce(1)
    board.upload(1)
    board.evaluate(1, (1, 2, 3, 4))
    for bad in (SecclClose("evaluations", (1, 5)), SecclClose("evaluations", ())):
        assert board.refused(0, bad, 1).reason is RefusalReason.CONTRACT_VIOLATION
    board.sign(0, SecclClose("evaluations", (1, 2, 3)), 1)  # 4's came as the deadline passed
    assert board.refused(5, _evaluation(VALUES[5]), 1).reason is RefusalReason.OUT_OF_ORDER
    again = SecclClose("evaluations", (1, 2))
    assert board.refused(0, again, 1).reason is RefusalReason.OUT_OF_ORDER
    everyone = _kept_election(board, PARTICIPANTS, (1, 2, 3, 4))
    kept = _kept_election(board, PARTICIPANTS, (1, 2, 3))
    assert everyone.totals != kept.totals
    refused = board.refused(0, everyone, 1)
    assert refused.reason is RefusalReason.CONTRACT_VIOLATION and "Borda" in refused.detail
    board.sign(0, kept, 1)
    # an auditor replaying the blocks with every blob re-derives the same round
    full = LedgerState(board.ledger.state.roster, evaluations=EvaluationCheck(board.blobs.get))
    for block in board.ledger.blocks:
        full.apply_block(block)
    assert full.seccl_rounds[1] == board.ledger.state.seccl_rounds[1]
