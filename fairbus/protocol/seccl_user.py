"""A SecCL participant, as a sans-I/O state machine (SecCL, "Message Interaction
Protocol", the paper's Fig. 3).

One round, as the participant sees it:

1. the round's global model and announcement arrive, each recorded on the ledger (the
   receipt, the paper's Tx-ID, is checked first: the participant acts only on what the
   bulletin board holds); the model must hash to the announced one, which must be the
   model the last recorded election gave (:class:`~fairbus.wire.messages.Candidates`),
   and θ must give a sensible count; if it is a participant it asks its driver to train
   (:class:`~fairbus.protocol.events.Train`);
2. with the trained model: Δ = trained − global, the top θ of it
   (:func:`fairbus.seccl.top_changes`), signed on its hash chain as a type (a) message
   (:class:`~fairbus.wire.messages.SparseUpdate`) and committed;
3. every other participant's recorded type (a) message is checked (sender a
   participant, θ's count of valid changes to the model); once it holds all of them and
   its own is committed, it asks its driver for their evaluation values
   (:class:`~fairbus.protocol.events.EvaluatePeers`: the global model with each change
   applied, on its private validation data, macro F-score); a malformed change gets 0;
4. the values, signed, are its type (b) message
   (:class:`~fairbus.wire.messages.PeerEvaluation`), committed;
5. the recorded election result ends its round.

A recorded close of the uploads (:class:`~fairbus.wire.messages.SecclClose`, the
server's deadline) names the changes the round keeps: the participant evaluates
exactly those others, or, if its own is not among them, sits the rest of the round
out.

A user the announcement does not name sits the round out.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
import numpy.typing as npt

from fairbus import envelope
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError, SchemaError
from fairbus.identity import Identity
from fairbus.ledger.recorded import open_recorded
from fairbus.protocol.events import (
    USERS,
    ChainHead,
    Commit,
    Dropped,
    EvaluatePeers,
    Joined,
    PeersEvaluated,
    Received,
    Refused,
    SecclEvent,
    SecclOutput,
    StartRound,
    Tick,
    Train,
    Trained,
)
from fairbus.protocol.seccl_provider import checked_change
from fairbus.protocol.user import model_digest
from fairbus.roster import Roster
from fairbus.seccl import apply_change, top_changes
from fairbus.seccl.sparse import SparseChange, shared_count
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    Candidates,
    GlobalModel,
    PeerEvaluation,
    PeerScore,
    SecclAnnounce,
    SecclClose,
    SparseUpdate,
)


class SecclUserPhase(Enum):
    IDLE = "idle"  # between rounds, or not a participant of the current one
    TRAINING = "training"  # asked the driver to train
    EVALUATING = "evaluating"  # uploaded; collecting the others' changes, then evaluating
    DONE = "done"  # evaluated; waiting for the election


class SecclUserMachine:
    """Events in, outputs out; see the module docstring."""

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        limits: WireLimits = DEFAULT_LIMITS,
        prev: bytes = GENESIS,
    ) -> None:
        self.identity = identity
        self.me = identity.participant_id
        self.roster = roster
        self.limits = limits
        self.prev = prev
        self.phase = SecclUserPhase.IDLE
        self.round = 0
        self._provider = roster.provider
        self._models: dict[int, tuple[bytes, npt.NDArray[np.float32]]] = {}
        """Round → (hash, params) of recorded global models not yet started."""
        self._announces: dict[int, SecclAnnounce] = {}
        self._announce: SecclAnnounce | None = None
        self._global: npt.NDArray[np.float32] | None = None
        self._expected_model: bytes | None = None
        """The model hash the last recorded election named: the next round's."""
        self._k = 0
        self._uploaded = False
        self._changes: dict[int, SparseChange | None] = {}
        self._kept: frozenset[int] | None = None
        """The uploaders a recorded close of the uploads kept (None: not closed)."""
        self._asked = False

    def handle(self, event: SecclEvent) -> list[SecclOutput]:
        if isinstance(event, Received):
            try:
                return self._on_received(event)
            except FairbusError as exc:
                return [Refused(type(exc).__name__, str(exc))]
        if isinstance(event, Trained):
            return self._on_trained(event)
        if isinstance(event, PeersEvaluated):
            return self._on_evaluated(event)
        if isinstance(event, ChainHead):
            if event.participant == self.me:
                self.prev = event.head
            return []
        if isinstance(event, Dropped | Joined | Tick):
            return []
        if isinstance(event, StartRound):
            raise TypeError("a SecCL participant does not start rounds")
        raise TypeError(f"a SecCL participant does not take {type(event).__name__}")

    # --- what the board relays -----------------------------------------------------------

    def _on_received(self, event: Received) -> list[SecclOutput]:
        if event.kind not in ("global_model", "seccl_announce", "seccl_update", "seccl_close",
                              "seccl_candidates"):  # fmt: skip
            return []
        recorded = open_recorded(event.data, self.roster, self.limits)
        header = recorded.envelope.header
        message = recorded.message
        r = header.round
        if r is None:
            raise SchemaError(f"a {header.type} names no round")
        if isinstance(message, SparseUpdate):
            return self._on_update(r, header.sender, message)
        if header.sender != self._provider:
            raise SchemaError(f"a {header.type} from {header.sender}, not the provider")
        if isinstance(message, GlobalModel):
            params = np.frombuffer(message.data, dtype="<f4").astype(np.float32)
            if params.size != message.length:
                raise SchemaError(f"a global model of {message.length} parameters in "
                                  f"{len(message.data)} bytes")  # fmt: skip
            if r > self.round:
                self._models[r] = (model_digest(params), params)
        elif isinstance(message, SecclAnnounce):
            if r > self.round:
                self._announces[r] = message
        elif isinstance(message, SecclClose):
            return self._on_close(r, message)
        elif isinstance(message, Candidates):
            if r == self.round:
                self._expected_model = message.model_sha256
                self.phase = SecclUserPhase.IDLE
            return []
        return self._try_start()

    def _try_start(self) -> list[SecclOutput]:
        ready = sorted(set(self._models) & set(self._announces))
        if not ready:
            return []
        r = ready[-1]
        digest, params = self._models[r]
        announce = self._announces[r]
        self._models = {n: m for n, m in self._models.items() if n > r}
        self._announces = {n: a for n, a in self._announces.items() if n > r}
        problems = []
        if digest != announce.model_sha256 or params.size != announce.model_params:
            problems.append("the recorded global model is not the announced one")
        if self._expected_model is not None and announce.model_sha256 != self._expected_model:
            problems.append("the announced model is not the one the last election gave")
        if list(announce.participants) != sorted(set(announce.participants)):
            problems.append("the participants are not ascending and distinct")
        theta = announce.theta
        if not (math.isfinite(theta) and 0.0 < theta <= 1.0):
            problems.append(f"θ = {theta} is not in (0, 1]")
        if problems:
            return [Refused("SecclAnnounceRefused", f"round {r}: " + "; ".join(problems))]
        self.round = r
        self._announce = announce
        self._global = params
        self._k = shared_count(theta, int(params.size))
        self._uploaded = False
        self._changes = {}
        self._kept = None
        self._asked = False
        if self.me not in announce.participants:
            self.phase = SecclUserPhase.IDLE
            return []
        self.phase = SecclUserPhase.TRAINING
        return [Train(r, params.copy())]

    def _on_update(self, r: int, sender: int, message: SparseUpdate) -> list[SecclOutput]:
        announce = self._announce
        if sender == self.me:
            return []  # its own, relayed back
        if announce is None or r != self.round or self.phase is SecclUserPhase.IDLE:
            return [Refused("StaleUpload", f"user {sender}'s change for round {r}")]
        if sender not in announce.participants:
            return [Refused("NotAParticipant", f"user {sender} is not in round {r}")]
        if self._kept is not None and sender not in self._kept:
            return [Refused("LateUpload", f"user {sender}'s change is not kept in round {r}")]
        if sender in self._changes:
            return [Refused("StaleUpload", f"a second change of user {sender} in round {r}")]
        out: list[SecclOutput] = []
        try:
            self._changes[sender] = checked_change(message, announce.model_params, self._k)
        except SchemaError as exc:
            self._changes[sender] = None  # recorded, so it is evaluated: with 0
            out.append(Refused(type(exc).__name__, f"user {sender}'s change: {exc}"))
        return out + self._maybe_evaluate()

    def _on_close(self, r: int, message: SecclClose) -> list[SecclOutput]:
        """The server's deadline: the uploads the round keeps (the evaluations' close
        changes nothing here: this participant's own is in, or never will be)."""
        if message.phase != "uploads" or r != self.round or self._kept is not None:
            return []
        if self.phase is SecclUserPhase.IDLE:
            return []
        self._kept = frozenset(message.users)
        if self.me not in self._kept:
            self.phase = SecclUserPhase.IDLE  # its change is not in the round
            return []
        self._changes = {u: c for u, c in self._changes.items() if u in self._kept}
        return self._maybe_evaluate()

    # --- effects answered ------------------------------------------------------------------

    def _on_trained(self, event: Trained) -> list[SecclOutput]:
        base = self._global
        if self.phase is not SecclUserPhase.TRAINING or event.round != self.round or base is None:
            return [Refused("StaleTraining", f"a model for round {event.round}")]
        params = np.asarray(event.params, dtype=np.float32)
        if params.shape != base.shape:
            return [Refused("SecclError", f"a trained model of {params.size} parameters")]
        try:
            change = top_changes(params - base, self._theta())
        except FairbusError as exc:
            return [Refused(type(exc).__name__, str(exc))]
        commit = self._signed(SparseUpdate.of(change))
        self._uploaded = True
        self.phase = SecclUserPhase.EVALUATING
        return [commit, *self._maybe_evaluate()]

    def _maybe_evaluate(self) -> list[SecclOutput]:
        announce = self._announce
        base = self._global
        if announce is None or base is None or not self._uploaded or self._asked:
            return []
        uploaders = self._kept if self._kept is not None else set(announce.participants)
        others = set(uploaders) - {self.me}
        if set(self._changes) != others:
            return []
        self._asked = True
        models = {
            u: (apply_change(base, c) if c is not None else None)
            for u, c in sorted(self._changes.items())
        }
        return [EvaluatePeers(self.round, models)]

    def _on_evaluated(self, event: PeersEvaluated) -> list[SecclOutput]:
        if (
            not self._asked
            or event.round != self.round
            or self.phase is not (SecclUserPhase.EVALUATING)
        ):
            return [Refused("StaleEvaluation", f"values for round {event.round}")]
        if set(event.scores) != set(self._changes):
            return [Refused("SecclError", "the values do not cover the others' changes")]
        scores = []
        for user in sorted(event.scores):
            value = 0.0 if self._changes[user] is None else float(event.scores[user])
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                return [Refused("SecclError", f"a value {value} for user {user}")]
            scores.append(PeerScore(user, value))
        self.phase = SecclUserPhase.DONE
        return [self._signed(PeerEvaluation(tuple(scores)))]

    def _theta(self) -> float:
        if self._announce is None:
            raise SchemaError("no announcement")
        return self._announce.theta

    def _signed(self, message: SparseUpdate | PeerEvaluation) -> Commit:
        env = envelope.sign(
            self.identity, self.roster.task, message, prev=self.prev, round=self.round, attempt=0
        )
        self.prev = env.hash
        return Commit(USERS, env)
