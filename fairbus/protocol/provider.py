"""The provider's side of training, as a sans-I/O state machine (Algorithm 1).

Per round: regroup if needed (Alg. 1, lines 5-8: the key-user set changed, a violator
was found, or a user dropped or joined), announce the global model and the grouping,
collect signed masked uploads, decrypt each complete group (Alg. 5), have the driver
evaluate it, run detection (Alg. 6), exclude violators for good (lines 26-29) and
aggregate the clean groups into the next global model (line 30).

A user who drops while uploads are being collected closes the attempt: the provider
records a dropout (after which the ledger takes no more uploads for the attempt) and
asks its driver which uploads were recorded (:class:`CloseAttempt`, answered by
:class:`AttemptClosed`). Groups all of whose members uploaded are "known": their sums
may be decrypted. Then, in order: if every group is complete, the round goes on; else
the survivors are regrouped with fresh keys (attempt + 1), the known groups carried into
the exposure check and announced (the ledger refuses an announcement that omits one);
if no grouping passes that check, the round finishes on the complete groups it holds.

Under the :class:`~fairbus.aggregation.PlainFedAvg` policy (``strategy.secure`` False, the
baseline) a round is plain FedAvg instead: the global model goes to every online user in
the clear (a :class:`Send`, nothing on the ledger), each answers with its trained model,
and at the last answer (or the deadline) the policy averages them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np
import numpy.typing as npt

from fairbus import envelope, masking
from fairbus.aggregation import (
    PLAIN_MODEL,
    AggregationStrategy,
    CleanGroupAverage,
    GroupModel,
    PlainModel,
)
from fairbus.detection import (
    ClassCounts,
    DetectionParams,
    DetectionResult,
    RoundContributions,
    contributions_along,
    detect,
    fit_contributions,
    needs_anchor,
)
from fairbus.envelope import GENESIS, ChainTracker
from fairbus.errors import FairbusError, GroupingError
from fairbus.exposure import DEFAULT_COLLUSION
from fairbus.field import FieldVector, FixedPointCodec
from fairbus.grouping import BASIC, Grouping, group_size, make_grouping
from fairbus.identity import Identity
from fairbus.ledger.recorded import open_recorded
from fairbus.ledger.state import RoundRecord, grouping_of
from fairbus.ledger.verify import last_step, round_updates
from fairbus.masking import GroupAggregate
from fairbus.protocol.events import (
    GLOBAL_MODEL,
    USERS,
    AttemptClosed,
    ChainHead,
    CloseAttempt,
    Commit,
    Dropped,
    Evaluate,
    Evaluated,
    Event,
    GroupOutcome,
    Joined,
    Output,
    Received,
    Refused,
    RoundDone,
    RoundFailed,
    Send,
    StartRound,
    Tick,
    Trained,
)
from fairbus.protocol.recovery import (
    RecoveryError,
    Replayed,
    global_model,
    group_aggregates,
    recorded_uploads,
)
from fairbus.protocol.user import model_digest
from fairbus.roster import Role, Roster
from fairbus.task import DEFAULT_DETECTION, PHASE_TIMEOUT, TaskParams
from fairbus.training.layout import feature_values
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    DEFAULT_KEYING,
    Announce,
    CommittedTestSet,
    Decision,
    Dropout,
    Evaluation,
    EvaluationSpec,
    GlobalModel,
    GroupAccuracy,
    GroupSpec,
    MaskedUpload,
    Message,
    UserScore,
    counted_by_class,
)

SIT_OUT_TRIES = 24
"""Groupings tried with some users sitting a round out, when no grouping of them all is
safe (:meth:`ProviderMachine._grouping_with_some_sitting_out`)."""


@dataclass(frozen=True)
class ProviderConfig:
    """The provider's policy. ``key_repeats`` (KIN) is an upper bound: grouping lowers it
    when more focus groups would expose a user. There is no Shamir threshold to choose:
    every group's is its size (Alg. 3 as written; users and the ledger refuse any other,
    since a lower one lets fewer than all the other members unmask one)."""

    basic_groupings: int = 2
    key_repeats: int = 6
    reference_groups: int = 2
    """Not in the paper: groups of three trusted general users, active for no one
    (:mod:`fairbus.grouping`), so that the contribution test has a clean group to compare
    with even when every basic group holds an attacker."""
    regroup_every_round: bool = True
    """Not in the paper (False = Alg. 1: regroup only when the key users change, a
    violator is found or a user drops). Keys are fresh every round anyway; a fresh
    grouping stops attackers hiding behind the same group mates round after round."""
    frac_bits: int = 16
    detection: DetectionParams = DEFAULT_DETECTION
    """The task's Alg. 6 policy: recorded on the ledger at task start (:attr:`task`)."""
    collusion: int = DEFAULT_COLLUSION
    """The task's collusion bound c (:class:`fairbus.task.TaskParams`), recorded likewise."""
    keying: str = DEFAULT_KEYING
    """How group members make their keys (:class:`fairbus.task.TaskParams`), likewise."""
    local_steps: int | None = None
    """The SGD steps every user takes per round (:class:`fairbus.task.TaskParams`),
    likewise; None: each user trains its configured passes over its own data."""
    absent_class_scale: float | None = None
    """The users' restricted softmax (:class:`fairbus.task.TaskParams`), likewise."""
    proximal_mu: float | None = None
    """The users' FedProx μ (:class:`fairbus.task.TaskParams`), likewise."""
    defended: bool = True
    phase_timeout: float = PHASE_TIMEOUT
    seed: int = 0
    strategy: AggregationStrategy = field(default_factory=CleanGroupAverage)
    model_name: str | None = None
    test_set: CommittedTestSet | None = None
    """The task's test set (:class:`fairbus.evaluation.QuantizedTestSet`), recorded on
    the ledger before the task start, so that every ledger node re-derives each
    accuracy the provider reports on the same data with ``model_name`` (issue 13)."""

    def __post_init__(self) -> None:
        if (self.model_name is None) != (self.test_set is None):
            raise FairbusError("a task's test set and its model name go together")
        self.task  # noqa: B018 — refuse now a policy the ledger could not record

    @property
    def task(self) -> TaskParams:
        """The task's consensus-critical parameters, as its task start records them."""
        spec = None
        if self.model_name is not None and self.test_set is not None:
            digest = hashlib.sha256(self.test_set.payload()).digest()
            spec = EvaluationSpec(self.model_name, digest)
        return TaskParams(
            self.detection,
            self.collusion,
            self.keying,
            spec,
            self.local_steps,
            absent_class_scale=self.absent_class_scale,
            proximal_mu=self.proximal_mu,
        )


@dataclass
class TrustRecord:
    """Not in the paper: whom the provider trusts as focus partners and reference
    members of the next grouping. Users are ranked by the weight θ_u that
    :func:`fairbus.detection.fit_contributions` fits over the recent rounds (about 1
    for an honest user, 0 for a free-rider, below 0 for a poisoner) and, before there
    is a fit, by the share of their groups that scored in Alg. 6, line 11. An attacker
    taken for a partner drags honest key users' focus groups down with it."""

    scored: dict[int, int] = field(default_factory=dict)
    groups: dict[int, int] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)

    def add(self, grouping: Grouping, result: DetectionResult) -> dict[int, float]:
        """Count the round's groups and scores; the weights θ of the round's fit (empty
        where there is none: the last fit's weights are kept for ranking)."""
        for g in grouping.groups:
            for u in g.members:
                self.groups[u] = self.groups.get(u, 0) + 1
                self.scored[u] = self.scored.get(u, 0) + (result.group_scores.get(g.gid, 0) > 0)
        fit = fit_contributions(result.history) if result.history else None
        if fit is None:
            return {}
        self.weights = dict(fit.weights)
        return dict(fit.weights)

    def trust(self, user: int) -> float:
        if user in self.weights:
            return self.weights[user]
        total = self.groups.get(user, 0)
        return self.scored.get(user, 0) / total if total else 0.5

    def most_trusted(self, users: list[int], at_least: int = 3, bar: float = 0.5) -> list[int]:
        """The users trusted at least ``bar`` (and at least ``at_least`` of them, best
        first, where there are that many), best first."""
        ranked = sorted(users, key=lambda u: (-self.trust(u), u))
        return [u for k, u in enumerate(ranked) if self.trust(u) >= bar or k < at_least]


class _Interrupted(Enum):
    """How :meth:`ProviderMachine.restore` found the last round."""

    CLOSE = "close"  # announced, no upload recorded: close the attempt and regroup
    COLLECT = "collect"  # announced, uploads recorded: the users act on it, collect the rest
    DECIDE = "decide"  # evaluated, not decided: decide from the recorded evaluation


class ProviderPhase(Enum):
    IDLE = "idle"  # between rounds
    COLLECTING = "collecting"  # announced; waiting for every group's uploads
    REGROUPING = "regrouping"  # an attempt voided; waiting to learn which uploads it got
    EVALUATING = "evaluating"  # every group decrypted; waiting for accuracies


class ProviderMachine:
    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        initial_params: npt.NDArray[np.float32],
        config: ProviderConfig = ProviderConfig(),
        *,
        online: Iterable[int] | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        """``online``: the users present at the start (default: every user of the roster);
        :class:`Joined` and :class:`Dropped` events change it."""
        self.identity = identity
        self.roster = roster
        self.config = config
        self.limits = limits
        self.codec = FixedPointCodec(config.frac_bits)
        self.global_params = initial_params.astype(np.float32)
        self.phase = ProviderPhase.IDLE
        self.round = 0
        self.attempt = 0
        users = set(roster.with_role(Role.USER))
        self._users = frozenset(users)
        self.online: set[int] = users if online is None else set(online) & users
        self.excluded: set[int] = set()
        self.key_users: frozenset[int] = frozenset()
        self.grouping: Grouping | None = None
        self.prev = GENESIS
        self._chains = ChainTracker()
        self._regroup = True
        self._deadline = 0.0
        self._now = 0.0
        self._dropped_this_round: set[int] = set()
        self._prior_groups: list[tuple[int, ...]] = []
        self._known_by_model: dict[bytes, set[tuple[int, ...]]] = {}
        """Global model hash → the groups whose sums rounds from that model revealed."""
        self._uploads: dict[int, dict[int, FieldVector]] = {}
        self._announced: dict[int, tuple[int, ...]] = {}  # this attempt's groups, as announced
        self._voided: set[int] = set()  # the groups this attempt's dropout voided
        self._decrypted: dict[int, GroupAggregate] = {}
        self._accuracy: dict[int, float] = {}
        self._rank: dict[int, float | None] = {}  # each group's, with its accuracy
        self._classes: dict[int, ClassCounts] = {}  # each group's, where counted by class
        self._class_samples = None if config.test_set is None else config.test_set.class_samples()
        self._anchor: tuple[int, float | None] | None = None  # (round, its global model's rank)
        self._anchor_asked: int | None = None  # the round whose global model is being evaluated
        self._evidence: dict[int, tuple[float, ...]] = {}
        self._history: tuple[RoundContributions, ...] = ()
        self._trusted: list[int] = []
        self._record = TrustRecord()
        self._interrupted: _Interrupted | None = None
        self._resuming = False  # the attempt being closed is one a restart interrupted
        self._contributions: dict[int, float] = {}
        """Set by :meth:`restore` for a round the ledger shows under way: the next
        :class:`StartRound` goes on with it instead of starting a new one."""
        self._plain_waiting: set[int] = set()  # PlainFedAvg: whose model the round awaits
        self._plain_models: dict[int, npt.NDArray[np.float32]] = {}
        self._round_global: npt.NDArray[np.float32] | None = None
        """The global model this round was announced with (recorded on the ledger)."""
        self._previous_global: npt.NDArray[np.float32] | None = None
        """The previous round's: with it, the last step contributions are measured along."""

    @property
    def prior_groups(self) -> list[tuple[int, ...]]:
        """The groups whose sums the provider may hold before this attempt: those of
        earlier attempts of this round, and of earlier rounds from the same global model."""
        return list(self._prior_groups)

    def chain_head(self, user: int) -> bytes:
        """The hash of the last envelope accepted from ``user`` (its chain head)."""
        return self._chains.head(user)

    @property
    def d(self) -> int:
        return int(self.global_params.size)

    # --- rounds ----------------------------------------------------------------------------

    @property
    def next_round(self) -> int:
        """The round the next :class:`StartRound` plays (an interrupted one goes on)."""
        return self.round if self._interrupted is not None else self.round + 1

    @classmethod
    def restore(
        cls,
        identity: Identity,
        roster: Roster,
        initial_params: npt.NDArray[np.float32],
        config: ProviderConfig,
        replayed: Replayed,
        blobs: Mapping[bytes, bytes],
        *,
        online: Iterable[int] | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> ProviderMachine:
        """A provider rebuilt from what the ledger holds (issue 14, item 1; not in the
        paper): chain heads, excluded and key users, Alg. 6's evidence and history (each
        decided round's detection run again, in order, and checked against the ledger's),
        the groups each global model revealed, and the global model (the last round's,
        advanced by its aggregate if it was decided). A round the ledger shows under way
        goes on at the next :class:`StartRound`: decided from its recorded evaluation if
        there is one; an attempt some user uploaded to collects the rest of its uploads
        under a fresh deadline; otherwise it is closed (a dropout naming nobody) and
        regrouped with fresh keys. Raises :class:`~fairbus.protocol.recovery.RecoveryError`."""
        draft = replayed.draft
        if draft.task != config.task:
            raise RecoveryError(
                f"the ledger's task parameters {draft.task} are not this provider's "
                f"{config.task}: resume with the configuration the task started with"
            )
        pid = identity.participant_id
        last = replayed.last_round
        params = initial_params if last == 0 else global_model(replayed, last, pid, blobs, limits)
        machine = cls(identity, roster, params, config, online=online, limits=limits)
        if last:
            machine._round_global = params
            if last > 1 and replayed.round(last - 1) is not None:
                machine._previous_global = global_model(replayed, last - 1, pid, blobs, limits)
        machine.prev = draft.head(pid)
        machine._chains = ChainTracker({u: draft.head(u) for u in machine._users})
        machine.round = last
        for number in range(1, last + 1):
            record = replayed.round(number)
            if record is not None:
                machine._replay_round(replayed, number, record, blobs)
        if draft.excluded != frozenset(machine.excluded) or draft.key_users != machine.key_users:
            raise RecoveryError("Alg. 6 run again does not give the ledger's decisions")
        return machine

    def _replay_round(
        self, replayed: Replayed, number: int, record: RoundRecord, blobs: Mapping[bytes, bytes]
    ) -> None:
        """One recorded round folded in, as :meth:`_decide` did (or goes on) with it."""
        last = number == self.round
        known = self._known_by_model.setdefault(record.announce.model_sha256, set())
        known |= record.known_groups()
        evaluation = record.evaluation
        if evaluation is None:
            if last:
                self.attempt = record.attempt
                self.grouping = grouping_of(record.announce)
                self._announced = {g.gid: g.members for g in self.grouping.groups}
                self._prior_groups = [tuple(g) for g in record.announce.prior_groups]
                self._uploads = {gid: {} for gid in self._announced}
                held = recorded_uploads(replayed, number, blobs, self.limits)
                for (gid, user), upload in held.items():
                    self._uploads[gid][user] = upload.vector()
                for tx in replayed.upload_txs(number, record).values():
                    self._chains.remember(tx.hash)  # the broker may deliver them again
                self._interrupted = _Interrupted.COLLECT if held else _Interrupted.CLOSE
            return  # a failed round: only its known groups count
        gids = [e.gid for e in evaluation.accuracies]
        self._accuracy = {e.gid: e.accuracy for e in evaluation.accuracies}
        self._rank = {e.gid: e.rank for e in evaluation.accuracies}
        self._classes = evaluation.class_counts()
        contributions = {e.gid: e.contribution or 0.0 for e in evaluation.accuracies}
        self.grouping = grouping_of(record.announce, set(gids))
        self._announced = {g.gid: g.members for g in record.announce.groups}
        self._prior_groups = [tuple(g) for g in record.announce.prior_groups]
        self.attempt = record.attempt
        if not last:  # only the detection state: no model moves before the last round
            self._decrypted = {}
            self._redetect(self.grouping, contributions)
            return
        self._decrypted = group_aggregates(replayed, number, gids, blobs, self.codec, self.limits)
        self._contributions = contributions
        self._interrupted = _Interrupted.DECIDE
        if record.decided or not self.config.defended:  # the same decision, in memory
            self._interrupted = None
            self._decide(self.grouping, contributions, record=False)

    def _redetect(self, grouping: Grouping, contributions: dict[int, float]) -> None:
        """Alg. 6 for an earlier decided round: the evidence, history, trust and the
        excluded and key users it left."""
        if not self.config.defended:
            return
        result = detect(
            grouping,
            self._accuracy,
            self.config.detection,
            contributions,
            self._evidence,
            self._history,
            self._classes,
        )
        self._evidence, self._history = dict(result.evidence), result.history
        self._record.add(grouping, result)
        self.excluded |= result.violators
        self._trusted = self._record.most_trusted(
            sorted(set(grouping.users) - result.violators - self.excluded)
        )
        self.key_users = result.new_key_users

    def _go_on(self) -> list[Output]:
        """The interrupted round :meth:`restore` found, carried on."""
        how, self._interrupted = self._interrupted, None
        self._dropped_this_round = set()
        if how is _Interrupted.DECIDE:
            if self.grouping is None:
                raise RecoveryError(f"round {self.round}: no grouping to decide on")
            return self._decide(self.grouping, self._contributions)
        if how is _Interrupted.COLLECT:
            return self._collect_the_rest()
        # Close the attempt (a dropout naming nobody: what was in flight to the old
        # process is lost) and, once the ledger says which uploads it recorded, finish on
        # its groups if all are complete, else regroup whoever is online with fresh keys.
        # The complete groups whose uploads the ledger held at the restore are decrypted
        # (and evaluated) now.
        voided = tuple(sorted(self._announced))  # none may grow: only complete ones count
        self._voided = set(voided)
        self._decrypted, self._accuracy, self._rank, self._classes = {}, {}, {}, {}
        self._resuming = True
        self.phase = ProviderPhase.REGROUPING
        out: list[Output] = [
            self._signed(Dropout((), voided)),
            CloseAttempt(self.round, self.attempt),
        ]
        return out + [self._decrypt(gid) for gid in self._held_complete()]

    def _collect_the_rest(self) -> list[Output]:
        """An interrupted attempt the users already upload to goes on where it stands:
        its groups have started, so closing it would leave their sums in every later
        check of the round (often leaving no grouping of the survivors that passes). The
        uploads still to come arrive as before (every upload is on the ledger before it
        is published, and the restore read those); a fresh phase deadline catches the
        users who will not upload, through the usual dropout and regrouping."""
        if self.grouping is None:
            raise RecoveryError(f"round {self.round}: no grouping to collect uploads for")
        self._voided, self._decrypted, self._accuracy = set(), {}, {}
        self._rank, self._classes = {}, {}
        self._deadline = self._now + self.config.phase_timeout
        self.phase = ProviderPhase.COLLECTING
        out: list[Output] = [self._decrypt(gid) for gid in self._held_complete()]
        return out + self._maybe_evaluating()

    def _held_complete(self) -> list[int]:
        """The groups of this attempt whose every upload this machine holds."""
        return [gid for gid, members in self._announced.items()
                if len(self._uploads[gid]) == len(members)]  # fmt: skip

    def _decrypt(self, gid: int) -> Evaluate:
        """Alg. 5 for a group whose every upload is held; its model to evaluate."""
        uploads = self._uploads[gid]
        result = masking.aggregate_decrypt([uploads[u] for u in self._announced[gid]], self.codec)
        self._decrypted[gid] = result
        return Evaluate(self.round, self.attempt, gid, result.mean)

    def _start_round(self, now: float) -> list[Output]:
        """Alg. 1, lines 4-10: regroup if needed, then announce round r + 1."""
        if self.phase is not ProviderPhase.IDLE:
            return [Refused("RoundInProgress", f"round {self.round} is still {self.phase.value}")]
        self._now = max(self._now, now)
        if self._interrupted is not None:
            return self._go_on()
        self.round += 1
        self.attempt = 0
        self._dropped_this_round = set()
        # Item 5 of issue 12: a round from the same global model as an earlier one may
        # reproduce the same trained models, so the earlier sums count in its check.
        self._prior_groups = sorted(self._known_by_model.get(self._digest(), set()))
        participants = sorted(self.online - self.excluded)
        if not self.config.strategy.secure:
            return self._start_plain(participants)
        if self._regroup or self.grouping is None or set(self.grouping.users) != set(participants):
            try:
                self.grouping = self._make_grouping(participants)
            except GroupingError as exc:
                try:
                    self.grouping = self._grouping_with_some_sitting_out(participants, exc)
                except GroupingError:
                    self.round -= 1  # nothing recorded: the number is not used up
                    return [RoundFailed(self.round + 1, str(exc))]
            self._regroup = False
        out: list[Output] = []
        if self.prev == GENESIS:  # the task starts: its parameters are its first record
            if self.config.test_set is not None:  # after the test set they name
                out.append(self._signed(self.config.test_set))
            out.append(self._signed(self.config.task.to_message()))
        out.append(self._signed(GlobalModel(self.d, self._model_bytes())))
        self._previous_global, self._round_global = self._round_global, self.global_params
        return out + self._announce()

    def _digest(self) -> bytes:
        return model_digest(self.global_params)

    def _remember_known(self, groups: Iterable[tuple[int, ...]]) -> None:
        """At the end of a round: the groups whose sums it may have revealed, kept for a
        later round from the same global model (never fewer than the ledger counts)."""
        self._known_by_model.setdefault(self._digest(), set()).update(groups)

    def _make_grouping(self, users: list[int]) -> Grouping:
        return make_grouping(
            users,
            self.key_users,
            c=self.config.collusion,
            basic_groupings=self.config.basic_groupings,
            key_repeats=self.config.key_repeats,
            seed=(self.config.seed, self.round, self.attempt),
            prior_groups=self._prior_groups,
            partners=self._trusted,
            references=self.config.reference_groups,
            key_order=sorted(self.key_users, key=lambda u: (self._record.trust(u), u)),
        )

    def _grouping_with_some_sitting_out(self, users: list[int], error: GroupingError) -> Grouping:
        """A grouping of all but a few of ``users`` when the sums already known
        (``prior_groups``) leave no safe grouping of them all: a partition of the users
        reveals their total, and with known groups covering all but two of them it would
        give the sum of those two. The users in fewest known groups sit the round out
        first; at most :data:`SIT_OUT_TRIES` groupings are tried. Not in the paper, which
        has no exposure check across attempts; without it a round from a repeated global
        model could never be grouped again (issue 12, item 5)."""
        covered = Counter(u for g in self._prior_groups for u in g)
        order = sorted(users, key=lambda u: (covered[u], u))
        tries = 0
        for k in range(1, len(users) - group_size(self.config.collusion) + 1):
            for out in itertools.combinations(order, k):
                if tries == SIT_OUT_TRIES:
                    raise error
                tries += 1
                try:
                    return self._make_grouping([u for u in users if u not in out])
                except GroupingError:
                    continue
        raise error

    def _announce(self) -> list[Output]:
        assert self.grouping is not None
        self._uploads = {g.gid: {} for g in self.grouping.groups}
        self._announced = {g.gid: g.members for g in self.grouping.groups}
        self._voided = set()
        self._decrypted = {}
        self._accuracy, self._rank, self._classes = {}, {}, {}
        self._deadline = self._now + self.config.phase_timeout
        self.phase = ProviderPhase.COLLECTING
        specs = tuple(
            GroupSpec(g.gid, g.kind, g.members, g.focus, len(g.members))
            for g in self.grouping.groups
        )
        announce = Announce(
            model_digest(self.global_params),
            self.d,
            self.config.frac_bits,
            specs,
            tuple(sorted(self.grouping.key_users)),
            tuple(sorted(self.excluded)),
            tuple(self._prior_groups),
            self._deadline,
            self._deadline,
            self.config.collusion,
            self.config.keying,
        )
        return [self._signed(announce)]

    def _model_bytes(self) -> bytes:
        return self.global_params.astype("<f4", copy=False).tobytes()

    def _signed(self, message: Message) -> Commit:
        scoped = {"round": self.round, "attempt": self.attempt} if message.SCOPED else {}
        env = envelope.sign(self.identity, self.roster.task, message, prev=self.prev, **scoped)
        self.prev = env.hash
        return Commit(USERS, env)

    # --- events ------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Output]:
        if isinstance(event, StartRound):
            return self._start_round(event.now)
        if isinstance(event, ChainHead):
            # A returning user's chain continues from the ledger's head: an upload it
            # committed just before it died may never have arrived here.
            self._chains.resync(event.participant, event.head)
            return []
        if isinstance(event, Received):
            try:
                return self._on_received(event)
            except FairbusError as exc:
                return [Refused(type(exc).__name__, str(exc))]
        if isinstance(event, Evaluated):
            return self._on_evaluated(event)
        if isinstance(event, Dropped | Joined) and event.user not in self._users:
            what = type(event).__name__
            return [Refused("NotAUser", f"{what}({event.user}): not a user of the roster")]
        if isinstance(event, Dropped):
            return self._on_dropped({event.user})
        if isinstance(event, Joined):
            if event.user not in self.excluded:
                self.online.add(event.user)
                self._regroup = True
            return []
        if isinstance(event, AttemptClosed):
            return self._on_attempt_closed(event)
        if isinstance(event, Tick):
            return self._on_tick(event.now)
        if isinstance(event, Trained):
            return []
        raise TypeError(f"provider machine cannot take {type(event).__name__}")

    def _on_received(self, event: Received) -> list[Output]:
        if not self.config.strategy.secure:
            return self._on_plain(event)
        if event.kind != "upload":
            return []
        verified = open_recorded(event.data, self.roster, self.limits).verified
        msg = verified.message
        header = verified.header
        user = header.sender
        if self._chains.seen(verified.envelope.hash):
            return []  # a second delivery (MQTT QoS 1 is at least once): nothing new
        if header.prev != self._chains.head(user):
            # The receipt says the ledger took this link, so the ledger's chain for the
            # user grew where this provider did not see it (an upload committed while it
            # was down, or just before the user restarted): its view moves on.
            self._chains.resync(user, header.prev)
        self._chains.check(verified.envelope)
        if isinstance(msg, MaskedUpload) and (header.round, header.attempt) == (
            self.round,
            self.attempt,
        ):
            # What the ledger never records (its receipt notwithstanding) changes nothing:
            # an upload to a group of this attempt the sender is not in, or a second one.
            if user not in self._announced.get(msg.group, ()):
                raise GroupingError(f"user {user} uploaded to group {msg.group}, not its own")
            if user in self._uploads.get(msg.group, {}):
                raise GroupingError(f"user {user} uploaded twice to group {msg.group}")
        # The chain link is recorded first, even for an upload that arrives too late to
        # use: the sender's next envelope will point at it.
        self._chains.accept(verified.envelope)
        if not isinstance(msg, MaskedUpload):
            return []
        collecting = self.phase in (ProviderPhase.COLLECTING, ProviderPhase.REGROUPING)
        if not collecting or (header.round, header.attempt) != (self.round, self.attempt):
            return [
                Refused("StaleUpload", f"upload from {user} for ({header.round}, {header.attempt})")
            ]
        assert self.grouping is not None
        if msg.group in self._announced and msg.group not in self._uploads:
            # announced, but the round finishes on the complete groups without it
            return [Refused("StaleUpload", f"upload from {user} to group {msg.group}, left out")]
        group = self.grouping.group(msg.group)
        if user not in group.members:
            raise GroupingError(f"user {user} uploaded to group {group.gid}, which it is not in")
        if user in self._uploads[group.gid]:
            raise GroupingError(f"user {user} uploaded twice to group {group.gid}")
        if msg.length != self.d:
            raise GroupingError(f"upload of {msg.length} values for a model of {self.d}")
        self._uploads[group.gid][user] = msg.vector()
        if len(self._uploads[group.gid]) < len(group.members):
            return []
        evaluate = self._decrypt(group.gid)
        if len(self._decrypted) == len(self.grouping.groups):
            self.phase = ProviderPhase.EVALUATING
        return [evaluate]

    def _on_evaluated(self, event: Evaluated) -> list[Output]:
        if event.gid == GLOBAL_MODEL:
            return self._on_anchor(event)
        if (event.round, event.attempt) != (
            self.round,
            self.attempt,
        ) or event.gid not in self._decrypted:
            return []
        self._accuracy[event.gid] = event.accuracy
        self._rank[event.gid] = event.rank
        samples, right, called = self._class_samples, event.class_right, event.class_called
        if samples is not None and right is not None and called is not None:
            self._classes[event.gid] = ClassCounts(samples, right, called)
        assert self.grouping is not None
        if self.phase is ProviderPhase.EVALUATING and len(self._accuracy) == len(
            self.grouping.groups
        ):
            return self._finish()
        return []

    def _on_anchor(self, event: Evaluated) -> list[Output]:
        """The round's global model evaluated (asked for by :meth:`_finish`): its rank
        anchors ``rank_below``. The same model for every attempt of the round."""
        if event.round != self.round or self._anchor_asked != self.round:
            return []
        self._anchor = (event.round, event.rank)
        if self.grouping is None or self.phase is not ProviderPhase.EVALUATING:
            return []  # the round failed or regroups meanwhile: the rank waits for it
        return self._maybe_evaluating()

    def _on_tick(self, now: float) -> list[Output]:
        self._now = max(self._now, now)
        if self.phase is not ProviderPhase.COLLECTING or now < self._deadline:
            return []
        if not self.config.strategy.secure:
            return self._finish_plain()
        assert self.grouping is not None
        # Late: the members of incomplete groups who uploaded nothing at all in this
        # attempt (a user that hung, even before dealing its shares). Their group mates
        # could derive no key for the groups they share with them; they are not to blame
        # and take part in the next attempt. Only when every member of an incomplete group
        # uploaded somewhere is it those who did not upload to it.
        uploaded = {u for got in self._uploads.values() for u in got}
        missing = {
            u
            for g in self.grouping.groups
            if g.gid not in self._decrypted
            for u in g.members
            if u not in self._uploads[g.gid]
        }
        return self._on_dropped((missing - uploaded) or missing)

    def _on_dropped(self, users: set[int]) -> list[Output]:
        self.online -= users
        self._regroup = True
        if not self.config.strategy.secure:
            return self._plain_dropped(users)
        if self.grouping is None or self.phase not in (
            ProviderPhase.COLLECTING,
            ProviderPhase.REGROUPING,
        ):
            return []
        affected = users & set(self.grouping.users)
        if not affected:
            return []
        self._dropped_this_round |= affected
        if self.phase is ProviderPhase.REGROUPING:
            return []  # the survivors are chosen when the attempt is closed
        # Void the attempt; regroup the survivors with fresh keys (attempt + 1) once the
        # driver says whose uploads for it were recorded.
        voided = [g.gid for g in self.grouping.groups if affected & set(g.members)]
        self._voided |= set(voided)
        self.phase = ProviderPhase.REGROUPING
        return [
            self._signed(Dropout(tuple(sorted(affected)), tuple(voided))),
            CloseAttempt(self.round, self.attempt),
        ]

    def _on_attempt_closed(self, event: AttemptClosed) -> list[Output]:
        """Decide how the round goes on after a dropout closed the attempt.

        Not in the paper, which voids the groups and regroups. Here: if every group is
        complete, the round simply goes on; otherwise the survivors are regrouped (attempt
        + 1) with the complete groups in the exposure check; if no grouping passes it
        (a complete partition of all users plus any partition of the survivors would
        determine the missing user's model), the round finishes on the complete groups.
        """
        if self.phase is not ProviderPhase.REGROUPING or (event.round, event.attempt) != (
            self.round,
            self.attempt,
        ):
            return []
        assert self.grouping is not None
        grouping = self.grouping
        received = {(g, u) for g, got in self._uploads.items() for u in got}
        recorded = set(event.uploads) | received
        dropped = self._dropped_this_round
        # known: every member's upload recorded, so the sum may be known (prior groups);
        # usable: and every upload here or still to come from a user who is not gone.
        known = [g for g in grouping.groups if all((g.gid, m) in recorded for m in g.members)]
        usable = [
            g for g in known if all((g.gid, m) in received or m not in dropped for m in g.members)
        ]
        resuming, self._resuming = self._resuming, False
        if resuming:  # only what this process holds: the rest died with the old one
            usable = [g for g in known if all((g.gid, m) in received for m in g.members)]
        if not any(g.kind == BASIC for g in usable):
            usable = []  # Alg. 6 weighs contributions against basic groups: none, no finish
        self.phase = ProviderPhase.COLLECTING
        if len(usable) == len(grouping.groups):
            return self._maybe_evaluating()
        earlier = list(self._prior_groups)
        # Counted: every group of the attempt as announced (not only those a finish on
        # the complete groups kept, should a second dropout come) whose sum the ledger
        # holds, and every one the dropouts did not void that holds a recorded upload:
        # its other members may have uploaded before they saw the dropout, and each user
        # counts the groups it uploaded to (issue 12, item 2).
        started = {gid for gid, _ in recorded}
        counted = [
            members
            for gid, members in self._announced.items()
            if all((gid, m) in recorded for m in members)
            or (gid not in self._voided and gid in started)
        ]
        self._prior_groups = list(dict.fromkeys([*earlier, *counted]))
        survivors = sorted(
            (self.online - self.excluded) if resuming else set(grouping.users) - dropped
        )
        self.attempt += 1
        try:
            self.grouping = self._make_grouping(survivors)
            return self._announce()
        except GroupingError as exc:
            if not usable:
                try:
                    self.grouping = self._grouping_with_some_sitting_out(survivors, exc)
                    return self._announce()
                except GroupingError:
                    pass
            self.attempt -= 1
            self._prior_groups = earlier
            if not usable:
                # Only groups that hold a recorded upload can have revealed anything.
                self._remember_known([*earlier, *counted])
                self.phase = ProviderPhase.IDLE
                self.grouping = None
                return [RoundFailed(self.round, str(exc))]
        # Finish on the complete groups of the closed attempt that it holds or will.
        self.grouping = replace(grouping, groups=tuple(usable))
        self._uploads = {g.gid: self._uploads[g.gid] for g in usable}
        return self._maybe_evaluating()

    def _maybe_evaluating(self) -> list[Output]:
        assert self.grouping is not None
        if len(self._decrypted) >= len(self.grouping.groups):
            self.phase = ProviderPhase.EVALUATING
            return self._finish() if len(self._accuracy) >= len(self.grouping.groups) else []
        return []

    # --- plain FedAvg: the PlainFedAvg policy, the baseline without the protocol ----------------

    def _start_plain(self, users: list[int]) -> list[Output]:
        """The global model in the clear to every online user; each answers with its
        trained model (:class:`~fairbus.aggregation.PlainModel`) before the deadline."""
        if not users:
            return [RoundFailed(self.round, "no user is online")]
        self._plain_waiting = set(users)
        self._plain_models = {}
        self._deadline = self._now + self.config.phase_timeout
        self.phase = ProviderPhase.COLLECTING
        model = PlainModel.of(self.round, self.identity.participant_id, self.global_params)
        return [Send(USERS, PLAIN_MODEL, model.to_bytes())]

    def _on_plain(self, event: Received) -> list[Output]:
        if event.kind != "upload":
            return []
        model = PlainModel.from_bytes(event.data, self.limits)
        user = model.sender
        if self.phase is not ProviderPhase.COLLECTING or model.round != self.round:
            return [Refused("StaleUpload", f"plain model from {user} for round {model.round}")]
        if user not in self._plain_waiting or user in self._plain_models:
            return [Refused("UnexpectedUpload", f"plain model from {user}, not awaited")]
        if model.length != self.d:
            raise GroupingError(f"plain model of {model.length} values for a model of {self.d}")
        self._plain_models[user] = model.params()
        return self._finish_plain() if self._plain_waiting <= set(self._plain_models) else []

    def _plain_dropped(self, users: set[int]) -> list[Output]:
        if self.phase is not ProviderPhase.COLLECTING:
            return []
        gone = (users & self._plain_waiting) - set(self._plain_models)
        self._plain_waiting -= gone
        self._dropped_this_round |= gone
        return self._finish_plain() if self._plain_waiting <= set(self._plain_models) else []

    def _finish_plain(self) -> list[Output]:
        """FedAvg of the models that arrived (the current model if none did); whoever
        missed the deadline counts as dropped, as in the secure round."""
        late = self._plain_waiting - set(self._plain_models)
        self.online -= late
        self._dropped_this_round |= late
        models = [GroupModel(u, BASIC, (u,), m) for u, m in sorted(self._plain_models.items())]
        self.global_params = self.config.strategy.aggregate(self.global_params, models, ())
        self._plain_waiting, self._plain_models = set(), {}
        self.phase = ProviderPhase.IDLE
        nobody: frozenset[int] = frozenset()
        return [
            RoundDone(self.round, 1, [], None, {}, nobody, nobody, frozenset(self.excluded),
                      frozenset(self._dropped_this_round), self.global_params)
        ]  # fmt: skip

    # --- detection, exclusion, aggregation ---------------------------------------------------

    def _finish(self) -> list[Output]:
        """Alg. 5 done for every group: record the evaluation, then decide. Where the
        round's contributions need the global model's rank (``rank_below``) and it is
        not known yet, the driver is asked for it first and the round finishes when it
        comes (:meth:`_on_anchor`)."""
        assert self.grouping is not None
        basic = [g.gid for g in self.grouping.basic]
        anchor: float | None = None
        if needs_anchor(self.config.detection, basic, self._accuracy):
            if self._anchor is None or self._anchor[0] != self.round:
                if self._anchor_asked == self.round:
                    return []
                self._anchor_asked = self.round
                return [Evaluate(self.round, self.attempt, GLOBAL_MODEL, self.global_params)]
            anchor = self._anchor[1]
        means = {gid: r.mean for gid, r in self._decrypted.items()}
        step = None
        if self.config.detection.contribution_direction == "last_step":
            step = last_step(self.global_params, self._previous_global)
        contributions = contributions_along(
            self.config.detection,
            round_updates(means, self.global_params),
            basic,
            self._accuracy,
            step,
            self._rank,
            anchor,
            feature_values(self.config.model_name),
        )
        samples = self._class_samples
        if samples is None or not counted_by_class(len(self._accuracy), len(samples)):
            self._classes = {}  # what the ledger re-derives the decision from
        classes = self._classes
        evaluation = Evaluation(
            tuple(
                GroupAccuracy(
                    gid,
                    acc,
                    contributions[gid],
                    self._rank.get(gid),
                    classes[gid].right if gid in classes else None,
                    classes[gid].called if gid in classes else None,
                )
                for gid, acc in sorted(self._accuracy.items())
            ),
            self._class_samples if classes else None,
        )
        return [self._signed(evaluation), *self._decide(self.grouping, contributions)]

    def _decide(
        self, grouping: Grouping, contributions: dict[int, float], *, record: bool = True
    ) -> list[Output]:
        """Alg. 6 on the recorded evaluation of ``grouping`` (the round's), the decision
        (unless ``record`` is False: :meth:`restore` re-deriving one the ledger holds),
        and the new global model."""
        out: list[Output] = []
        tau: float | None = None
        assessments: dict[int, object] = {}
        violators: frozenset[int] = frozenset()
        new_keys: frozenset[int] = frozenset()
        scored: dict[int, float] = {}
        forward = 1.0  # which way a contribution counts (the yardstick's sign)
        level: float | None = None
        weights: dict[int, float] = {}  # θ of the round's contribution fit
        if self.config.defended:
            result = detect(
                grouping,
                self._accuracy,
                self.config.detection,
                contributions,
                self._evidence,
                self._history,
                self._classes,
            )
            self._evidence = dict(result.evidence)
            self._history = result.history
            scored = dict(result.group_scores)
            forward = _forward(result)
            level = result.level
            tau, violators, new_keys = result.tau, result.violators, result.new_key_users
            weights = self._record.add(grouping, result)
            self._trusted = self._record.most_trusted(
                sorted(set(grouping.users) - violators - self.excluded)
            )
            assessments = dict(result.assessments)
            scores = tuple(
                UserScore(a.user, a.score, a.conf_lo, a.conf_up)
                for a in result.assessments.values()
            )
            if record:
                decision = Decision(tau, scores, tuple(sorted(new_keys)), tuple(sorted(violators)))
                out.append(self._signed(decision))
        models = _group_models(
            grouping, self._decrypted, scored, forward, contributions, self._accuracy, self._rank
        )
        self._remember_known([*self._prior_groups, *self._announced.values()])
        self.global_params = self.config.strategy.aggregate(self.global_params, models, violators)
        self.excluded |= violators  # lines 26-29
        changed = new_keys != self.key_users or violators or self._dropped_this_round
        if changed or self.config.regroup_every_round:
            self._regroup = True
        self.key_users = new_keys
        self.phase = ProviderPhase.IDLE
        outcomes = [
            GroupOutcome(
                g.gid,
                g.kind,
                g.members,
                g.focus,
                self._accuracy[g.gid],
                self._decrypted[g.gid].field_sum,
                self._decrypted[g.gid].mean,
                contributions.get(g.gid),
                scored[g.gid] > 0 if g.gid in scored else None,
            )
            for g in grouping.groups
        ]
        out.append(
            RoundDone(
                self.round,
                self.attempt + 1,
                outcomes,
                tau,
                assessments,
                new_keys,
                violators,
                frozenset(self.excluded),
                frozenset(self._dropped_this_round),
                self.global_params,
                level,
                weights,
            )
        )
        return out


def _forward(result: DetectionResult) -> float:
    """Which way a contribution counts: against the yardstick's sign (Alg. 6)."""
    return -1.0 if result.level is not None and result.level < 0 else 1.0


def _group_models(
    grouping: Grouping,
    decrypted: dict[int, GroupAggregate],
    scored: dict[int, float],
    forward: float,
    contributions: dict[int, float],
    accuracies: dict[int, float],
    ranks: dict[int, float | None],
) -> list[GroupModel]:
    """The decrypted groups as the aggregation policy takes them."""
    return [
        GroupModel(
            g.gid,
            g.kind,
            g.members,
            decrypted[g.gid].mean,
            scored.get(g.gid, 1.0) > 0,
            forward * contributions[g.gid],
            accuracies.get(g.gid),
            ranks.get(g.gid),
        )
        for g in grouping.groups
    ]
