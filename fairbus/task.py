"""The task's consensus-critical parameters: one definition, one set of defaults.

What a ledger node enforces and what the provider uses must be the same, or every
decision the provider makes is refused (or worse, an honest node and an auditor disagree
about what the contract allowed). So they are defined once, here, as :class:`TaskParams`,
read from the task's configuration (its ``[detection]`` table, :func:`detection_table`)
and recorded on the ledger at task start: the provider's first transaction is a
:class:`~fairbus.wire.messages.TaskStart` carrying them, before its first global model,
and every ledger node, follower and ``fairbus audit`` takes them from that transaction
(``docs/architecture.md``, "The ledger contract"). A ledger node's own configuration
holds none.

Today that is Algorithm 6's :class:`~fairbus.detection.DetectionParams`, the collusion
bound c of the exposure check (:mod:`fairbus.exposure`), the keying of the groups
(Alg. 3 or :mod:`fairbus.pairwise`), what evaluations are re-derived with (the model
and the committed test set, :mod:`fairbus.ledger.verify`) and the protocol the task
runs (the fairness paper's, or SecCL's with its θ and λ); a future consensus-critical
parameter goes into :class:`TaskParams` and the message, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fairbus.detection import DetectionParams
from fairbus.errors import FairbusError, SchemaError
from fairbus.exposure import DEFAULT_COLLUSION
from fairbus.seccl.election import candidate_count
from fairbus.seccl.sparse import shared_count
from fairbus.wire.limits import DEFAULT_LIMITS
from fairbus.wire.messages import (
    DEFAULT_KEYING,
    DEFAULT_MODE,
    MODES,
    SECCL,
    DetectionPolicy,
    EvaluationSpec,
    TaskStart,
)

PHASE_TIMEOUT = 300.0
"""Seconds a user may stay silent after an announcement before it counts as dropped (the
provider's ``phase_timeout``; the task's ``[provider]`` table may change it). Not
consensus-critical, but one default for the machine and the runtime: 300 s, because a
user that dies is noticed at once by its presence (the broker's Last Will), so this is
only the backstop for a user that is connected but silent, and a false dropout is costly
(the attempt is voided and every survivor renegotiates keys) while a slow honest user
(the paper's CIFAR-10 CNN for 20 local epochs on a CPU) easily needs more than a minute."""

DEFAULT_DETECTION = DetectionParams(
    # Measured with `fairbus bench detection` (README): as written (tolerance 0) Alg. 6
    # excluded 51 honest users in 20 no-attack runs of 9 users on digits, because once
    # the model converges whether a group beats τ is a coin flip; a 0.01 tolerance
    # (about one binomial standard error of accuracy on 450 test images) removes that.
    # Accuracy cannot tell a free-rider's group there; the update norm can.
    bound_score=0.15,
    bound_conf=0.5,
    tolerance=0.05,
    contribution_tolerance=0.2,
    min_evidence=3,  # the exposure check with c = 1 leaves 1-2 focus groups per round
    carry_evidence=True,
    key_score=0.3,
    level_rounds=8,
    evidence_window=4,
    # Issue 13 (README, fairness suite): honest users with skewed data were excluded on
    # accuracy while the model still learnt (their groups fall 0.05-0.1 below τ at τ ≈
    # 0.7) and on one group's noisy contribution; the bar follows the error left, and a
    # focus user the contribution fit trusts (θ ≥ 0.4; free-riders ≈ 0.2) is not convicted
    # on contribution. 0.5 until the fifteenth change (README): along the leading median a
    # user holding two classes weighed 0.43-0.51 and failed on contribution (2-3 classes
    # seed 16), while label flippers weigh 0.0-0.35 there.
    relative_tolerance=0.3,
    weight_floor=0.4,
    # Issue 13: near convergence, and where strong poisoners bend the median direction,
    # contributions scatter around the fit (relative residual 0.2-0.7); the bar widens to
    # that residual, and accuracy still convicts poisoners' groups. Twice the residual
    # also let most free-riders through with three poisoners and three free-riders.
    noise_widening=1.0,
    # Issue 13 (README, "eighth change"): where strong poisoners bend the median past a
    # residual of 1, the widened bar fell below 0 and passed groups that moved the model
    # backwards; capped at 1 it does not (3+3: 31% → 37% detected, no new false exclusion).
    widening_cap=1.0,
    # Issue 13: "last_step" (contributions along the global model's step into the round)
    # finds disguised free-riders and strong poisoners that the median misses, but reads
    # honest users whose data is skewed towards a class or two as free-riders (README,
    # "Contributions along the last step"). The median of the basic groups that beat the
    # accuracy bar (README, "ninth change"): with poisoners holding a basic group the
    # median of all of them is theirs; 3+3 37% → 42% detected and its false exclusion
    # gone, label flip all out by round 10 in 10 of 10 seeds (8), poison ×3 fewer false
    # exclusions (5 → 3 in seeds 0-27) but all out in 16 of 28 (21). Since the
    # fourteenth change measures the feature layers only, a label flipper weighs 0.5
    # along it: its groups (0.4-0.6 accuracy) beat the bar loosened by relative_tolerance
    # and bend the median. The median of the basic groups above τ − tolerance (README,
    # "fifteenth change"): label flip all out by round 10 in 19 of 20 seeds (8 of the
    # first 10 before), IID 3+3 113 → 120 of 120 detected; users holding two or three
    # classes, no attacker: 1 → 2 honest users excluded in 20 seeds.
    contribution_direction="leading_median",
    # Issue 13 (README, "fourteenth change"): the classifier's rows move only for the
    # classes a user holds, so along every layer users whose classes few others hold
    # read as free-riders (2-3 classes each, no attacker: 10 honest users excluded in 20
    # seeds); along the convolutional layers 1, and IID 3+3 finds more (52 → 56 of 60).
    contribution_layers="features",
    # Issue 13 (README, "sixteenth change"): a user whose groups lead some class by 0.1
    # of informedness over six rounds or more is not convicted on its fitted weight; with
    # every user holding two or three classes the last honest user convicted (seed 14)
    # led its class by 0.27-0.33.
    class_lead=0.1,
    # Issue 13 (README, "tenth change"): a user the sharp contribution fit weighs below
    # 0.3 stays a key user. Off since the fifth change, when converged rounds weighed
    # honest users low and excluded them; since `plateau_gain` and `weight_veto` it no
    # longer does: disguised free-riders (1e-2) all out by round 10 in 10 of 10 seeds
    # (9), poison ×3 false exclusions 4 → 3 in seeds 0-29, 3+3 42% → 40% detected.
    suspect_weight=0.3,
    # Issue 13 (README, "seventh change"): a free-rider's focus group with clean partners
    # passed the contribution bar about one time in six, and one such pass among a key
    # user's last four kept it in training past round 10; under a sharp fit 28 of 31
    # such passes had the free-rider below 0.4, and 1 of 330 honest users' passes.
    weight_veto=0.4,
    # Issue 13 (README, "eighth change"): once the model has converged the fit of
    # contributions is loose (residual 0.2-0.5) and an honest user's θ drifts to 0; over 50
    # rounds without an attacker one was excluded in round 49 on contribution alone. At a
    # plateau (mean accuracy within 0.01 over the 8 rounds of the window), only rounds
    # with a sharp fit test contributions.
    plateau_gain=0.01,
    # Issue 13 (README, "eleventh change"): near chance the accuracy bar admits every
    # basic group, and where poisoners hold most of them the median of their updates is
    # theirs; the groups that rank the true class no worse than the global model point
    # the honest way (3+3 40% → 49% detected, non-IID 2+2 all out 8 → 15 of 20 seeds,
    # poison ×3 false exclusions 3 → 1 in seeds 0-29).
    rank_below=0.35,
    # Issue 13 (README, "twelfth change"): with three poisoners and three free-riders among
    # nine nearly every group holds an attacker and Alg. 6's scores cannot tell users
    # apart, while the contribution fit over four or more rounds weighs each attacker
    # low with 95% confidence: in the traced suite 346 of 355 attackers' upper bounds fell
    # below 0.4 by round 10, and no honest user's below 0.53. 3+3 49% → 83% detected,
    # non-IID 2+2 all out 15 → 19 of 20 seeds, poison ×3 23 → 28 of 30 but its false
    # exclusions 1 → 2 (seed 16: weight_veto read the distorted point weight).
    convict_below=0.4,
    # Issue 13 (README, "thirteenth change"): a ×3 poisoner's round the fit cannot explain
    # (relative residual 2-97) bent the level of the others and an honest user whose
    # focus groups were the round's most accurate failed on contribution (poison ×3 seed
    # 24); past twice the level the round's largest contribution is the yardstick.
    believed_noise=2.0,
    # Issue 13 (README, "thirteenth change"): after two ×3 poisoners were excluded the fit
    # still weighed an honest user they had shared groups with at 0.27-0.38 (0.94-0.99
    # without those groups), and the veto refused its focus groups until Alg. 6 excluded
    # it (poison ×3 seed 16).
    veto_without_departed=True,
    # Issue 13 (README, "thirteenth change", trusted_weight): a user holding 11-17 of 1,347
    # samples overfits them, every group it is in falls below the accuracy bar, and
    # Alg. 6 excluded it while the sharp fit weighed it at 0.7-0.9 ("less data 0+0": 6 of
    # 20 seeds → 2); every other scenario of the suite and the paper bench the same.
    trusted_weight=0.5,
)
"""The task's Algorithm 6 policy unless its configuration says otherwise (the extensions
are described in the README; ``DetectionParams()`` is the paper's function as written)."""


@dataclass(frozen=True)
class TaskParams:
    """Everything the ledger's contract runs with, as the task start records it.

    Construction checks that the parameters can be recorded (every field within the
    wire bounds of :class:`~fairbus.wire.messages.TaskStart`), so a provider cannot start
    a task its ledger would refuse; raises :class:`~fairbus.errors.SchemaError`."""

    detection: DetectionParams = DEFAULT_DETECTION
    collusion: int = DEFAULT_COLLUSION
    """c, the task's collusion bound (issue 12): no user's model may be determined by the
    group sums the provider can decrypt together with the models of any c other users.
    1 by default: a member knows its own model, and a free-rider's is the public global
    model. Groups have max(3, c + 2) members."""
    keying: str = DEFAULT_KEYING
    """How the members of a group make their keys (:data:`~fairbus.wire.messages.
    KEYINGS`): ``pairwise`` (:mod:`fairbus.pairwise`, no shares on the wire) or
    ``shamir`` (Alg. 3 as the paper has it). Every announcement names it; the ledger
    refuses one that names another."""
    evaluation: EvaluationSpec | None = None
    """The model and the committed test set every evaluation is re-derived with (issue
    13; :mod:`fairbus.ledger.verify`). A ledger node refuses a task start without it."""

    local_steps: int | None = None
    """The SGD steps every user's local training takes per round (issue 13:
    :meth:`fairbus.training.config.TrainConfig.for_task`), or None where each user
    trains ``local_epochs`` passes over its own data. Recorded so that anyone can see
    what every user was asked to do; the ledger cannot check private training."""

    mode: str = DEFAULT_MODE
    """The protocol the task runs (:data:`~fairbus.wire.messages.MODES`): ``fairness``
    (the provider machine, Alg. 1-6) or ``seccl`` (:mod:`fairbus.protocol.seccl_provider`,
    the consensus contract :mod:`fairbus.ledger.seccl`)."""
    theta: float | None = None
    """SecCL's θ, the fraction of parameter changes each participant shares (the paper:
    0.1); set exactly when the mode is ``seccl``."""
    candidate_share: float | None = None
    """SecCL's λ, the fraction of participants the election makes candidates (the paper:
    0.2 and 0.4); set exactly when the mode is ``seccl``."""
    absent_class_scale: float | None = None
    """The restricted softmax every user's local training is asked to use (issue 13:
    :attr:`fairbus.training.config.TrainConfig.absent_class_scale`), or None where the
    task does not say. Recorded like ``local_steps``: the ledger cannot check it."""
    proximal_mu: float | None = None
    """FedProx's μ every user's local training is asked to use (issue 13:
    :attr:`fairbus.training.config.TrainConfig.proximal_mu`), likewise."""

    def __post_init__(self) -> None:
        if isinstance(self.collusion, bool) or not isinstance(self.collusion, int):
            raise SchemaError(f"the collusion bound must be a whole number, not {self.collusion!r}")
        if self.mode not in MODES:
            raise SchemaError(f"the task's mode must be one of {list(MODES)}, not {self.mode!r}")
        seccl = (self.theta, self.candidate_share)
        if self.mode == SECCL:
            if self.theta is None or self.candidate_share is None:
                raise SchemaError("a seccl task names θ (theta) and λ (candidate_share)")
            try:
                shared_count(self.theta, 1)
                candidate_count(self.candidate_share, 1)
            except FairbusError as exc:
                raise SchemaError(str(exc)) from None
        elif seccl != (None, None):
            raise SchemaError(f"θ and λ belong to a seccl task, not a {self.mode!r} one")
        try:
            wire = self.to_message().to_wire()
        except (TypeError, ValueError, OverflowError) as exc:
            raise SchemaError(f"task parameters cannot be recorded: {exc}") from None
        TaskStart.from_wire(wire, "", DEFAULT_LIMITS)

    def to_message(self) -> TaskStart:
        """The body of the task-start transaction."""
        policy = DetectionPolicy(**dataclasses.asdict(self.detection))
        return TaskStart(
            policy,
            self.collusion,
            self.keying,
            self.evaluation,
            self.local_steps,
            self.mode,
            self.theta,
            self.candidate_share,
            self.absent_class_scale,
            self.proximal_mu,
        )

    @classmethod
    def from_message(cls, message: TaskStart) -> TaskParams:
        """The parameters a (strictly decoded) task start records; raises
        :class:`~fairbus.errors.SchemaError` if they do not make a valid policy."""
        try:
            detection = DetectionParams(**dataclasses.asdict(message.detection))
            return cls(
                detection,
                message.collusion,
                message.keying,
                message.evaluation,
                message.local_steps,
                message.mode,
                message.theta,
                message.candidate_share,
                message.absent_class_scale,
                message.proximal_mu,
            )
        except FairbusError as exc:
            raise SchemaError(f"task_start: {exc}") from None


_DETECTION_FIELDS = dataclasses.fields(DetectionParams)
_ZERO_IS_OFF = (
    "level_rounds",
    "evidence_window",
    "relative_tolerance",
    "weight_floor",
    "noise_widening",
    "widening_cap",
    "noise_ceiling",
    "suspect_weight",
    "weight_veto",
    "plateau_gain",
    "rank_below",
    "convict_below",
    "believed_noise",
    "trusted_weight",
    "class_lead",
)


def detection_table(table: object) -> DetectionParams:
    """A ``[detection]`` table of the task's configuration (its Alg. 6 policy, recorded on
    the ledger at task start) over :data:`DEFAULT_DETECTION`. Strict: an unknown key or a
    value of the wrong kind is refused by name. ``level_rounds``, ``evidence_window``,
    ``relative_tolerance``, ``weight_floor``, ``noise_widening``, ``widening_cap``,
    ``noise_ceiling``, ``suspect_weight``, ``weight_veto``, ``plateau_gain``,
    ``rank_below``, ``convict_below``, ``believed_noise``, ``trusted_weight`` and
    ``class_lead`` = 0 turn those extensions off (TOML has no null)."""
    names = {f.name for f in _DETECTION_FIELDS}
    if not isinstance(table, dict) or set(table) - names:
        raise FairbusError(f"[detection] takes only {sorted(names)} (the task's Alg. 6 policy)")
    defaults = DEFAULT_DETECTION
    for key, value in table.items():
        if isinstance(getattr(defaults, key), str):
            if not isinstance(value, str):
                raise FairbusError(f"[detection]: {key!r} must be a string, got {value!r}")
            continue
        flag = isinstance(getattr(defaults, key), bool)
        if flag != isinstance(value, bool) or not isinstance(value, int | float):
            kind = "true or false" if flag else "a number"
            raise FairbusError(f"[detection]: {key!r} must be {kind}, got {value!r}")
    off: dict[str, Any] = {k: None for k in _ZERO_IS_OFF if table.get(k) == 0}
    try:
        params = DetectionParams(**{**vars(defaults), **table, **off})
        TaskParams(params)  # within what the ledger records
    except (FairbusError, TypeError) as exc:
        raise FairbusError(f"[detection]: {exc}") from None
    return params
