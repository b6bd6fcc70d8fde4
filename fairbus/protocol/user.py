"""The user's side of a round, as a sans-I/O state machine.

One round for one user (Algorithm 1, lines 9-21, as the user sees them):

1. receive the global model and the signed announcement of round r, attempt a; check
   the announcement's shape (every member a user of the roster, members ascending and
   distinct, every group ≥ 3 with a Shamir threshold equal to its size, kinds and focus
   users agreeing, group ids distinct) and the grouping (no user's model determined by
   the round's group sums, the announced known groups of earlier attempts and the groups
   this user itself uploaded to in earlier attempts included:
   :func:`fairbus.grouping.check_grouping`), or refuse it (:class:`Refused`, nothing
   changes);
2. if it is in a group, ask the driver to train (:class:`Train`) — once per round,
   reused by later attempts; a user in no group does not train;
3. per group, its key sk_gi: by Algorithm 3 over sealed shares (deal, add what arrives,
   send the sum, reconstruct s_g, derive sk_gi), or, when the announcement names the
   ``pairwise`` keying, at once from X25519 agreements with its group mates
   (:mod:`fairbus.pairwise`; nothing sent, and a share for such a group is refused);
4. per group, once its key and the model are ready: mask (Alg. 4), sign with the hash
   chain link, upload;
5. on the decision, learn whether it was excluded.

A new attempt of the same round supersedes the old one: its negotiation state is
dropped, and the user never uploads for it again.

Shares that arrive before the announcement of their round and attempt ("early") are
opened at once (so a forged one is refused, never kept) and kept only within bounds: for
an announcement this user holds but cannot start yet, only from members of its own groups
in it; otherwise at most :data:`EARLY_PER_SENDER` per sender, each no larger than a share
of the model (:func:`share_bound`), and at most ``max_early`` in all. The rest is
refused (``Refused("EarlyShareRefused")``).

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
from fairbus.errors import (
    FairbusError,
    GroupingError,
    MismatchedShareError,
    ReplayError,
    SchemaError,
)
from fairbus.exposure import DEFAULT_COLLUSION
from fairbus.field import FieldVector, FixedPointCodec
from fairbus.grouping import announced_group_problems, check_grouping
from fairbus.identity import Identity
from fairbus.ledger.recorded import open_recorded
from fairbus.pairwise import MaskContext, PairwiseKeys
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
from fairbus.roster import Role, Roster
from fairbus.sealed import (
    OpenedShare,
    ReplayGuard,
    SealContext,
    SealedOuter,
    open_share,
    seal_share,
)
from fairbus.shamir import Share
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    PAIRWISE,
    Announce,
    Decision,
    Dropout,
    GlobalModel,
    GroupSpec,
    MaskedUpload,
    vector_to_bytes,
)

EARLY_PER_SENDER = 8
"""At most this many early shares are kept per sender: one per group the two share in the
next attempt (a pair shared at most 6 groups in samples of make_grouping's groupings under
the default policy)."""

EARLY_REFUSED = "EarlyShareRefused"
"""The reason of a refused early share (:class:`Refused`)."""


def share_bound(params: int, task: str) -> int:
    """The most bytes an honest sealed share of a ``params``-value model takes: its
    values (4 bytes each) and the routing context, in clear and boxed, with room to
    spare."""
    return 4 * params + 2 * len(task.encode()) + 512


class UserPhase(Enum):
    IDLE = "idle"  # between rounds, or not in the current grouping
    ACTIVE = "active"  # training, negotiating and uploading for (round, attempt)
    EXCLUDED = "excluded"  # found to be a violator: takes no further part


@dataclass(eq=False)
class _GroupState:
    spec: GroupSpec
    keying: keyneg.GroupKeying
    context: SealContext
    length: int
    rand: FieldVector | None
    shares: dict[int, Share] = field(default_factory=dict)
    summed: dict[int, Share] = field(default_factory=dict)
    key: FieldVector | None = None
    uploaded: bool = False
    pairwise: bool = False  # keyed from pairwise agreements: it takes no shares


@dataclass(frozen=True, eq=False)
class _Early:
    """A share that arrived before the announcement of its round and attempt, opened
    (authenticated) on arrival."""

    round: int
    attempt: int
    group: int
    size: int
    opened: OpenedShare


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
        collusion: int = DEFAULT_COLLUSION,
    ) -> None:
        """``secure=False``: the task runs :class:`~fairbus.aggregation.PlainFedAvg`; the
        user then answers the provider's plain global model with its own in the clear,
        and nothing else. A user of a secure task refuses a plain model."""
        self.secure = secure
        self.collusion = collusion
        """The least collusion bound this user accepts (the task's c may be larger)."""
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
        self._digest = b""  # the round's global model's hash
        self._local: npt.NDArray[np.float32] | None = None
        self._trained_round = 0  # the last round it asked the driver to train for
        self._codec = FixedPointCodec()
        self._groups: dict[int, _GroupState] = {}
        self._joined: list[tuple[int, int, int, tuple[int, ...]]] = []
        """(round, attempt, group, members) of every upload this user made this round."""
        self._voided: dict[tuple[int, int], set[int]] = {}  # (round, attempt) → voided groups
        self._guard = ReplayGuard()
        self._users = frozenset(roster.with_role(Role.USER))
        self._max_early = max_early
        self._early: deque[_Early] = deque()
        self._early_count: dict[int, int] = {}  # sender → early shares kept
        self._pairwise = PairwiseKeys(identity, roster)

    @property
    def early_kept(self) -> tuple[int, int]:
        """How many early shares this machine keeps, and their sealed bytes."""
        return len(self._early), sum(e.size for e in self._early)

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
        if len(msg.data) != 4 * msg.length:
            raise SchemaError(f"global model of {len(msg.data)} bytes for {msg.length} values")
        params = np.frombuffer(msg.data, dtype="<f4").astype(np.float32)
        if not np.isfinite(params).all():
            raise SchemaError(f"the global model of round {r} holds NaN or infinity")
        self._model_offer = (r, model_digest(params), params)
        return self._try_start()

    def _on_announce(self, v: Verified, msg: Announce) -> list[Output]:
        r, a = _round_of(v), _attempt_of(v)
        if (r, a) <= (self.round, self.attempt):
            return []  # stale or repeated announcement
        if self._announce is not None and (r, a) < self._announce[:2]:
            return []  # older than the one waiting for its model
        self._check_announce(r, a, msg)
        self._announce = (r, a, msg)
        return self._try_start()

    def _check_announce(self, r: int, a: int, msg: Announce) -> None:
        """Refuse (:class:`GroupingError`) a malformed announcement or a grouping that
        would expose a model; changes nothing."""
        problems = announced_group_problems(msg.groups, self._users)
        if problems:
            raise GroupingError(f"round {r}: malformed announcement: " + "; ".join(problems))
        if msg.collusion < self.collusion:
            raise GroupingError(
                f"round {r}: the announcement's collusion bound {msg.collusion} is below "
                f"this user's {self.collusion}"
            )
        # The groups the ledger says the provider may hold (it refuses an announcement
        # that leaves one out), and every group this user uploaded to in an earlier
        # attempt of the round that the dropout did not void.
        check_grouping(
            [g.members for g in msg.groups],
            [*(tuple(g) for g in msg.prior_groups), *self._own_prior(r, a)],
            msg.collusion,
        )

    def _own_prior(self, r: int, a: int) -> list[tuple[int, ...]]:
        return [
            members
            for jr, ja, gid, members in self._joined
            if jr == r and ja < a and gid not in self._voided.get((jr, ja), set())
        ]

    def _try_start(self) -> list[Output]:
        if self._announce is None:
            return []
        r, a, msg = self._announce
        offer = self._model_offer
        if r == self.round and self._global is not None:  # a later attempt of this round
            new_round = False
            digest, model = self._digest, self._global
        else:
            new_round = True
            if offer is None or offer[0] != r:
                return []  # wait for this round's model
            _, digest, model = offer
        self._announce = None
        if digest != msg.model_sha256:
            raise GroupingError(f"round {r}: the global model does not match the announced hash")
        if model.size != msg.model_params:
            raise GroupingError(
                f"round {r}: announced model size {msg.model_params} differs from the "
                f"global model's {model.size}"
            )
        codec = FixedPointCodec(msg.frac_bits)
        mine = [g for g in msg.groups if self.me in g.members]
        # Checked: now act on it.
        out: list[Output] = []
        if new_round:
            self._global, self._digest = model, digest
            self._local = None
            self.round = r
            self._joined, self._voided = [], {}
        if mine and self._trained_round != r:  # train once per round, only if grouped
            self._trained_round = r
            out.append(Train(r, model))
        self.attempt = a
        self._codec = codec
        self._groups = {}
        self._guard = ReplayGuard()  # earlier attempts' shares are ignored anyway
        self.phase = UserPhase.ACTIVE if mine else UserPhase.IDLE
        for spec in mine:
            if msg.keying == PAIRWISE:
                out += self._key_pairwise(spec, msg.model_params)
            else:
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
        scope = (_round_of(v), _attempt_of(v))
        if scope[0] == self.round:
            self._voided.setdefault(scope, set()).update(msg.voided_groups)
        if scope == (self.round, self.attempt):
            self._groups = {}  # superseded: never upload for this attempt again
        return []

    # --- Algorithm 3 over sealed shares --------------------------------------------------------

    def _deal(self, spec: GroupSpec, length: int) -> list[Output]:
        keying = keyneg.GroupKeying(spec.members, spec.threshold)
        context = SealContext(self.roster.task, self.round, self.attempt, spec.gid)
        dealt = keyneg.deal_shares(keying, length)  # lines 2-3
        state = _GroupState(spec, keying, context, length, dealt.rand)
        state.shares[self.me] = dealt.shares[self.me]
        self._groups[spec.gid] = state
        out: list[Output] = [
            Send(j, "share", seal_share(self.identity, self.roster, j, context, "share", s))
            for j, s in dealt.shares.items()
            if j != self.me
        ]  # line 4
        return out + self._progress(state)

    def _key_pairwise(self, spec: GroupSpec, length: int) -> list[Output]:
        """The compact keying (:mod:`fairbus.pairwise`): sk_gi at once, nothing sent."""
        context = SealContext(self.roster.task, self.round, self.attempt, spec.gid)
        state = _GroupState(spec, keyneg.GroupKeying(spec.members, spec.threshold), context,
                            length, None, pairwise=True)  # fmt: skip
        mask = MaskContext(self.roster.task, self.round, self.attempt, spec.gid, spec.members)
        state.key = self._pairwise.group_key(mask, length)
        self._groups[spec.gid] = state
        return self._maybe_upload(state)

    def _on_sealed(self, kind: str, data: bytes) -> list[Output]:
        outer = SealedOuter.from_wire(codec.unpack(data, self.limits), "sealed", self.limits)
        if (outer.round, outer.attempt) > (self.round, self.attempt):
            return self._keep_early(outer, data)
        state = self._groups.get(outer.group)
        if (outer.round, outer.attempt) != (self.round, self.attempt) or state is None:
            return []  # a superseded attempt, or a group we are not in
        opened = open_share(data, self.identity, self.roster, state.context, self.limits)
        return self._take(state, opened)

    def _take(self, state: _GroupState, opened: OpenedShare) -> list[Output]:
        """An opened share of this attempt: checked, then added (nothing changes if not)."""
        keying = state.keying
        if state.pairwise:
            raise GroupingError(
                f"{opened.kind} from {opened.sender} for group {state.spec.gid}, whose keys "
                "come from pairwise agreements: no share belongs to it"
            )
        if opened.sender not in keying.members:
            raise GroupingError(f"share from {opened.sender}, who is not in group {state.spec.gid}")
        point = keying.point_of(self.me if opened.kind == "share" else opened.sender)
        share = opened.share
        if share.x != point or share.values.shape != (state.length,):
            raise MismatchedShareError(
                f"{opened.kind} from {opened.sender} at x={share.x} with "
                f"{share.values.shape[0]} values; expected x={point} and {state.length}"
            )
        self._guard.admit(opened)
        target = state.shares if opened.kind == "share" else state.summed
        target[opened.sender] = share
        return self._progress(state)

    def _keep_early(self, outer: SealedOuter, data: bytes) -> list[Output]:
        """A share for a round or attempt not yet started here: kept, opened, only within
        bounds (see the module docstring); otherwise refused."""
        where = (
            f"early {outer.kind} from {outer.sender} for round {outer.round} attempt "
            f"{outer.attempt} group {outer.group}"
        )

        def refused(why: str) -> list[Output]:
            return [Refused(EARLY_REFUSED, f"{where}: {why}")]

        if outer.recipient != self.me or outer.task != self.roster.task:
            raise ReplayError(f"{where}: sealed for {outer.recipient} in task {outer.task!r}")
        if outer.kind != "share":
            return refused("only a dealt share can come before its announcement")
        if outer.sender == self.me or outer.sender not in self._users:
            return refused("not from another user of the roster")
        params = self._early_params()
        pending = self._announce
        if pending is not None and pending[:2] == (outer.round, outer.attempt):
            msg = pending[2]
            params = msg.model_params
            spec = next((g for g in msg.groups if g.gid == outer.group), None)
            if spec is None or not {self.me, outer.sender} <= set(spec.members):
                return refused("the announced grouping puts us in no such group together")
        bound = self.limits.max_model_bytes if params is None else share_bound(params, outer.task)
        if len(data) > bound:
            return refused(f"{len(data)} bytes, more than a share of the model ({bound})")
        key = (outer.round, outer.attempt, outer.group, outer.sender)
        if any((e.round, e.attempt, e.group, e.opened.sender) == key for e in self._early):
            return refused("one is already kept")
        if self._early_count.get(outer.sender, 0) >= EARLY_PER_SENDER:
            return refused(f"{EARLY_PER_SENDER} from this sender are already kept")
        if len(self._early) >= self._max_early:
            return refused(f"{self._max_early} early shares are already kept")
        # Opened now: a forged or moved share is refused here, never kept.
        opened = open_share(data, self.identity, self.roster, outer.context, self.limits)
        self._early.append(_Early(outer.round, outer.attempt, outer.group, len(data), opened))
        self._early_count[outer.sender] = self._early_count.get(outer.sender, 0) + 1
        return []

    def _early_params(self) -> int | None:
        """The model's size as known here (the same every round), if known."""
        if self._global is not None:
            return int(self._global.size)
        if self._model_offer is not None:
            return int(self._model_offer[2].size)
        return None

    def _replay_early(self) -> list[Output]:
        """Hand in the early shares of the attempt just started; forget older ones."""
        now = (self.round, self.attempt)
        ready = [e for e in self._early if (e.round, e.attempt) == now]
        self._early = deque(e for e in self._early if (e.round, e.attempt) > now)
        self._early_count = {}
        for e in self._early:
            sender = e.opened.sender
            self._early_count[sender] = self._early_count.get(sender, 0) + 1
        out: list[Output] = []
        for e in ready:
            state = self._groups.get(e.group)
            if state is None:
                continue  # a group we are not in
            try:
                out += self._take(state, e.opened)
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
        rand = state.rand  # None once the key is derived: a late summed share does nothing
        if rand is not None and self.me in state.summed and len(state.summed) >= keying.threshold:
            group_sum = keyneg.recover_group_sum(keying, state.summed)  # line 11
            state.key = keyneg.derive_key(rand, group_sum, keying.size)  # line 12
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
        self._joined.append((self.round, self.attempt, state.spec.gid, state.spec.members))
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
