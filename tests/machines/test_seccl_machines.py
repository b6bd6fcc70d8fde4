"""SecCL's server and participant machines by hand: events in, outputs out, every
transaction admitted by an :class:`InProcessLedger` that re-derives each election and
new global model (:mod:`fairbus.ledger.seccl`)."""

from __future__ import annotations

import hashlib
from collections import deque

import numpy as np
import numpy.typing as npt
import pytest

from fairbus.identity import Identity
from fairbus.ledger.inprocess import InProcessLedger
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.protocol.events import (
    PROVIDER,
    Commit,
    Dropped,
    EvaluatePeers,
    PeersEvaluated,
    Received,
    Refused,
    RoundFailed,
    SecclOutput,
    SecclRoundDone,
    StartRound,
    Tick,
    Train,
    Trained,
)
from fairbus.protocol.seccl_provider import SecclPhase, SecclServerConfig, SecclServerMachine
from fairbus.protocol.seccl_user import SecclUserMachine, SecclUserPhase
from fairbus.roster import Member, Role, Roster
from fairbus.seccl import aggregate, elect, top_changes
from fairbus.task import PHASE_TIMEOUT, TaskParams
from fairbus.wire.messages import CommittedTestSet, EvaluationSpec, GlobalModel, SparseUpdate
from tests.support_draws import SeededDraws

USERS = (1, 2, 3, 4)
LENGTH = 20
THETA, SHARE = 0.25, 0.5  # k = 5 of 20; M = 2 of 4


def _delta(user: int) -> npt.NDArray[np.float32]:
    return SeededDraws(user).normal(size=LENGTH).astype(np.float32) * user


class Board:
    """The server and the participants, each commit relayed to everyone else."""

    def __init__(self) -> None:
        ids = {pid: Identity.generate(pid) for pid in (0, *USERS, 100)}
        role = {0: Role.PROVIDER, 100: Role.LEDGER}
        self.roster = Roster("seccl-test", [Member(i.public, role.get(p, Role.USER))
                                            for p, i in ids.items()])  # fmt: skip
        self.ledger = InProcessLedger(self.roster, ids[100])
        test_set = CommittedTestSet((1, 8, 8), 10, bytes(2 * 64 * 2), bytes(2))
        spec = EvaluationSpec("digits_cnn", hashlib.sha256(test_set.payload()).digest())
        task = TaskParams(evaluation=spec, mode="seccl", theta=THETA, candidate_share=SHARE)
        self.initial = np.linspace(-1, 1, LENGTH).astype(np.float32)
        self.server = SecclServerMachine(
            ids[0], self.roster, self.initial, SecclServerConfig(task, test_set)
        )
        self.users = {u: SecclUserMachine(ids[u], self.roster) for u in USERS}
        self.queue: deque[tuple[int | str, str, bytes]] = deque()
        self.effects: list[tuple[int, SecclOutput]] = []
        self.done: list[SecclRoundDone] = []
        self.refused: list[tuple[int | str, Refused]] = []
        self.failed: list[RoundFailed] = []
        self.silent: set[int] = set()
        """Participants that never train (so never upload)."""
        self.mute: set[int] = set()
        """Participants that never answer their evaluation."""

    def carry(self, source: int | str, outputs: list[SecclOutput]) -> None:
        for out in outputs:
            if isinstance(out, Commit):
                data = self.ledger.commit(out.envelope)
                for target in (PROVIDER, *USERS):
                    if target != source:
                        self.queue.append((target, out.kind, data))
            elif isinstance(out, SecclRoundDone):
                self.done.append(out)
            elif isinstance(out, Refused):
                self.refused.append((source, out))
            elif isinstance(out, RoundFailed):
                self.failed.append(out)
            elif isinstance(source, int):
                self.effects.append((source, out))

    def pump(self) -> None:
        while self.queue:
            to, kind, data = self.queue.popleft()
            machine = self.server if to == PROVIDER else self.users[int(to)]
            self.carry(to, machine.handle(Received(kind, data)))

    def answer(self, scores: dict[int, dict[int, float]]) -> None:
        """Train (the global model plus each user's fixed change) and evaluate with
        ``scores`` (evaluator → target → value), until nothing is left to do."""
        while self.effects or self.queue:
            self.pump()
            effects, self.effects = self.effects, []
            for user, effect in effects:
                if user in self.silent or (user in self.mute and isinstance(effect, EvaluatePeers)):
                    continue
                if isinstance(effect, Train):
                    trained = effect.global_params + _delta(user)
                    self.carry(user, self.users[user].handle(Trained(effect.round, trained)))
                elif isinstance(effect, EvaluatePeers):
                    values = {v: scores[user][v] for v in effect.models}
                    self.carry(user, self.users[user].handle(PeersEvaluated(effect.round, values)))


SCORES = {u: {v: 1.0 - v / 10 for v in USERS if v != u} for u in USERS}


def test_a_seccl_round_by_hand() -> None:
    board = Board()
    board.carry(PROVIDER, board.server.handle(StartRound(0.0)))
    board.answer(SCORES)
    assert board.refused == []
    [done] = board.done
    result = elect(SCORES, USERS, 2)
    assert done.candidates == result.candidates == (1, 2)
    changes = {c: top_changes(_delta(c), THETA) for c in result.candidates}
    assert np.array_equal(done.global_params, aggregate(board.initial, changes))
    assert board.server.phase is SecclPhase.IDLE
    record = board.ledger.state.seccl_rounds[1]
    assert record.candidates is not None and record.candidates.candidates == (1, 2)
    assert len(record.uploads) == len(record.evaluations) == 4
    assert all(m.phase is SecclUserPhase.IDLE for m in board.users.values())
    # the next round starts from the new model, and every participant takes it
    board.carry(PROVIDER, board.server.handle(StartRound(1.0)))
    board.pump()
    trains = [e for _, e in board.effects if isinstance(e, Train)]
    assert len(trains) == 4 and all(np.array_equal(t.global_params, done.global_params)
                                    for t in trains)  # fmt: skip
    assert board.refused == []


def test_a_second_start_while_collecting_is_refused() -> None:
    board = Board()
    board.carry(PROVIDER, board.server.handle(StartRound(0.0)))
    out = board.server.handle(StartRound(1.0))
    assert [type(o) for o in out] == [Refused] and out[0].reason == "RoundInProgress"  # type: ignore[union-attr]


def test_a_participant_refuses_a_model_that_is_not_the_announced_one() -> None:
    board = Board()
    outputs = board.server.handle(StartRound(0.0))
    commits = [o for o in outputs if isinstance(o, Commit)]
    kinds = [c.kind for c in commits]
    assert kinds == ["test_set", "task_start", "global_model", "seccl_announce"]
    user = board.users[1]
    recorded = {c.kind: board.ledger.commit(c.envelope) for c in commits}
    # a different model, signed by the provider but not recorded by the ledger: refused
    server = board.server
    forged = server._signed(GlobalModel(LENGTH, np.zeros(LENGTH, dtype="<f4").tobytes()))
    refused = user.handle(Received("global_model", forged.envelope.to_bytes()))
    assert [type(o) for o in refused] == [Refused]
    # the recorded model, but an announcement naming another hash: no training
    other = Board()
    other_out = other.server.handle(StartRound(0.0))
    announce = next(o for o in other_out if isinstance(o, Commit) and o.kind == "seccl_announce")
    for c in other_out:
        if isinstance(c, Commit):
            other.ledger.commit(c.envelope)
    assert user.handle(Received("global_model", recorded["global_model"])) == []
    wrong = other.ledger.commit(announce.envelope)
    out = user.handle(Received("seccl_announce", wrong))
    assert [type(o) for o in out] == [Refused]  # recorded by a ledger outside its roster
    out = user.handle(Received("seccl_announce", recorded["seccl_announce"]))
    assert [type(o) for o in out] == [Train]


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1])
def test_a_participant_signs_only_values_in_range(bad: float) -> None:
    board = Board()
    board.carry(PROVIDER, board.server.handle(StartRound(0.0)))
    scores = {u: dict(v) for u, v in SCORES.items()}
    scores[1][2] = bad
    board.answer(scores)
    assert [(s, r.reason) for s, r in board.refused] == [(1, "SecclError")]
    assert board.done == []  # user 1 never evaluated: the round waits for it
    assert 1 not in board.ledger.state.seccl_rounds[1].evaluators


# --- phase deadlines (not in the paper: one silent participant would stall its round) ---


def test_a_participant_that_never_uploads_is_closed_out_at_the_deadline() -> None:
    board = Board()
    board.silent = {4}
    board.carry(PROVIDER, board.server.handle(StartRound(0.0)))
    board.answer(SCORES)
    assert board.done == [] and board.ledger.state.seccl_rounds[1].uploaders == {1, 2, 3}
    board.carry(PROVIDER, board.server.handle(Tick(PHASE_TIMEOUT - 1.0)))
    assert board.queue == deque()  # not yet
    board.carry(PROVIDER, board.server.handle(Tick(PHASE_TIMEOUT)))
    board.answer(SCORES)
    [done] = board.done
    record = board.ledger.state.seccl_rounds[1]
    assert record.kept_uploads == (1, 2, 3) and record.evaluators == {1, 2, 3}
    kept = {u: {v: x for v, x in SCORES[u].items() if v != 4} for u in (1, 2, 3)}
    assert done.candidates == elect(kept, (1, 2, 3), 2).candidates
    assert board.refused == []
    # user 4 saw the close without its name: it sits the round out, and the ledger
    # would take no late change of it anyway
    machine = board.users[4]
    assert machine.phase is SecclUserPhase.IDLE
    late = machine.handle(Trained(1, board.initial + _delta(4)))
    assert [o.reason for o in late if isinstance(o, Refused)] == ["StaleTraining"]
    change = machine._signed(SparseUpdate.of(top_changes(_delta(4), THETA)))
    with pytest.raises(RefusedError) as info:
        board.ledger.commit(change.envelope)
    assert info.value.reason is RefusalReason.OUT_OF_ORDER


def test_a_dropped_participant_closes_the_uploads_at_once() -> None:
    board = Board()
    board.silent = {3}
    board.carry(PROVIDER, board.server.handle(StartRound(0.0)))
    board.answer(SCORES)
    assert board.done == []
    board.carry(PROVIDER, board.server.handle(Dropped(3)))  # its Last Will, say
    board.answer(SCORES)
    [done] = board.done
    assert set(done.totals) == {1, 2, 4}
    assert board.ledger.state.seccl_rounds[1].kept_uploads == (1, 2, 4)


def test_a_participant_that_never_evaluates_is_closed_out_at_the_deadline() -> None:
    board = Board()
    board.mute = {1}
    board.carry(PROVIDER, board.server.handle(StartRound(0.0)))
    board.answer(SCORES)
    assert board.done == []
    board.carry(PROVIDER, board.server.handle(Tick(5.0)))  # the uploads ended at 0.0
    board.carry(PROVIDER, board.server.handle(Tick(PHASE_TIMEOUT + 1.0)))
    board.answer(SCORES)
    [done] = board.done
    record = board.ledger.state.seccl_rounds[1]
    assert record.kept_evaluations == (2, 3, 4) and record.uploaders == set(USERS)
    kept = {u: SCORES[u] for u in (2, 3, 4)}
    assert done.candidates == elect(kept, USERS, 2).candidates
    assert record.candidates is not None and record.candidates.candidates == done.candidates


def test_too_few_changes_by_the_deadline_fail_the_round_and_the_next_starts_afresh() -> None:
    board = Board()
    board.silent = {2, 3, 4}
    board.carry(PROVIDER, board.server.handle(StartRound(0.0)))
    board.answer(SCORES)
    board.carry(PROVIDER, board.server.handle(Tick(PHASE_TIMEOUT)))
    assert [f.round for f in board.failed] == [1] and board.server.phase is SecclPhase.IDLE
    assert board.ledger.state.seccl_rounds[1].kept_uploads is None  # nothing was closed
    board.silent = set()
    board.effects = []
    board.carry(PROVIDER, board.server.handle(StartRound(PHASE_TIMEOUT + 1.0)))
    board.answer(SCORES)
    [done] = board.done
    assert done.round == 2 and set(done.totals) == set(USERS)
