"""SecCL's parameter server, as a sans-I/O state machine (SecCL, "Message Interaction
Protocol": Participant-Server and Server-TBB Interaction; "Consensus among
Participants").

One round:

1. ``StartRound``: the first time, the task's test set (when configured) and its task
   start (mode ``seccl``, θ, λ) are committed; then the round's global model and its
   announcement (:class:`~fairbus.wire.messages.SecclAnnounce`: the model's hash, the
   participants — every user online and not known to have dropped —, θ, λ and M). Each
   is a ledger transaction (the trusted bulletin board) and reaches the participants
   with its receipt (the paper's Tx-ID).
2. Every participant's type (a) message (:class:`~fairbus.wire.messages.SparseUpdate`)
   and type (b) message (:class:`~fairbus.wire.messages.PeerEvaluation`) arrives as
   recorded bytes (the ledger admitted it first): the receipt, the signature and the
   sender's hash chain are checked, the body strictly decoded.
3. Once every participant uploaded (or the uploads were closed) and every uploader
   evaluated (or the evaluations were closed), the server runs the consensus
   contract's election itself (:func:`fairbus.seccl.elect`, the same
   function the ledger re-derives it with), updates the global model with the
   candidates' changes (:func:`fairbus.seccl.aggregate`) and commits the result
   (:class:`~fairbus.wire.messages.Candidates`, naming the new model's hash), which the
   ledger admits only if it re-derives both; :class:`SecclRoundDone`.

Deadlines (not in the paper, whose round ends when "all participants have
successfully uploaded", so one silent participant stalls it for ever): each phase has
``phase_timeout`` seconds, counted on the driver's clock (:class:`StartRound` and
:class:`Tick`). When the uploads' deadline passes — or sooner, once every participant
still missing is known to have dropped (:class:`Dropped`) — the server closes the
uploads with those it holds (a recorded :class:`~fairbus.wire.messages.SecclClose`
naming them; the participants then evaluate exactly those); with fewer than two the
round fails (nothing to elect; the next round starts from the same model). Likewise
the evaluations' deadline, counted from the uploads' end, closes the evaluations with
the evaluators it holds (at least one, else the round fails) and the election runs on
theirs. ``Joined`` and ``Dropped`` change who takes part from the next round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from fairbus import envelope
from fairbus.envelope import GENESIS, ChainTracker
from fairbus.errors import FairbusError, SchemaError
from fairbus.identity import Identity
from fairbus.ledger.recorded import open_recorded
from fairbus.protocol.events import (
    USERS,
    ChainHead,
    Commit,
    Dropped,
    Joined,
    PeersEvaluated,
    Received,
    Refused,
    RoundFailed,
    SecclEvent,
    SecclOutput,
    SecclRoundDone,
    StartRound,
    Tick,
    Trained,
)
from fairbus.protocol.user import model_digest
from fairbus.roster import Role, Roster
from fairbus.seccl import aggregate, candidate_count, elect
from fairbus.seccl.sparse import SparseChange, shared_count
from fairbus.task import PHASE_TIMEOUT, TaskParams
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    SECCL,
    BordaTotal,
    Candidates,
    CommittedTestSet,
    GlobalModel,
    Message,
    PeerEvaluation,
    SecclAnnounce,
    SecclClose,
    SparseUpdate,
)


def checked_change(message: SparseUpdate, length: int, k: int) -> SparseChange:
    """The change a type (a) message holds, for a model of ``length`` parameters that
    shares exactly ``k`` of them (θ's count), or :class:`~fairbus.errors.SchemaError`."""
    change = message.change()
    if change.length != length or change.count != k:
        raise SchemaError(
            f"{change.count} changes of {change.length} parameters; θ gives {k} of {length}"
        )
    return change


class SecclPhase(Enum):
    IDLE = "idle"
    COLLECTING = "collecting"  # uploads and evaluations of the round


@dataclass(frozen=True)
class SecclServerConfig:
    """The task (its mode must be ``seccl``), the test set its task start names, and
    the seconds each phase of a round may last (see the module docstring)."""

    task: TaskParams
    test_set: CommittedTestSet | None = None
    phase_timeout: float = PHASE_TIMEOUT

    def __post_init__(self) -> None:
        if self.task.mode != SECCL or self.task.theta is None:
            raise SchemaError("a SecCL server runs a task whose mode is 'seccl'")
        if (self.test_set is None) != (self.task.evaluation is None):
            raise SchemaError("the task start names a test set exactly when one is recorded")
        if not (self.phase_timeout > 0.0):
            raise SchemaError(f"a phase timeout of {self.phase_timeout} s")


class SecclServerMachine:
    """Events in, outputs out; see the module docstring."""

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        initial_params: npt.NDArray[np.float32],
        config: SecclServerConfig,
        *,
        limits: WireLimits = DEFAULT_LIMITS,
        prev: bytes = GENESIS,
        online: Iterable[int] | None = None,
    ) -> None:
        """``online``: the users known to be online at the start (None: every user of
        the roster); :class:`Joined` and :class:`Dropped` change it."""
        self.identity = identity
        self.roster = roster
        self.config = config
        self.limits = limits
        self.prev = prev
        self.global_params = np.asarray(initial_params, dtype=np.float32).copy()
        self.phase = SecclPhase.IDLE
        self.round = 0
        self.started = False
        self._users = frozenset(roster.with_role(Role.USER))
        self.online = set(self._users) if online is None else set(online) & self._users
        self.participants: tuple[int, ...] = ()
        self.candidates = 1
        self._k = shared_count(config.task.theta or 0.0, int(self.global_params.size))
        self._chains = ChainTracker()
        self._updates: dict[int, SparseChange | None] = {}
        self._evaluations: dict[int, dict[int, float]] = {}
        self._now = 0.0
        self._deadline = 0.0
        self._uploads_closed = False
        """The uploads are over: every participant's is in, or a close was committed."""
        self._evaluations_closed = False

    # --- events ------------------------------------------------------------------------------

    def handle(self, event: SecclEvent) -> list[SecclOutput]:
        if isinstance(event, StartRound):
            return self._start_round(event.now)
        if isinstance(event, ChainHead):
            self._chains.resync(event.participant, event.head)
            return []
        if isinstance(event, Received):
            try:
                return self._on_received(event)
            except FairbusError as exc:
                return [Refused(type(exc).__name__, str(exc))]
        if isinstance(event, Dropped | Joined):
            if event.user not in self._users:
                return [Refused("NotAUser", f"{event.user} is not a user of the roster")]
            if isinstance(event, Dropped):
                self.online.discard(event.user)
                return self._maybe_close(expired=False)
            self.online.add(event.user)
            return []
        if isinstance(event, Tick):
            self._now = max(self._now, event.now)
            return self._maybe_close(expired=self._now >= self._deadline)
        if isinstance(event, Trained | PeersEvaluated):
            return []
        raise TypeError(f"the SecCL server does not take {type(event).__name__}")

    def _start_round(self, now: float) -> list[SecclOutput]:
        if self.phase is not SecclPhase.IDLE:
            return [Refused("RoundInProgress", f"round {self.round} is still collecting")]
        self.round += 1
        participants = tuple(sorted(self.online))
        if len(participants) < 2:
            return [RoundFailed(self.round, f"{len(participants)} participant(s) online")]
        out: list[SecclOutput] = []
        if not self.started:
            if self.config.test_set is not None:
                out.append(self._signed(self.config.test_set))
            out.append(self._signed(self.config.task.to_message()))
            self.started = True
        task = self.config.task
        share = task.candidate_share or 0.0
        self.participants = participants
        self.candidates = candidate_count(share, len(participants))
        self._updates = {}
        self._evaluations = {}
        self._uploads_closed = self._evaluations_closed = False
        self._now = max(self._now, now)
        self._deadline = self._now + self.config.phase_timeout
        params = self.global_params
        out.append(self._signed(GlobalModel(int(params.size), params.astype("<f4").tobytes())))
        announce = SecclAnnounce(
            model_digest(params),
            int(params.size),
            participants,
            task.theta or 0.0,
            share,
            self.candidates,
        )
        out.append(self._signed(announce))
        self.phase = SecclPhase.COLLECTING
        return out

    def _on_received(self, event: Received) -> list[SecclOutput]:
        if event.kind not in ("seccl_update", "seccl_evaluation"):
            return []  # the server's own transactions, relayed on the board
        recorded = open_recorded(event.data, self.roster, self.limits)
        env = recorded.envelope
        header = env.header
        self._chains.accept(env)  # every transaction of a user extends its chain
        if self.phase is not SecclPhase.COLLECTING or header.round != self.round:
            return [Refused("StaleUpload", f"a {header.type} for round {header.round}")]
        sender = header.sender
        if sender not in self.participants:
            return [Refused("NotAParticipant", f"user {sender} is not in round {self.round}")]
        message = recorded.message
        out: list[SecclOutput] = []
        if isinstance(message, SparseUpdate):
            if self._uploads_closed:
                return [Refused("LateUpload", f"user {sender}'s change after the uploads closed")]
            # Recorded, so it counts in the election whatever it holds; a malformed one
            # is kept as None (participants give it 0) and may not be aggregated.
            try:
                self._updates[sender] = checked_change(message, self.global_params.size, self._k)
            except SchemaError as exc:
                self._updates[sender] = None
                out.append(Refused(type(exc).__name__, f"user {sender}'s upload: {exc}"))
        elif isinstance(message, PeerEvaluation):
            if self._evaluations_closed or sender not in self._updates:
                return [Refused("LateEvaluation", f"user {sender}'s evaluation is not kept")]
            self._evaluations[sender] = message.values()
        return out + self._maybe_close(expired=False)

    def _maybe_close(self, *, expired: bool) -> list[SecclOutput]:
        """End a phase when it is complete, or close it at its deadline (or, for the
        uploads, once every participant still missing has dropped), then elect once
        both phases are over."""
        if self.phase is not SecclPhase.COLLECTING:
            return []
        out: list[SecclOutput] = []
        if not self._uploads_closed:
            missing = set(self.participants) - set(self._updates)
            if missing and not expired and missing & self.online:
                return []  # someone missing may still upload
            self._uploads_closed = True
            self._deadline = self._now + self.config.phase_timeout
            expired = False
            if missing:
                if len(self._updates) < 2:
                    self.phase = SecclPhase.IDLE
                    why = f"{len(self._updates)} change(s) by the uploads' deadline"
                    return [RoundFailed(self.round, why)]
                out.append(self._signed(SecclClose("uploads", tuple(sorted(self._updates)))))
        if not self._evaluations_closed:
            missing = set(self._updates) - set(self._evaluations)
            if missing and not expired and missing & self.online:
                return out
            self._evaluations_closed = True
            if missing:
                if not self._evaluations:
                    self.phase = SecclPhase.IDLE
                    return [*out, RoundFailed(self.round, "no evaluation by the deadline")]
                kept = tuple(sorted(self._evaluations))
                out.append(self._signed(SecclClose("evaluations", kept)))
        return out + self._elect()

    def _elect(self) -> list[SecclOutput]:
        election = elect(self._evaluations, self._updates, self.candidates)
        changes = {c: self._updates[c] for c in election.candidates}
        usable = {c: change for c, change in changes.items() if change is not None}
        if len(usable) != len(changes):
            self.phase = SecclPhase.IDLE
            bad = sorted(set(changes) - set(usable))
            return [RoundFailed(self.round, f"candidates {bad} uploaded malformed changes")]
        new = aggregate(self.global_params, usable)
        totals = tuple(BordaTotal(u, p) for u, p in sorted(election.totals.items()))
        commit = self._signed(Candidates(election.candidates, totals, model_digest(new)))
        self.global_params = new
        self.phase = SecclPhase.IDLE
        done = SecclRoundDone(
            self.round, self.participants, election.candidates, dict(election.totals), new
        )
        return [commit, done]

    def _signed(self, message: Message) -> Commit:
        scoped = {"round": self.round, "attempt": 0} if message.SCOPED else {}
        env = envelope.sign(self.identity, self.roster.task, message, prev=self.prev, **scoped)
        self.prev = env.hash
        return Commit(USERS, env)
