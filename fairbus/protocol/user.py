"""The user's side of a round, as a sans-I/O state machine.

One round for one user (Algorithm 1, lines 9-21, as the user sees them):

1. receive the global model and the signed announcement of round r, attempt a; check
   the grouping (every group ≥ 3, and no user's model determined by the round's group
   sums, the announced known groups of earlier attempts included:
   :func:`fairbus.grouping.check_grouping`) or refuse it;
2. ask the driver to train (:class:`Train`) — once per round, reused by later attempts;
3. per group, Algorithm 3 over sealed shares: deal, add what arrives, send the sum,
   reconstruct s_g, derive sk_gi;
4. per group, once its key and the model are ready: mask (Alg. 4), sign with the hash
   chain link, upload;
5. on the decision, learn whether it was excluded.

A new attempt of the same round supersedes the old one: its negotiation state is
dropped, and the user never uploads for it again.

A user of a task that runs :class:`~fairbus.aggregation.PlainFedAvg` (``secure=False``,
the baseline) instead trains on the provider's plain global model and sends its model
back in the clear; a user of a secure task refuses to.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import numpy.typing as npt

from fairbus import envelope, keyneg, masking
from fairbus.aggregation import PLAIN_MODEL, PlainModel
from fairbus.envelope import GENESIS, Verified
from fairbus.errors import FairbusError, GroupingError
from fairbus.field import FieldVector, FixedPointCodec
from fairbus.grouping import check_grouping
from fairbus.identity import Identity
from fairbus.ledger.recorded import open_recorded
from fairbus.protocol.events import (
    PROVIDER,
    SEALED_KINDS,
    ChainHead,
    Commit,
    Dropped,
    Evaluated,
    Event,
    Excluded,
    Joined,
    Output,
    Received,
    Refused,
    Send,
    Tick,
    Train,
    Trained,
)
from fairbus.roster import Roster
from fairbus.sealed import ReplayGuard, SealContext, SealedOuter, open_share, seal_share
from fairbus.shamir import Share
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    Announce,
    Decision,
    Dropout,
    GlobalModel,
    GroupSpec,
    MaskedUpload,
    vector_to_bytes,
)


class UserPhase(Enum):
    IDLE = "idle"  # between rounds, or not in the current grouping
    ACTIVE = "active"  # training, negotiating and uploading for (round, attempt)
    EXCLUDED = "excluded"  # found to be a violator: takes no further part


@dataclass(eq=False)
class _GroupState:
    spec: GroupSpec
    keying: keyneg.GroupKeying
    context: SealContext
    rand: FieldVector | None
    shares: dict[int, Share] = field(default_factory=dict)
    summed: dict[int, Share] = field(default_factory=dict)
    key: FieldVector | None = None
    uploaded: bool = False


def model_digest(params: npt.NDArray[np.float32]) -> bytes:
    """SHA-256 of a model's float32 little-endian bytes: what announcements name."""
    return hashlib.sha256(params.astype("<f4", copy=False).tobytes()).digest()


class UserMachine:
    """Events in, outputs out; see the module docstring for the round it plays."""

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        limits: WireLimits = DEFAULT_LIMITS,
        prev: bytes = GENESIS,
        max_early: int = 1024,
        secure: bool = True,
    ) -> None:
        """``secure=False``: the task runs :class:`~fairbus.aggregation.PlainFedAvg`; the
        user then answers the provider's plain global model with its own in the clear,
        and nothing else. A user of a secure task refuses a plain model."""
        self.secure = secure
        self.identity = identity
        self.me = identity.participant_id
        self.roster = roster
        self.limits = limits
        self.prev = prev
        self.phase = UserPhase.IDLE
        self.round = 0
        self.attempt = -1
        self._announce: tuple[int, int, Announce] | None = None
        self._model_offer: tuple[int, bytes, npt.NDArray[np.float32]] | None = None
        self._global: npt.NDArray[np.float32] | None = None
        self._local: npt.NDArray[np.float32] | None = None
        self._codec = FixedPointCodec()
        self._groups: dict[int, _GroupState] = {}
        self._guard = ReplayGuard()
        self._early: deque[tuple[int, int, str, bytes]] = deque(maxlen=max_early)

    # --- entry point ----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Output]:
        if self.phase is UserPhase.EXCLUDED:
            return []
        try:
            if isinstance(event, Received):
                if event.kind == PLAIN_MODEL or not self.secure:
                    return self._on_plain(event.kind, event.data)
                if event.kind in SEALED_KINDS:
                    return self._on_sealed(event.kind, event.data)
                return self._on_signed(event.data)
            if isinstance(event, Trained):
                return self._on_trained(event)
        except FairbusError as exc:
            return [Refused(type(exc).__name__, str(exc))]
        if isinstance(event, ChainHead):
            if event.participant == self.me:
                self.prev = event.head  # the ledger's head wins: see ChainHead
            return []
        if isinstance(event, Evaluated | Dropped | Joined | Tick):
            return []
        raise TypeError(f"user machine cannot take {type(event).__name__}")

    # --- signed messages from the provider --------------------------------------------------

    def _on_signed(self, data: bytes) -> list[Output]:
        # Only what the ledger holds: the receipt is checked before anything else.
        verified = open_recorded(data, self.roster, self.limits).verified
        msg = verified.message
        if isinstance(msg, GlobalModel):
            return self._on_global_model(verified, msg)
        if isinstance(msg, Announce):
            return self._on_announce(verified, msg)
        if isinstance(msg, Decision):
            return self._on_decision(verified, msg)
        if isinstance(msg, Dropout):
            return self._on_dropout(verified, msg)
        return []  # evaluations and the like are public record; nothing to do

    def _on_global_model(self, v: Verified, msg: GlobalModel) -> list[Output]:
        r = _round_of(v)
        if r < self.round:
            return []
        params = np.frombuffer(msg.data, dtype="<f4").astype(np.float32)
        if params.shape != (msg.length,):
            raise GroupingError(f"global model has {params.size} values, header says {msg.length}")
        self._model_offer = (r, model_digest(params), params)
        return self._try_start()

    def _on_announce(self, v: Verified, msg: Announce) -> list[Output]:
        r, a = _round_of(v), _attempt_of(v)
        if (r, a) <= (self.round, self.attempt):
            return []  # stale or repeated announcement
        self._announce = (r, a, msg)
        return self._try_start()

    def _try_start(self) -> list[Output]:
        if self._announce is None:
            return []
        r, a, msg = self._announce
        new_round = r != self.round
        offer = self._model_offer
        if new_round:
            if offer is None or offer[0] != r:
                return []  # wait for this round's model
            if offer[1] != msg.model_sha256:
                self._announce = None
                raise GroupingError(
                    f"round {r}: the global model does not match the announced hash"
                )
        self._announce = None
        mine = [g for g in msg.groups if self.me in g.members]
        # prior_groups: the ledger refuses an announcement that leaves out a group whose
        # sum is known (every member uploaded before the attempt was closed).
        check_grouping([g.members for g in msg.groups], msg.prior_groups)
        for g in mine:
            keyneg.GroupKeying(g.members, g.threshold)  # sizes, order, threshold
        out: list[Output] = []
        if new_round:
            assert offer is not None
            self._global = offer[2]
            if self._global.size != msg.model_params:
                raise GroupingError("announced model size differs from the global model")
            self._local = None
            self.round = r
            out.append(Train(r, self._global))
        self.attempt = a
        self._codec = FixedPointCodec(msg.frac_bits)
        self._groups = {}
        self.phase = UserPhase.ACTIVE if mine else UserPhase.IDLE
        for spec in mine:
            out += self._deal(spec, msg.model_params)
        out += self._replay_early()
        return out

    def _on_decision(self, v: Verified, msg: Decision) -> list[Output]:
        if _round_of(v) != self.round:
            return []
        self._groups = {}
        self.phase = UserPhase.IDLE
        if self.me in msg.violators:
            self.phase = UserPhase.EXCLUDED
            return [Excluded(self.round)]
        return []

    def _on_dropout(self, v: Verified, msg: Dropout) -> list[Output]:
        if (_round_of(v), _attempt_of(v)) == (self.round, self.attempt):
            self._groups = {}  # superseded: never upload for this attempt again
        return []

    # --- Algorithm 3 over sealed shares --------------------------------------------------------

    def _deal(self, spec: GroupSpec, length: int) -> list[Output]:
        keying = keyneg.GroupKeying(spec.members, spec.threshold)
        context = SealContext(self.roster.task, self.round, self.attempt, spec.gid)
        dealt = keyneg.deal_shares(keying, length)  # lines 2-3
        state = _GroupState(spec, keying, context, dealt.rand)
        state.shares[self.me] = dealt.shares[self.me]
        self._groups[spec.gid] = state
        out: list[Output] = [
            Send(j, "share", seal_share(self.identity, self.roster, j, context, "share", s))
            for j, s in dealt.shares.items()
            if j != self.me
        ]  # line 4
        return out + self._progress(state)

    def _on_sealed(self, kind: str, data: bytes) -> list[Output]:
        outer = SealedOuter.from_wire(codec.unpack(data, self.limits), "sealed", self.limits)
        if (outer.round, outer.attempt) > (self.round, self.attempt):
            self._early.append((outer.round, outer.attempt, kind, data))
            return []
        state = self._groups.get(outer.group)
        if (outer.round, outer.attempt) != (self.round, self.attempt) or state is None:
            return []  # a superseded attempt, or a group we are not in
        opened = open_share(data, self.identity, self.roster, state.context, self.limits)
        if opened.sender not in state.keying.members:
            raise GroupingError(f"share from {opened.sender}, who is not in group {outer.group}")
        self._guard.admit(opened)
        target = state.shares if opened.kind == "share" else state.summed
        target[opened.sender] = opened.share
        return self._progress(state)

    def _replay_early(self) -> list[Output]:
        ready = [e for e in self._early if (e[0], e[1]) == (self.round, self.attempt)]
        self._early = deque(
            (e for e in self._early if (e[0], e[1]) > (self.round, self.attempt)),
            maxlen=self._early.maxlen,
        )
        out: list[Output] = []
        for _, _, kind, data in ready:
            try:
                out += self._on_sealed(kind, data)
            except FairbusError as exc:
                out.append(Refused(type(exc).__name__, str(exc)))
        return out

    def _progress(self, state: _GroupState) -> list[Output]:
        out: list[Output] = []
        keying = state.keying
        if self.me not in state.summed and len(state.shares) == keying.size:
            mine = keyneg.sum_received(keying, self.me, state.shares)  # line 7
            state.summed[self.me] = mine
            out += [
                Send(
                    j,
                    "summed_share",
                    seal_share(self.identity, self.roster, j, state.context, "summed_share", mine),
                )
                for j in keying.members
                if j != self.me
            ]  # line 8
        if state.key is None and self.me in state.summed and len(state.summed) >= keying.threshold:
            assert state.rand is not None
            group_sum = keyneg.recover_group_sum(keying, state.summed)  # line 11
            state.key = keyneg.derive_key(state.rand, group_sum, keying.size)  # line 12
            state.rand = None
        return out + self._maybe_upload(state)

    # --- Algorithm 4 and the upload ------------------------------------------------------------

    def _on_trained(self, event: Trained) -> list[Output]:
        if event.round != self.round:
            return []
        if not self.secure:
            self.phase = UserPhase.IDLE
            model = PlainModel.of(self.round, self.me, event.params)
            return [Send(PROVIDER, "upload", model.to_bytes())]
        self._local = event.params.astype(np.float32, copy=False)
        out: list[Output] = []
        for state in list(self._groups.values()):
            out += self._maybe_upload(state)
        return out

    def _maybe_upload(self, state: _GroupState) -> list[Output]:
        if state.uploaded or state.key is None or self._local is None:
            return []
        masked = masking.mask_model(self._local, state.key, self._codec, state.keying.size)
        upload = MaskedUpload(state.spec.gid, int(masked.size), vector_to_bytes(masked))
        signed = envelope.sign(
            self.identity,
            self.roster.task,
            upload,
            prev=self.prev,
            round=self.round,
            attempt=self.attempt,
        )
        self.prev = signed.hash
        state.uploaded = True
        state.key = None
        return [Commit(PROVIDER, signed)]

    # --- plain FedAvg (PlainFedAvg: the baseline without the protocol) ------------------------

    def _on_plain(self, kind: str, data: bytes) -> list[Output]:
        if self.secure:
            return [Refused("NotPlain", "a plain model for a user of a secure task: refused")]
        if kind != PLAIN_MODEL:
            return []  # a plain user takes part in nothing else
        model = PlainModel.from_bytes(data, self.limits)
        if model.sender != self.roster.provider:
            raise GroupingError(f"a plain global model from {model.sender}, not the provider")
        if model.round <= self.round:
            return []  # stale or repeated
        params = model.params()
        self.round = model.round
        self.phase = UserPhase.ACTIVE
        return [Train(self.round, params)]


def _round_of(v: Verified) -> int:
    assert v.header.round is not None
    return v.header.round


def _attempt_of(v: Verified) -> int:
    assert v.header.attempt is not None
    return v.header.attempt
