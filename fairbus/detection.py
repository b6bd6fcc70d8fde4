"""Algorithm 6 of the fairness paper: fine-grained detection of potential violators.

A pure, deterministic function of the round's grouping, the accuracy of every group
model and the key-user set the grouping was built for. Line numbers below refer to
Algorithm 6 in ``shared/papers/000_5bf3e0ead588fffe.txt``.

The paper's confidence interval (lines 18-19) is score_mean ∓ (S / √|G_a^i|) ·
t_0.025(|G_a^i| − 1) with S = √(Σ_g (score_g − score_mean)² / |G_a^i|); the radicals
are lost in the paper's text rendering, and this is the standard reading of it (the
t quantile with |G_a^i| − 1 degrees of freedom, two-sided 95%). With a single active
group the interval is undefined (no degrees of freedom): such a user is never a
potential violator on that round's evidence.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import special

from fairbus.errors import DetectionError
from fairbus.grouping import BASIC, Grouping

LAYERS = ("all", "features")
"""What :func:`contributions_along` measures a group's update on
(``contribution_layers``): every parameter, or the model's feature layers only."""

DIRECTIONS = ("median", "last_step", "accurate_median", "leading_median")
"""What :func:`group_contributions` projects updates on (``contribution_direction``): the
coordinate-wise median of the round's basic groups' updates, the global model's last
step, the median of the updates of the basic groups that beat Alg. 6's accuracy bar
(:func:`accurate_basic`), or of those above τ − ``tolerance``, Alg. 6's bar without its
loosening by the error left (:func:`leading_basic`). Measured with the fairness suite
(README, issue 13's fourth change): along the last step the fit's relative residual
stays at 0.02–0.1 to round 10 (0.3–0.6 along the median) and disguised free-riders weigh
θ ≈ 0.07 against honest users' 0.9–1.0; but an honest user whose data is mostly one
class weighs 0.13–0.36 there, and its groups read like a free-rider's. Once the model
has converged the step is mostly noise (``noise_ceiling``). The accurate median leaves
out the basic groups whose models fail on accuracy, so poisoners who hold the majority
of a basic group no longer bend the direction every other group is read along (README,
issue 13's ninth change)."""


CHOSEN_MEDIANS = ("accurate_median", "leading_median")
"""The ``contribution_direction`` values that take the median over chosen basic groups
(near chance, with ``rank_below``, over :func:`ranked_basic`'s)."""


@dataclass(frozen=True)
class DetectionParams:
    """bound_score and bound_conf of Algorithm 6 (inputs), and the interval's confidence."""

    bound_score: float = 0.5
    bound_conf: float = 0.5
    confidence: float = 0.95
    tolerance: float = 0.0
    """Not in the paper (0 = exactly as written): a group scores when acc > τ − tolerance,
    so accuracy differences within the evaluation's noise do not count against anyone."""
    contribution_tolerance: float | None = None
    """Not in the paper (None = not used): a group scores only if also its contribution
    (:func:`group_contributions`) is at least (1 − contribution_tolerance) times the
    largest contribution of the round. A group with a free-rider moves the model by
    (k − 1)/k of a clean group of k, one with a poisoner less still; accuracy alone
    often cannot tell (README, detection benchmark)."""
    min_evidence: int = 2
    """Not in the paper (2 = as written, the least an interval needs): a key user becomes a
    potential violator only with at least this many active groups. With three the t
    interval has width 0 whenever all three agree, and three failed groups are weak
    evidence when attackers are many."""
    carry_evidence: bool = False
    """Not in the paper (False = as written): a key user's interval (lines 16-20) is taken
    over the scores of every distinct focus group built around it so far, in this round
    and earlier ones (:attr:`DetectionResult.evidence`), not over this round's active
    groups. The exposure check allows few focus groups per round when key users are
    many, too few for an interval; and basic groups say little about one user when
    attackers are many. A key user's score_i (lines 9-15) is then taken over this
    round's basic groups and those focus groups, so one lucky basic group does not take
    a key user whose focus groups keep failing out of the key users."""
    key_evidence_only: bool = False
    """Not in the paper (False = kept whatever happens): with ``carry_evidence``, a user's
    carried focus-group scores are dropped when it stops being a key user, so failures
    of focus groups built many rounds apart do not add up. Over 50 rounds without an
    attacker an honest user near convergence fails a focus group by chance now and then,
    and three such failures, rounds apart, made it a violator (issue 13)."""
    evidence_window: int | None = None
    """Not in the paper (None = all): with ``carry_evidence``, only a user's last this
    many focus-group scores are kept, so a group that scored by luck while the model
    was still learning does not shield an attacker for the rest of training."""
    key_score: float | None = None
    """Not in the paper (None = as written): once τ ≥ bound_score, a user becomes a key
    user when its score is below this fraction, in place of line 21's τ − bound_score,
    which near convergence makes key users of everyone who shares one group with an
    attacker and leaves no general users to build focus groups with. While τ <
    bound_score there are no key users, as written: the model has not learnt enough for
    the groups' scores to say anything (with attackers in the majority it never does)."""

    relative_tolerance: float | None = None
    """Not in the paper (None = ``tolerance`` alone): a group scores when acc > τ − max(
    tolerance, relative_tolerance · (1 − τ)). How far an honest group's accuracy falls
    below the mean of the basic groups scales with the error left: while the model still
    learns, or with skewed (non-IID) data, groups of honest users differ by much more than
    they do once it has converged, and a fixed tolerance that fits the end convicts honest
    users with unusual data at the start (issue 13; README, fairness suite)."""
    weight_floor: float | None = None
    """Not in the paper (None = not used): with ``contribution_tolerance`` and
    ``level_rounds``, a focus group that beats the accuracy bar but falls short of the
    contribution bar still scores when its focus user's fitted weight θ
    (:func:`fit_contributions`, over the same rounds as the level) is at least this. One
    group's contribution is noisy (skewed data, and near convergence most of an update is
    noise); θ pools every group the user was in over those rounds, and is about 0 for a
    free-rider and below 0 for a poisoner."""

    level_rounds: int | None = None
    """Not in the paper (None = the largest contribution of the round): with
    ``contribution_tolerance``, a group's contribution is compared with the clean level
    that :func:`clean_level` fits over this round and up to ``level_rounds`` − 1 earlier
    ones. The largest contribution is a poor yardstick: when every group of a round
    holds an attacker it is a free-rider's group, and a lucky clean group sets it too
    high for the others."""
    noise_widening: float | None = None
    """Not in the paper (None = ``contribution_tolerance`` alone): with ``level_rounds``,
    the contribution bar is 1 − max(contribution_tolerance, noise_widening · σ), σ the
    fit's relative residual in this round (root mean square of contribution − level ·
    mean θ over the round's groups, divided by the level). Near convergence an update is
    mostly noise, contributions spread 0.2–1.4 of the level around the fit, and a fixed
    bar convicts honest users by chance over long runs (issue 13: 50 rounds)."""

    noise_ceiling: float | None = None
    """Not in the paper (None = never): with ``level_rounds``, the contribution test is
    left out of a round whose fit's relative residual σ (:attr:`ContributionFit.noise`)
    is above this, and its groups score on accuracy alone. A free-rider's group moves the
    model by 2/3 of a clean group of three; where contributions scatter around the fit
    by more than that gap, no bar tells the two apart, and honest groups fail by chance:
    over 50 rounds, once the model has converged, often enough to convict (issue 13)."""
    suspect_weight: float | None = None
    """Not in the paper (None = key users by score alone, line 21): with
    ``contribution_tolerance`` and ``level_rounds``, once there are key users (τ ≥
    bound_score), a user whose fitted weight θ (:func:`fit_contributions`) is below this
    becomes a key user whatever its score, where the fit is sharp enough to be believed
    (:func:`suspects`). Such a user is convicted only as every key user is (lines
    25-29): by its own focus groups. A free-rider in a basic group of four moves it by
    3/4 of a clean one, within the contribution bar; with one failed focus group a round
    its score climbs above key_score and it leaves the key users for good while the fit
    still reads θ ≈ 0.1 (issue 13: a disguised free-rider was never excluded). Not the
    default: at 0.5 it found every disguised free-rider of the suite's seeds, but once
    the model has converged the fit weighs honest users at 0.1-0.4 with a residual under
    the bar (50 rounds: three honest users excluded), and 2+2 lost two seeds (README,
    issue 13's fifth change)."""
    weight_veto: float | None = None
    """Not in the paper (None = not used): with ``contribution_tolerance`` and
    ``level_rounds``, once the model has learnt (τ ≥ bound_score), a focus group whose
    focus user's fitted weight θ is below this does not score, whatever its own
    contribution, where the fit is sharp (:func:`sharp_fit`). The mirror of
    ``weight_floor``: one group's contribution is noisy, θ pools every group the user was
    in. A free-rider's focus group with clean partners reads 0.5-0.9 of the level and
    passed the contribution bar about one time in six; one such pass among a key user's
    last four focus groups widens its interval past ``bound_conf`` for four rounds, and
    left a free-rider in the training to round 10 in 6 of 40 seeds of IID 2+2 (issue
    13: the lucky pass). Under a sharp fit 28 of 31 such passes of free-riders had the
    free-rider below 0.4, and 1 of 330 passes of honest focus users (README, issue 13's
    seventh change)."""
    widening_cap: float | None = None
    """Not in the paper (None = no cap): with ``noise_widening``, the widened tolerance is
    at most this. At 1 the contribution bar never goes below 0, so a group whose
    contribution points backwards (it moved the model against the clean direction)
    never scores on contribution, however loose the round's fit. Strong poisoners bend
    the median of the basic groups so far that the fit's residual exceeds 1 (1.2-10 in
    the traced ×3 and 3+3 runs): the widened bar then went below 0 and passed poisoners'
    focus groups that read −1.8 of the level (issue 13: 3+3, 31% → 37% detected with 1;
    README, "eighth change")."""
    plateau_gain: float | None = None
    """Not in the paper (None = not used): with ``contribution_tolerance`` and
    ``level_rounds``, once the model has learnt (τ ≥ bound_score) and stopped learning
    (:func:`at_plateau`: over a full window of ``level_rounds`` rounds the groups' mean
    accuracy spans less than this), a round whose fit is loose (relative residual at
    least ``contribution_tolerance``, the bar :func:`sharp_fit` sets) tests accuracy
    alone. Once the model has converged an honest update is mostly noise: along the
    median of the basic groups an honest user's groups read 0.15-1.5 of the level with
    the fit's residual at 0.2-0.5, and its fitted θ drifts to 0, where a free-rider's is;
    over 50 rounds without an attacker one honest user failed four focus groups that
    beat τ on contribution alone, and was excluded in round 49 (issue 13). Rounds whose
    fit is sharp still test contributions; attackers are found while the model learns
    (in the traced suite no attacker's group failed on contribution alone in a loose
    round at a plateau)."""
    rank_below: float | None = None
    """Not in the paper (None = not used): with ``contribution_direction``
    "accurate_median" or "leading_median", while τ is below this the median is taken over
    the basic groups whose model ranks the true class no worse than the round's global
    model did (within :data:`RANK_SLACK`; :func:`ranked_basic`), not over those that beat
    the accuracy bar. Near chance the accuracy cannot tell groups apart (with three
    poisoners among nine every basic group classifies at 0.1-0.3, the bar admits them
    all, and the median of their updates is the poisoners'), but a poisoner's group
    falls behind the model it started from in the true class's mean rank, which is exact
    and which the ledger re-derives (issue 13: README, "eleventh change")."""
    convict_below: float | None = None
    """Not in the paper (None = not used): with ``contribution_tolerance`` and
    ``level_rounds``, a user whose fitted weight θ is below this with ``confidence``
    (the one-sided upper bound of :func:`weight_bounds`; the bar shrinks as the fit
    loosens, :func:`convict_bar`) is a violator, where the fit can be believed
    (:func:`fit_convicted` has the guards: enough rounds, none fitted too badly, τ past
    chance, not at a plateau). Alg. 6 convicts a key user on the
    interval of its groups' scores; with three poisoners and three free-riders among
    nine nearly every group holds an attacker, honest users' groups fail as often as
    attackers', and the model sits at chance for rounds, where no group beats τ, while
    the fit over the window already weighs poisoners at −1, free-riders at 0 and honest
    users at 1, each within ±0.3 (issue 13: 3+3 49% detected by round 10; README,
    "twelfth change")."""
    veto_without_departed: bool = False
    """Not in the paper (off = as the seventh change built it): with ``weight_veto``,
    where users have left the task (excluded or gone) and the window's fit without their
    groups (:func:`_without_departed`) is sharp, a focus group is refused only where that
    fit too weighs its user below the veto. One weight per user cannot describe a
    poisoner of three times the honest step, which turns the median some rounds and not
    others: its groups are fitted badly and the residual lands on the users it shared
    them with. After both poisoners were excluded the fit still weighed an honest user
    at 0.27-0.38 (0.94-0.99 without their groups), the veto refused its focus groups,
    and Alg. 6 excluded it two rounds later (issue 13: poison ×3, seed 16). Replayed on
    the traced suite the check lifted those two vetoes and two of attackers, both
    excluded anyway (README, "thirteenth change"). The veto keeps its fit where the
    other is not sharp: leaving the departed users' groups out of every use of the
    window made honest users with skewed data look like free-riders (non-IID 2+2 seed 0
    and poison ×3 seed 1 excluded one each)."""
    trusted_weight: float | None = None
    """Not in the paper (None = not used): under a
    :func:`sharp_fit`, a focus group whose focus user is weighed at least this scores
    whatever its accuracy and contribution. The fit pools every group a user was in; one
    group's accuracy also carries its partners' data. A user holding 11-17 of 1,347
    samples trains the same steps as the others and overfits them, and every group it
    was in fell below the accuracy bar while the fit weighed it at 0.7-0.9; Alg. 6
    excluded it (issue 13: "less data 0+0", 6 of 20 seeds). In the traced suite one
    attacker's focus group in 1,186 had its user weighed at 0.5 or more under a sharp fit
    (README, "thirteenth change")."""
    believed_noise: float | None = None
    """Not in the paper (None = always believed): with ``level_rounds``, the fitted clean
    level is the contribution test's yardstick only where the fit explains every round
    of the window within this many times its level (relative residual); elsewhere the
    round's largest contribution is (:func:`yardstick`), as without a window. A poisoner
    of three times the honest step turns the median some rounds and not others; a round
    fitted at twice its level or worse bends the level of the others: three rounds after
    one, an honest user whose two focus groups were the most accurate of their rounds
    (0.85 and 0.90 with τ at 0.36 and 0.72) read 0.55-0.60 of the bent level, failed on
    contribution and was excluded (issue 13: poison ×3, seed 24; 0.93 of the round's
    largest contribution). The same bar as :data:`CONVICT_NOISE` sets for believing the
    fit's weights."""
    contribution_direction: str = "median"
    """Not in the paper (:data:`DIRECTIONS`; "median" = as first built): what a group's
    update is projected on to measure its contribution (:func:`group_contributions`).
    "last_step": the global model's step into this round (M_r − M_{r−1}, both recorded
    on the ledger), the median of the basic groups' updates only where there is none
    (round 1, or a round that did not move the model). The median leans towards the
    noise of the round's uploads and credits a disguised free-rider's groups with it
    (issue 13: all of its attackers out by round 10 in 4 of 10 seeds with the median, 9
    of 10 along the last step); the last step reads honest users with skewed data as
    free-riders (non-IID, no attacker: 3 excluded in 20 seeds), so it is not the
    default. "accurate_median": the median over the basic groups whose accuracy beats
    the bar a group must beat to score (:func:`accurate_basic`); with three poisoners and
    three free-riders among nine the median of every basic group is an attacker's
    direction, honest groups read backwards along it, and one honest user was excluded
    on contribution alone (issue 13: IID 3+3, seed 15). "leading_median": the median
    over the basic groups whose accuracy is above τ − ``tolerance`` (:func:`leading_basic`),
    the scoring bar without ``relative_tolerance``. That loosening lets honest groups
    with skewed data score while the model learns, but groups holding a label flipper
    straddle the loosened bar: their accuracy (0.4-0.6) is what pulls τ down to 0.6-0.7
    while clean groups reach 0.9, and along a median they helped set a flipper weighed
    0.5, out of reach of ``convict_below`` (issue 13, README "fifteenth change")."""

    contribution_layers: str = "all"
    """Not in the paper (:data:`LAYERS`; "all" = as first built): which of the model's
    parameters a group's update is projected on. "features": the convolutional layers
    only (:mod:`fairbus.training.layout`; the whole vector for a model without a known
    split). Issue 13: the fully connected layers move class by class — a user holding two
    or three classes moves the classifier's rows of its own classes — so the median of
    the basic groups' updates there is the majority classes' direction, and a user whose
    classes few others hold read as a free-rider: with every user holding two or three
    classes, 10 honest users excluded in 20 seeds along every layer, 1 along the
    convolutional ones (README, "fourteenth change")."""

    class_lead: float | None = None
    """Not in the paper (None = off): a user whose groups classify some class better
    than the round's other groups, by at least this much of Youden's informedness
    (:func:`class_leaders`), is not convicted on its fitted weight
    (:func:`fit_convicted`). Issue 13: along the feature layers a user holding two or
    three classes that others also hold moves the model little, and as the model learns
    class by class its θ falls (one from 0.70 in round 3 to 0.16 in round 9) to where a
    free-rider's is; yet its groups lead its own classes by 0.2-0.5 of informedness,
    round after round, where a free-rider's groups lead none (traced in README,
    "sixteenth change")."""

    def __post_init__(self) -> None:
        if self.contribution_layers not in LAYERS:
            raise DetectionError(
                f"contribution_layers must be one of {', '.join(LAYERS)}, "
                f"got {self.contribution_layers!r}"
            )
        if self.contribution_direction not in DIRECTIONS:
            raise DetectionError(
                f"contribution_direction must be one of {', '.join(DIRECTIONS)}, "
                f"got {self.contribution_direction!r}"
            )
        for name in ("min_evidence", "level_rounds", "evidence_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise DetectionError(f"{name} must be a whole number, got {value!r}")
        if self.level_rounds is not None and self.level_rounds < 1:
            raise DetectionError(f"level_rounds must be >= 1, got {self.level_rounds}")
        if not 0.0 < self.confidence < 1.0:
            raise DetectionError(f"confidence must be in (0, 1), got {self.confidence}")
        window = self.evidence_window
        if self.carry_evidence and window is not None and window < self.min_evidence:
            raise DetectionError(
                f"evidence_window ({window}) must be >= min_evidence ({self.min_evidence}), "
                "or no key user could ever have enough evidence"
            )
        if self.min_evidence < 2:
            raise DetectionError(f"min_evidence must be >= 2, got {self.min_evidence}")
        if self.bound_conf < 0 or self.tolerance < 0:
            raise DetectionError("bound_conf and tolerance must be >= 0")
        tol = self.contribution_tolerance
        if tol is not None and not 0 <= tol < 1:
            raise DetectionError(f"contribution_tolerance must be in [0, 1), got {tol}")
        if self.key_score is not None and not 0 <= self.key_score <= 1:
            raise DetectionError(f"key_score must be in [0, 1], got {self.key_score}")
        for name in (
            "relative_tolerance",
            "weight_floor",
            "suspect_weight",
            "weight_veto",
            "plateau_gain",
            "rank_below",
            "convict_below",
            "trusted_weight",
            "class_lead",
        ):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise DetectionError(f"{name} must be in [0, 1], got {value}")
        for name in ("noise_widening", "noise_ceiling", "widening_cap", "believed_noise"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 10:
                raise DetectionError(f"{name} must be in [0, 10], got {value}")
        cap = self.widening_cap
        if cap is not None and tol is not None and cap < tol:
            raise DetectionError(
                f"widening_cap ({cap}) must not be below contribution_tolerance ({tol})"
            )
        veto, floor = self.weight_veto, self.weight_floor
        if veto is not None and floor is not None and veto > floor:
            raise DetectionError(
                f"weight_veto ({veto}) must not exceed weight_floor ({floor}): a focus "
                "group would be both excused and refused on its user's weight"
            )


@dataclass(frozen=True)
class ClassCounts:
    """A group model's predictions on the test set, by class, in integers: ``right[c]``
    samples of class c classified as c, ``called[c]`` samples of any class classified
    as c, ``samples[c]`` the test samples of class c
    (:attr:`fairbus.evaluation.ExactScore.class_right`, ``class_called``). Every sample
    is called one class, or none is: a model holding NaN or infinity predicts nothing
    (:meth:`fairbus.evaluation.ExactScore.worst`)."""

    samples: tuple[int, ...]
    right: tuple[int, ...]
    called: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.samples) == len(self.right) == len(self.called) >= 2:
            raise DetectionError("class counts need one number per class, of two or more")
        if not all(_is_whole(v) and v >= 0 for v in (*self.samples, *self.right, *self.called)):
            raise DetectionError("class counts must be whole numbers >= 0")
        if any(r > n for r, n in zip(self.right, self.samples, strict=True)):
            raise DetectionError("a class has more samples classified right than it has")
        if any(r > c for r, c in zip(self.right, self.called, strict=True)):
            raise DetectionError("a class has more samples classified right than called it")
        total = sum(self.samples)
        if sum(self.called) not in (0, total):
            raise DetectionError("every test sample must be classified as one class, or none")
        if any(c - r > total - n for n, r, c in zip(self.samples, self.right, self.called,
                                                    strict=True)):  # fmt: skip
            raise DetectionError("a class is called by more samples of others than there are")

    def informedness(self) -> tuple[float, ...]:
        """Youden's J per class: the share of class c called c less the share of the
        other classes' samples called c (0 for a class with no sample, or no other).
        Unlike a class's accuracy it does not reward bias: a model that calls every
        sample c, as one near chance does, has J = 1 − 1 = 0 there. Each value is two
        correctly rounded divisions and a subtraction: the same on every machine."""
        total = sum(self.samples)
        return tuple(
            r / n - (c - r) / (total - n) if 0 < n < total else 0.0
            for n, r, c in zip(self.samples, self.right, self.called, strict=True)
        )


@dataclass(frozen=True)
class RoundContributions:
    """One round's groups (members), their contributions and accuracies: what
    :func:`fit_contributions` fits, carried from round to round like the evidence;
    and, where the evaluation counted by class, each group's informedness per class
    (:meth:`ClassCounts.informedness`), what :func:`class_leaders` reads."""

    groups: tuple[tuple[int, ...], ...]
    contributions: tuple[float, ...]
    accuracies: tuple[float, ...]
    informedness: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not self.groups:
            raise DetectionError("a round needs at least one group")
        if not len(self.groups) == len(self.contributions) == len(self.accuracies):
            raise DetectionError("one contribution and one accuracy per group are needed")
        if self.informedness is not None:
            rows = self.informedness
            if len(rows) != len(self.groups) or len({len(row) for row in rows}) != 1:
                raise DetectionError("informedness needs one row per group, all as long")
            if not all(_is_number(v) and -1.0 <= v <= 1.0 for row in rows for v in row):
                raise DetectionError("informedness must be numbers in [-1, 1]")
        numbers = (*self.contributions, *self.accuracies)
        if not all(_is_number(v) and math.isfinite(v) for v in numbers):
            raise DetectionError("contributions and accuracies must be finite numbers")
        if not all(0.0 <= a <= 1.0 for a in self.accuracies):
            raise DetectionError("accuracies must be in [0, 1]")
        for members in self.groups:
            if not isinstance(members, tuple) or not all(_is_whole(u) for u in members):
                raise DetectionError(f"group {members!r} must be a tuple of user ids")
            if not members or len(set(members)) != len(members):
                raise DetectionError(f"group {members!r} must list distinct members")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class UserAssessment:
    """score_i, and for key users the interval (conf_lo_i, conf_up_i)."""

    user: int
    score: float
    active_groups: int
    conf_lo: float | None = None
    conf_up: float | None = None


@dataclass(frozen=True)
class DetectionResult:
    """τ, every user's assessment, the new key users NKI and the potential violators PI."""

    tau: float
    assessments: Mapping[int, UserAssessment]
    new_key_users: frozenset[int]
    violators: frozenset[int]
    evidence: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    """With ``carry_evidence``: every user's focus-group scores so far (violators left
    out), to pass as ``carried`` next round."""
    group_scores: Mapping[int, float] = field(default_factory=dict)
    """score_g of line 11 for every group."""
    history: tuple[RoundContributions, ...] = ()
    """With ``level_rounds``: the rounds to pass as ``history`` next round."""
    level: float | None = None
    """With ``contribution_tolerance``: what a clean group contributed (:func:`yardstick`)."""


def detect(
    grouping: Grouping,
    accuracies: Mapping[int, float],
    params: DetectionParams = DetectionParams(),
    contributions: Mapping[int, float] | None = None,
    carried: Mapping[int, Sequence[float]] | None = None,
    history: Sequence[RoundContributions] = (),
    class_counts: Mapping[int, ClassCounts] | None = None,
) -> DetectionResult:
    """Run Algorithm 6 on one round. ``accuracies`` maps group id → acc(m_g);
    ``contributions`` (group id → :func:`group_contributions`) is needed with
    ``contribution_tolerance``; ``carried`` is last round's ``evidence``, used with
    ``carry_evidence``; ``history`` is last round's ``history``, used with
    ``level_rounds``; ``class_counts`` (group id → its predictions by class, where the
    evaluation counted them) is read with ``class_lead``."""
    missing = sorted(g.gid for g in grouping.groups if g.gid not in accuracies)
    if missing:
        raise DetectionError(f"no accuracy for groups {missing}")
    for gid, acc in accuracies.items():
        if not (isinstance(acc, float | int) and math.isfinite(acc) and 0.0 <= acc <= 1.0):
            raise DetectionError(f"accuracy of group {gid} must be in [0, 1], got {acc!r}")
    basic = grouping.basic
    if not basic:
        raise DetectionError("a grouping without basic groups cannot set τ")
    key_users = grouping.key_users

    # Lines 5-8: τ, the mean accuracy of the basic group models.
    tau = sum(accuracies[g.gid] for g in basic) / len(basic)
    bar = accuracy_bar(params, tau)
    window = _level_window(grouping, accuracies, params, contributions, history, class_counts)
    level = _checked_level(grouping, params, contributions, window)
    excused = _excused_groups(grouping, params, window, level)
    # Line 21's bar τ − bound_score is at least 0: the model has learnt enough for the
    # groups' scores to make key users.
    learnt = tau - params.bound_score >= 0
    vetoed = _vetoed_groups(grouping, params, window, learnt)
    plateau = at_plateau(params, window, learnt)
    shortfall = _contribution_shortfall(params, window, level, plateau)
    unmatched = _unmatched_focus_groups(grouping)
    scores_group = _trusting(
        _group_scorer(accuracies, bar, shortfall, contributions, level, excused, vetoed, unmatched),
        _trusted_groups(grouping, params, window),
    )

    assessments: dict[int, UserAssessment] = {}
    evidence: dict[int, tuple[float, ...]] = {}
    # Not in the paper: a lone basic group is τ itself (it always "beats" its own
    # accuracy), so it says nothing about its members and is left out of score_i. The
    # grouping has one only where more would leave no room for focus groups
    # (fairbus.grouping.make_grouping), and there the focus groups decide.
    informative = len(basic) > 1
    for user in grouping.users:
        # Lines 9-15: score_i, the fraction of the user's active groups that beat τ.
        active = tuple(g for g in grouping.active(user) if informative or g.kind != BASIC)
        group_scores = tuple(scores_group(g.gid) for g in active)
        score = sum(group_scores) / len(group_scores) if group_scores else 1.0
        if params.carry_evidence:
            # one score per distinct focus group: a repeat is the same model again
            distinct = {g.members: g.gid for g in reversed(active) if g.focus == user}
            own = tuple(scores_group(gid) for gid in sorted(distinct.values()))
            group_scores = (tuple(carried.get(user, ())) if carried else ()) + own
            if params.evidence_window is not None:
                group_scores = group_scores[-params.evidence_window :]
            if user in key_users:
                basic_scores = [scores_group(g.gid) for g in active if g.kind == BASIC]
                pooled = basic_scores + list(group_scores)
                score = sum(pooled) / len(pooled) if pooled else 1.0
        evidence[user] = group_scores
        n = len(group_scores)
        conf_lo = conf_up = None
        if user in key_users and n >= 2:
            # Lines 16-20: the 95% interval of the key user's group scores.
            mean = sum(group_scores) / n
            spread = math.sqrt(sum((s - mean) ** 2 for s in group_scores) / n)
            # Student's t quantile: what scipy.stats.t.ppf computes (it calls stdtrit),
            # without importing scipy.stats (0.5 s at every participant's start).
            quantile = float(special.stdtrit(n - 1, 1 - (1 - params.confidence) / 2))
            half = spread / math.sqrt(n) * quantile
            conf_lo, conf_up = mean - half, mean + half
        assessments[user] = UserAssessment(user, score, n, conf_lo, conf_up)

    # Lines 21-24: users scoring below τ − bound_score become key users.
    key_bar = tau - params.bound_score
    if params.key_score is not None and learnt:
        key_bar = params.key_score
    scoring_low = {u for u, a in assessments.items() if a.score < key_bar}
    new_key_users = set(scoring_low)
    if learnt:
        new_key_users |= suspects(grouping, params, window)
    # Lines 25-29: a key user who stays a key user with a narrow interval is a violator.
    violators = set()
    for user in sorted(scoring_low):
        a = assessments[user]
        if (
            user in key_users
            and a.conf_lo is not None
            and a.conf_up is not None
            and a.active_groups >= params.min_evidence
            and a.conf_up - a.conf_lo < params.bound_conf
        ):
            violators.add(user)
    # Not in the paper: a user the believable contribution fit weighs low is a violator.
    violators |= fit_convicted(grouping, params, window, tau, plateau)
    keys = frozenset(new_key_users - violators)
    return DetectionResult(
        tau,
        assessments,
        keys,
        frozenset(violators),
        _kept_evidence(evidence, carried, violators, keys if params.key_evidence_only else None)
        if params.carry_evidence
        else {},
        {g.gid: scores_group(g.gid) for g in grouping.groups},
        _kept_history(window, params.level_rounds),
        level,
    )


def accuracy_bar(params: DetectionParams, tau: float) -> float:
    """What a group's accuracy must beat to score (line 11's τ, less ``tolerance`` or,
    with ``relative_tolerance``, the larger of it and that fraction of the error left)."""
    if params.relative_tolerance is not None:
        return tau - max(params.tolerance, params.relative_tolerance * (1.0 - tau))
    return tau - params.tolerance


def _kept_evidence(
    evidence: Mapping[int, tuple[float, ...]],
    carried: Mapping[int, Sequence[float]] | None,
    violators: set[int],
    keys: frozenset[int] | None = None,
) -> dict[int, tuple[float, ...]]:
    """This round's evidence, and what was carried for users not in this round; with
    ``keys``, this round's only for the users who stay key users."""
    kept = {u: tuple(scores) for u, scores in (carried or {}).items()}
    kept.update(evidence)
    if keys is not None:
        kept = {u: scores for u, scores in kept.items() if u in keys or u not in evidence}
    return {u: kept[u] for u in sorted(kept) if kept[u] and u not in violators}


def _checked_level(
    grouping: Grouping,
    params: DetectionParams,
    contributions: Mapping[int, float] | None,
    window: Sequence[RoundContributions],
) -> float | None:
    """The contribution test's :func:`yardstick`, after checking the contributions."""
    if params.contribution_tolerance is None:
        return None
    if contributions is None or any(g.gid not in contributions for g in grouping.groups):
        raise DetectionError("contribution_tolerance needs the contribution of every group")
    for gid, c in contributions.items():
        if not math.isfinite(c):
            raise DetectionError(f"contribution of group {gid} must be finite, got {c!r}")
    return yardstick(grouping, contributions, window, params.believed_noise)


def _contribution_shortfall(
    params: DetectionParams,
    window: Sequence[RoundContributions],
    level: float | None,
    plateau: bool,
) -> float | None:
    """How far below the clean level a group's contribution may fall and still score:
    ``contribution_tolerance``, widened to ``noise_widening`` times the fit's relative
    residual in this round (to :data:`LEVEL_DIGITS` significant digits, as the level) up
    to ``widening_cap``; None (no contribution test this round) where that residual is above
    ``noise_ceiling``, or, at a ``plateau`` (:func:`at_plateau`), not below
    ``contribution_tolerance``."""
    tol = params.contribution_tolerance
    widening, ceiling = params.noise_widening, params.noise_ceiling
    tests_noise = widening is not None or ceiling is not None or plateau
    if tol is None or not tests_noise or not window or level is None:
        return tol
    fit = fit_contributions(window)
    if fit is None or not fit.noise:
        return tol
    if not math.isfinite(fit.noise[-1]):
        return None if ceiling is not None or plateau else tol
    noise = fit.noise[-1]
    if ceiling is not None and _significant(noise) > ceiling:
        return None
    if plateau and not _significant(noise) < tol:
        return None
    if widening is None:
        return tol
    widened = max(tol, _significant(widening * noise))
    return widened if params.widening_cap is None else min(params.widening_cap, widened)


def at_plateau(params: DetectionParams, window: Sequence[RoundContributions], learnt: bool) -> bool:
    """Whether the model has stopped learning (:attr:`DetectionParams.plateau_gain`): it
    has learnt (``learnt``: τ ≥ bound_score), the window holds ``level_rounds`` rounds,
    and the groups' mean accuracies of those rounds span less than ``plateau_gain``.
    The same on every machine: each mean is an exactly rounded sum (``math.fsum``) of
    the recorded accuracies divided by the count, and the span one subtraction."""
    gain, rounds = params.plateau_gain, params.level_rounds
    if gain is None or rounds is None or not learnt or len(window) < rounds:
        return False
    means = [math.fsum(r.accuracies) / len(r.accuracies) for r in window]
    return max(means) - min(means) < gain


def _group_scorer(
    accuracies: Mapping[int, float],
    bar: float,
    tol: float | None,
    contributions: Mapping[int, float] | None,
    level: float | None,
    excused: frozenset[int] = frozenset(),
    vetoed: frozenset[int] = frozenset(),
    unmatched: frozenset[int] = frozenset(),
) -> Callable[[int], float]:
    """score_g of line 11: 1 if the group beats τ (and, optionally, contributed at least
    1 − ``tol`` of what a clean group does, or is ``excused`` from that, and is not
    ``vetoed``). With that test, an ``unmatched`` group (smaller than the groups τ is
    taken over) is scored on it alone."""
    if tol is None or level is None or contributions is None:
        # Without the test, or with no group that moved the model: accuracy alone.
        return lambda gid: 1.0 if accuracies[gid] > bar else 0.0
    held = contributions

    def score(gid: int) -> float:
        enough = gid not in vetoed and (gid in excused or held[gid] / level >= 1 - tol)
        return 1.0 if (gid in unmatched or accuracies[gid] > bar) and enough else 0.0

    return score


def _trusted_groups(
    grouping: Grouping, params: DetectionParams, window: Sequence[RoundContributions]
) -> frozenset[int]:
    """The focus groups whose focus user's fitted θ, to :data:`LEVEL_DIGITS` significant
    digits, reaches ``trusted_weight`` under a :func:`sharp_fit`."""
    bar = params.trusted_weight
    fit = sharp_fit(params, window) if bar is not None else None
    if bar is None or fit is None:
        return frozenset()
    return _focus_groups_weighing(grouping, fit, lambda theta: theta >= bar)


def _trusting(score: Callable[[int], float], trusted: frozenset[int]) -> Callable[[int], float]:
    """``score``, but 1 for the ``trusted`` groups (:attr:`DetectionParams.trusted_weight`)."""
    if not trusted:
        return score
    return lambda gid: 1.0 if gid in trusted else score(gid)


def _unmatched_focus_groups(grouping: Grouping) -> frozenset[int]:
    """The focus groups smaller than a lone basic group, whose accuracy is τ: they are
    scored on their contribution alone (not in the paper). A lone basic group holds
    every user, so τ is the accuracy of the whole population's model, which a group of
    three users with skewed data does not reach however well they train: after three
    attackers were excluded at once, two focus groups of an honest user read 0.42 and
    0.61 against τ 0.59 and 0.71 while contributing 1.05 and 1.01 of a clean group, and
    it was excluded (issue 13: non-IID 2+2, seed 0). A group's contribution does not
    depend on its size (:func:`group_contributions`)."""
    basic = grouping.basic
    if len(basic) != 1:
        return frozenset()
    size = len(basic[0].members)
    return frozenset(g.gid for g in grouping.focus if len(g.members) < size)


def _excused_groups(
    grouping: Grouping,
    params: DetectionParams,
    window: Sequence[RoundContributions],
    level: float | None,
) -> frozenset[int]:
    """The focus groups whose focus user's fitted weight θ reaches ``weight_floor``: their
    contribution is not held against them (:attr:`DetectionParams.weight_floor`). Each θ
    is rounded to :data:`LEVEL_DIGITS` significant digits, as the level is."""
    floor = params.weight_floor
    if floor is None or not window or level is None:
        return frozenset()
    fit = fit_contributions(window)
    if fit is None:
        return frozenset()
    return _focus_groups_weighing(grouping, fit, lambda theta: theta >= floor)


def suspects(
    grouping: Grouping, params: DetectionParams, window: Sequence[RoundContributions]
) -> frozenset[int]:
    """The users that ``suspect_weight`` makes key users: those whose fitted weight θ, to
    :data:`LEVEL_DIGITS` significant digits, is below it. Only where the fit is sharp:
    more groups in the window than the fit has unknowns (a weight per user and a level
    per round; with fewer it fits anything exactly), and the relative residual of every
    round in which the model had learnt below ``contribution_tolerance``, the shortfall
    the contribution test looks for. One weight per user holds only while users move the
    model the same way round after round: where poisoners turned the median round
    (residual 0.15-0.5) the fit of the rounds after their exclusion still weighed two
    honest users at 0.1-0.45, and made violators of them (issue 13: poison ×3, seed 4).
    A round whose groups' mean accuracy is below ``bound_score`` (at chance: Alg. 6 makes
    no key users there either) is not held against the fit: there every update is mostly
    noise, its residual was 0.25-0.3, and it kept a free-rider the fit weighed at -0.1
    out of the key users for the eight rounds of the window (IID 2+2, seed 8)."""
    floor = params.suspect_weight
    fit = sharp_fit(params, window) if floor is not None else None
    if floor is None or fit is None:
        return frozenset()
    weights = _rounded_weights(fit)
    return frozenset(u for u in grouping.users if weights.get(u, math.inf) < floor)


def sharp_fit(
    params: DetectionParams, window: Sequence[RoundContributions]
) -> ContributionFit | None:
    """The contribution fit of ``window`` where its weights can be believed, else None:
    more groups in the window than the fit has unknowns (a weight per user and a level
    per round; with fewer it fits anything exactly), and the relative residual of every
    round in which the model had learnt (the groups' mean accuracy at least
    ``bound_score``) below ``contribution_tolerance``, the shortfall the contribution
    test looks for (:func:`suspects` has why each guard is there)."""
    tol = params.contribution_tolerance
    if tol is None or not window:
        return None
    fit = fit_contributions(window)
    if fit is None or not fit.noise:
        return None
    equations = sum(len(r.groups) for r in window)
    if equations <= len(fit.weights) + len(window):
        return None
    learnt = [
        noise
        for r, noise in zip(window, fit.noise, strict=True)
        if sum(r.accuracies) / len(r.accuracies) >= params.bound_score
    ]
    if not all(math.isfinite(n) and _significant(n) < tol for n in learnt):
        return None
    return fit


CONVICT_TAU = 0.25
"""The least τ (the basic groups' mean accuracy) at which :func:`fit_convicted` convicts.
At chance honest users differ most in how far they move the model: with 30 users of 45
images each and τ at 0.12-0.17, the fit weighed honest users at 0.1-0.5 with upper bounds
below 0.5, among the free-riders (issue 13, traced: 30 users 0+0 seed 3, 6+6 seeds 0, 2,
3); no honest user's bound was below 0.5 where τ was at least 0.2."""

CONVICT_ROUNDS = 4
"""The fewest rounds in the window before :func:`fit_convicted` believes the fit: with
two or three the weights of the few users the poisoners' groups share settle anywhere
(issue 13, traced: honest users' upper bounds below 0.5 in rounds 3 of IID 3+3 seeds 14
and 15, non-IID seed 6, poison ×3 seed 17; none from round 4 on)."""

CONVICT_NOISE = 2.0
"""The largest relative residual any round of the window may have for
:func:`fit_convicted` to believe the fit. A ×3 poisoner turns the median some rounds
and not others, and a round the fit cannot explain (residual 4-97 times the level in
the traced poison ×3 runs) bends every weight, not only the attackers'; the fits that
put an honest user's upper bound below 0.5 had one (seeds 8, 18, 24). Rounds at chance
are fitted within 0.1-1.4 of the level, and their weights are as sharp as later ones."""

CONVICT_TYPICAL_NOISE = 0.3
"""The largest median relative residual over the window's rounds for :func:`fit_convicted`
to believe the fit. With three poisoners and three free-riders among nine and the model
at chance for five rounds, every round was fitted 0.7-1.2 times its level and the fit
weighed two honest users at −8 and a free-rider at 6.6 (issue 13, a 3+3 run with the
attackers at users 1-6, seed 0). Replayed on the traced suite (a bar of 0.5 then) it
cost 1 of 102 convictions by round 10 in IID 3+3 and 4 of 44 in poison ×3, all but one
of those attackers out by round 10 on their scores."""


def weight_bounds(
    fit: ContributionFit, rounds: Sequence[RoundContributions], confidence: float
) -> dict[int, float] | None:
    """Each user's one-sided upper ``confidence`` bound on its fitted θ, given the
    fitted levels: θ_u + t · se_u. The contributions are c = D θ + e (D: each group's
    row of 1/k per member, times its round's level); se comes from the
    heteroscedasticity-consistent covariance (DᵀD)⁻¹ Dᵀ diag(e²) D (DᵀD)⁻¹, scaled by
    groups over the degrees of freedom left (groups − users − rounds; White's HC1), and
    t is Student's quantile for those degrees (what scipy.stats.t.ppf computes). A
    group fitted badly widens the bounds of its own members, not everyone's: with ×3
    poisoners in the window an honest user whose groups they shared was weighed at 0.27
    with a bound of 0.56 from one residual pooled over every group, 0.61 from its own
    (issue 13, traced: poison ×3 seed 16). None where no degree of freedom is left. Not
    in the paper: the interval Alg. 6 (lines 16-20) puts on a key user's group scores,
    put on its fitted weight instead. numpy, not statsmodels: the model is this module's
    own bilinear fit with its levels held, and statsmodels would be a dependency for
    three lines of linear algebra."""
    users = sorted(fit.weights)
    incidence = _incidence(rounds, users)
    design = np.vstack([a * level for a, level in zip(incidence, fit.levels, strict=True)])
    observed = np.concatenate([np.asarray(r.contributions, dtype=np.float64) for r in rounds])
    freedom = len(observed) - len(users) - len(rounds)
    if freedom < 1:
        return None
    theta = np.array([fit.weights[u] for u in users])
    residual = observed - design @ theta
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            bread = np.linalg.pinv(design.T @ design)
            meat = (design * np.square(residual)[:, None]).T @ design
            spread = np.diag(bread @ meat @ bread) * (len(observed) / freedom)
    except (np.linalg.LinAlgError, FloatingPointError):
        return None
    errors = np.sqrt(np.maximum(spread, 0.0))
    quantile = float(special.stdtrit(freedom, confidence))
    return {u: fit.weights[u] + quantile * float(e) for u, e in zip(users, errors, strict=True)}


def fit_convicted(
    grouping: Grouping,
    params: DetectionParams,
    window: Sequence[RoundContributions],
    tau: float,
    plateau: bool,
) -> frozenset[int]:
    """The users of this round that ``convict_below`` makes violators, but for those
    whose groups lead a class over the window (:func:`class_leaders`, with
    ``class_lead``): the upper bound
    of their fitted θ (:func:`weight_bounds`, to :data:`LEVEL_DIGITS` significant
    digits) is below it, times one less the window's median relative residual
    (:func:`convict_bar`), where τ is at least :data:`CONVICT_TAU`, the fit explains
    at least :data:`CONVICT_ROUNDS` rounds of the window within :data:`CONVICT_NOISE`
    (:func:`_explained_fit`) with a median relative residual (:func:`typical_noise`) of
    at most :data:`CONVICT_TYPICAL_NOISE`, and the model is not at a ``plateau``
    (:func:`at_plateau`: once it has converged an honest update is mostly noise and its
    θ drifts towards 0). No one is convicted where the conviction would leave fewer of the
    round's users than its smallest basic group holds: Alg. 6 rests on an honest
    majority, and a fit that puts nearly everyone below the bar has turned. Among users
    holding two or three classes, after three of four attackers went, the fit of the
    rounds they had dominated weighed the five honest users left at −0.8 to −1.8 and
    convicted all five beside the free-rider still there (issue 13: 2-3 classes 2+2,
    seed 19, round 10); the most an attacked suite run convicted at once otherwise was
    six of nine (IID 3+3), leaving three. It keeps the last attackers as well where the
    users left form one basic group a round: IID 3+3 finds 112 of 120 with it, 120
    without; a bar of the task's smallest group (three) instead finds 120 but lets an
    honest user go among users holding two or three classes (README, "sixteenth
    change")."""
    if params.convict_below is None or plateau or tau < CONVICT_TAU:
        return frozenset()
    explained = _explained_fit(window)
    if explained is None:
        return frozenset()
    fit, fitted = explained
    typical = typical_noise(fit, fitted)
    if typical > CONVICT_TYPICAL_NOISE:
        return frozenset()
    bounds = weight_bounds(fit, fitted, params.confidence)
    if bounds is None:
        return frozenset()
    bar = convict_bar(params.convict_below, typical)
    low = frozenset(u for u in grouping.users if u in bounds and _significant(bounds[u]) < bar)
    if len(grouping.users) - len(low) < min((len(g.members) for g in grouping.basic), default=1):
        # Too few would be left to form a group: the fit has turned, not the users.
        return frozenset()
    if params.class_lead is None or not low:
        return low
    return low - class_leaders(low, window, params.class_lead, params.confidence)


def _column_means(rows: Sequence[tuple[float, ...]]) -> list[float]:
    """Per class, the mean over ``rows`` (groups) of one length."""
    return [statistics.fmean(column) for column in zip(*rows, strict=True)]


CLASS_LEAD_ROUNDS = 6
"""The fewest rounds of the window, with the user's groups and others evaluated by
class, before :func:`class_leaders` believes a lead. With four or five, attackers'
groups led some class by 0.11-0.22 in the rounds the model learnt fastest (issue 13,
traced over 90 runs: free-riders in IID 2+2 seed 7, IID 3+3 seed 4, non-IID 2+2 seed 7,
a label flipper in seed 3, each excluded in round 4); with six or more, three attackers
in 60 attacked runs (two IID 3+3 free-riders in round 6, one free-rider among users
holding two or three classes) against 760 of 900 rounds of honest users holding two or
three classes (README, "sixteenth change")."""


def class_leaders(
    users: Iterable[int], window: Sequence[RoundContributions], lead: float, confidence: float
) -> frozenset[int]:
    """The ``users`` whose groups classify some class better than the other groups of
    their rounds: per round and class, the mean informedness of the user's groups less
    that of the others (:meth:`ClassCounts.informedness`); over the window's rounds
    that have both (at least :data:`CLASS_LEAD_ROUNDS`), a mean gap of at least
    ``lead`` whose one-sided lower ``confidence`` bound (Student's t over the rounds) is
    above 0. Not in either paper. A free-rider's groups move the model less in every
    class, a poisoner's move it backwards, a label flipper's teach its classes wrong;
    an honest user holding a class few others hold is the reason its groups know that
    class. statistics.fmean and stdev round correctly (stdev sums in fractions), and
    the mean and bound are compared at :data:`LEVEL_DIGITS` significant digits; the
    quantile is scipy's ``stdtrit``, as in :func:`weight_bounds`, so scipy versions that
    differ in its last bit could disagree on a bound within that of 0."""
    return frozenset(u for u in users if _leads_a_class(u, window, lead, confidence))


def _leads_a_class(
    user: int, window: Sequence[RoundContributions], lead: float, confidence: float
) -> bool:
    gaps: list[list[float]] = []  # per round, per class
    for r in window:
        if r.informedness is None:
            continue
        mine = [row for members, row in zip(r.groups, r.informedness, strict=True)
                if user in members]  # fmt: skip
        others = [row for members, row in zip(r.groups, r.informedness, strict=True)
                  if user not in members]  # fmt: skip
        if mine and others:
            gaps.append([a - b for a, b in zip(_column_means(mine), _column_means(others),
                                               strict=True)])  # fmt: skip
    rounds = len(gaps)
    if rounds < CLASS_LEAD_ROUNDS or len({len(g) for g in gaps}) != 1:
        return False
    quantile = float(special.stdtrit(rounds - 1, confidence))
    for per_class in zip(*gaps, strict=True):
        mean = statistics.fmean(per_class)
        bound = mean - quantile * statistics.stdev(per_class) / math.sqrt(rounds)
        if _significant(mean) >= lead and _significant(bound) > 0:
            return True
    return False


def typical_noise(fit: ContributionFit, rounds: Sequence[RoundContributions]) -> float:
    """The median relative residual of the fit over the ``rounds`` whose groups do not
    all hold the same users (inf where none is left). Groups of the same users upload the
    same sum and read the same contribution, which their round's level fits exactly
    whatever the weights: once six attackers of nine were out, the three honest users
    left filled every group, and two such rounds of residual 0 brought the window's
    median from 0.50 to 0.29, where a fit that weighed two departed free-riders at 1.5
    and 2.1 convicted two of the honest three (issue 13: IID 3+3, seed 6, with
    ``leading_median``)."""
    informative = [
        noise
        for r, noise in zip(rounds, _rounded_noise(fit), strict=True)
        if len({frozenset(members) for members in r.groups}) > 1
    ]
    return statistics.median(informative) if informative else math.inf


def convict_bar(convict_below: float, residual: float) -> float:
    """What :func:`fit_convicted` holds a user's upper bound against: ``convict_below``
    times one less the median relative residual of the window's rounds. The bounds are
    each user's own groups' scatter around the fit (:func:`weight_bounds`), and say
    nothing of how far one weight per user is from the truth; where the typical round is
    fitted at a fraction r of its level, each weight is off by about that much. Honest
    users holding two or three classes move the feature layers as far as their classes
    are common, less as the model learns class by class (one fell from 0.70 to 0.16
    between rounds 3 and 9): in 20 seeds of them, two were convicted in round 9 or 10
    with bounds 0.37-0.39 under fits whose median residual r was 0.20-0.21 (not with
    this bar; one with a bound of 0.34 at r 0.14 still is). Of 107 convictions of
    attackers traced in IID 3+3, label flip, poison ×3 and two or three classes 2+2 (10
    seeds each), 4 had bounds at 0.33-0.40, above 0.4 · (1 − r) (issue 13, README
    "fifteenth change"). ``residual`` is :func:`typical_noise`. Exact: the residuals are
    rounded to :data:`LEVEL_DIGITS` digits and the product is one IEEE operation."""
    return convict_below * (1.0 - residual)


def _explained_fit(
    window: Sequence[RoundContributions],
) -> tuple[ContributionFit, tuple[RoundContributions, ...]] | None:
    """The contribution fit :func:`fit_convicted` believes, and the rounds it is over:
    the fit of ``window`` where no round's relative residual exceeds
    :data:`CONVICT_NOISE`; else the fit of the other rounds, where they are still at
    least :data:`CONVICT_ROUNDS` and it explains each of them within
    :data:`CONVICT_NOISE`; else None. A ×3 poisoner that turned the median of one round
    leaves that round unexplained, and with it in the window no conviction was made for
    the rounds it stayed there: a poisoner the other rounds weighed at −2.8 (upper bound
    −2.6) stayed in the training to round 10 (issue 13: poison ×3, seeds 1 and 2).
    Replayed on the 151 traced runs of the suite, refitting without such rounds convicted
    no honest user by round 10, and 53 of poison ×3's 60 attackers (40 without), 114 of
    IID 3+3's 120 (96) (README, "thirteenth change")."""
    rounds = tuple(window)
    fit = _freely_fitted(rounds)
    if fit is None:
        return None
    noise = _rounded_noise(fit)
    if max(noise) > CONVICT_NOISE:
        rounds = tuple(r for r, n in zip(rounds, noise, strict=True) if n <= CONVICT_NOISE)
        fit = _freely_fitted(rounds)
        if fit is None or max(_rounded_noise(fit)) > CONVICT_NOISE:
            return None
    return fit, rounds


def _freely_fitted(rounds: tuple[RoundContributions, ...]) -> ContributionFit | None:
    """The contribution fit of ``rounds`` where they are at least :data:`CONVICT_ROUNDS`
    and leave at least as many degrees of freedom (groups − users − rounds) as there are
    users, else None. The heteroscedasticity-consistent errors of :func:`weight_bounds`
    come from the residuals, and a fit with few equations to spare leaves residuals
    near 0 whatever the truth: refitted over four rounds of 17 groups for 9 users (4
    degrees of freedom), the fit weighed two honest users below −0.5 and a poisoner at
    1.9, all within ±0.4 (issue 13: IID 3+3 seed 1, round 7, after the six attackers were
    out). Every conviction of an attacker in the traced suite had at least 9 for 9 users."""
    if len(rounds) < CONVICT_ROUNDS:
        return None
    fit = fit_contributions(rounds)
    if fit is None or not fit.noise:
        return None
    freedom = sum(len(r.groups) for r in rounds) - len(fit.weights) - len(rounds)
    return fit if freedom >= len(fit.weights) else None


def _rounded_noise(fit: ContributionFit) -> list[float]:
    """Each round's relative residual to :data:`LEVEL_DIGITS` significant digits (inf
    where it is not finite, so that the largest and the median do not depend on order)."""
    return [_significant(n) if math.isfinite(n) else math.inf for n in fit.noise]


def _vetoed_groups(
    grouping: Grouping,
    params: DetectionParams,
    window: Sequence[RoundContributions],
    learnt: bool,
) -> frozenset[int]:
    """The focus groups whose focus user's fitted weight θ, to :data:`LEVEL_DIGITS`
    significant digits, is below ``weight_veto`` under a :func:`sharp_fit`, once the
    model has learnt (:attr:`DetectionParams.weight_veto`); with
    ``veto_without_departed``, also under the sharp fit without the groups of users no
    longer in ``grouping``, where there is one."""
    veto = params.weight_veto
    fit = sharp_fit(params, window) if veto is not None and learnt else None
    if veto is None or fit is None:
        return frozenset()
    vetoed = _focus_groups_weighing(grouping, fit, lambda theta: theta < veto)
    if not vetoed or not params.veto_without_departed:
        return vetoed
    remaining = _without_departed(window, frozenset(grouping.users))
    fit = sharp_fit(params, remaining) if remaining != tuple(window) else None
    if fit is None:
        return vetoed
    return vetoed & _focus_groups_weighing(grouping, fit, lambda theta: theta < veto)


def _without_departed(
    window: Sequence[RoundContributions], present: frozenset[int]
) -> tuple[RoundContributions, ...]:
    """``window`` with only the groups whose members are all in ``present`` (a round left
    with none is left out)."""
    kept = []
    for r in window:
        rows = [k for k, members in enumerate(r.groups) if present.issuperset(members)]
        if rows:
            informedness = r.informedness
            kept.append(
                RoundContributions(
                    tuple(r.groups[k] for k in rows),
                    tuple(r.contributions[k] for k in rows),
                    tuple(r.accuracies[k] for k in rows),
                    None if informedness is None else tuple(informedness[k] for k in rows),
                )
            )
    return tuple(kept)


def _rounded_weights(fit: ContributionFit) -> dict[int, float]:
    """Every user's fitted θ to :data:`LEVEL_DIGITS` significant digits, as the level is:
    what each comparison of a weight with a floor or a veto takes."""
    return {u: _significant(w) for u, w in fit.weights.items()}


def _focus_groups_weighing(
    grouping: Grouping, fit: ContributionFit, chosen: Callable[[float], bool]
) -> frozenset[int]:
    """The focus groups whose focus user has a fitted weight that ``chosen`` accepts (a
    user the fit has no weight for is never chosen)."""
    weights = _rounded_weights(fit)
    return frozenset(
        g.gid
        for g in grouping.focus
        if g.focus is not None and g.focus in weights and chosen(weights[g.focus])
    )


def yardstick(
    grouping: Grouping,
    contributions: Mapping[int, float],
    window: Sequence[RoundContributions] = (),
    believed_noise: float | None = None,
) -> float | None:
    """What a clean group contributes this round: the fitted clean level where there is
    a ``window`` (negative where the basic groups' median pointed backwards) whose every
    round the fit explains within ``believed_noise`` times its level
    (:attr:`DetectionParams.believed_noise`), else the largest contribution; None where
    neither says anything."""
    fitted = clean_level(window) if window and _explained(window, believed_noise) else None
    if fitted is not None:
        return fitted if fitted != 0 else None
    best = max(contributions[g.gid] for g in grouping.groups)
    return best if best > 0 else None


def _explained(window: Sequence[RoundContributions], believed_noise: float | None) -> bool:
    """Whether no round of ``window`` has a relative residual (to :data:`LEVEL_DIGITS`
    significant digits) above ``believed_noise`` under its fit (None: always)."""
    if believed_noise is None:
        return True
    fit = fit_contributions(window)
    if fit is None:
        return True  # clean_level has nothing to stand on either
    return all(n <= believed_noise for n in _rounded_noise(fit))


def group_contributions(
    updates: Mapping[int, npt.NDArray[np.float64]],
    basic: Iterable[int],
    last_step: npt.NDArray[np.float64] | None = None,
) -> dict[int, float]:
    """Each group's update m_g − M_global projected on a direction of unit length: the
    global model's ``last_step`` (M_r − M_{r−1}) where one is given and it moved, else
    the coordinate-wise median of the basic groups' updates; not in the paper.

    The projection drops the part of an update that is local noise, so a clean group of
    any size scores about the same and a group with a free-rider (k − 1)/k of it. Which
    way is forward is left to :func:`fit_contributions`: with as many poisoners as
    honest users the median follows the poisoners as often as not.

    The median is taken over this round's uploads, so it leans towards whatever noise
    they carry: a disguised free-rider's noise (1e-2 per weight) moves the median of the
    groups it is in, and its groups' projections grow with it, to 1.1–1.8 of a clean
    group's once the model converges (issue 13). The last step comes from the recorded
    global models only, so no upload of the round can lean it (:data:`DIRECTIONS` has
    what that costs).

    Consensus-critical (the ledger re-derives it, :mod:`fairbus.ledger.verify`), so the
    same on every machine: the median and the elementwise products are correctly
    rounded IEEE operations, and the sums are exactly rounded (``math.fsum``), where a
    BLAS dot product's summation order would depend on the CPU and the thread count.
    """
    basic = list(basic)
    if not basic:
        raise DetectionError("contributions need at least one basic group")
    direction: npt.NDArray[np.float64] | None = None
    if last_step is not None:
        first = updates[basic[0]]
        if last_step.shape != first.shape:
            raise DetectionError(
                f"the last step has {last_step.size} values, the updates {first.size}"
            )
        step_length = math.sqrt(_exact_sum(np.square(last_step)))
        if step_length > 0.0 and math.isfinite(step_length):
            direction = np.array(last_step, dtype=np.float64)
    if direction is None:
        direction = np.median(np.stack([updates[gid] for gid in basic]), axis=0)
    length = math.sqrt(_exact_sum(np.square(direction)))
    if length == 0.0 or not math.isfinite(length):
        return dict.fromkeys(updates, 0.0)
    direction /= length
    return {gid: _exact_sum(update * direction) for gid, update in updates.items()}


def contributions_along(
    params: DetectionParams,
    updates: Mapping[int, npt.NDArray[np.float64]],
    basic: Sequence[int],
    accuracies: Mapping[int, float],
    last_step: npt.NDArray[np.float64] | None = None,
    ranks: Mapping[int, float | None] | None = None,
    anchor: float | None = None,
    features: int | None = None,
) -> dict[int, float]:
    """:func:`group_contributions` along the task's ``contribution_direction``: the
    ``last_step`` only for "last_step", for "accurate_median" and "leading_median" the
    median over :func:`ranked_basic` (``ranks``: group id → the true class's mean rank;
    ``anchor``: the global model's) where it names groups, else over
    :func:`accurate_basic`, respectively :func:`leading_basic`. With
    ``contribution_layers`` "features", on the first ``features`` values of each update
    only (the model's convolutional layers, :func:`fairbus.training.layout.
    feature_values` of the recorded model; None: every value). What the provider
    reports and the ledger re-derives, one choice for both."""
    if params.contribution_layers == "features" and features is not None:
        if not 0 < features <= min((u.size for u in updates.values()), default=features):
            raise DetectionError(f"the updates have no {features} feature values")
        updates = {gid: update[:features] for gid, update in updates.items()}
        last_step = None if last_step is None else last_step[:features]
    direction = params.contribution_direction
    if direction in CHOSEN_MEDIANS:
        ranked = ranked_basic(basic, accuracies, params, ranks or {}, anchor)
        chosen = leading_basic if direction == "leading_median" else accurate_basic
        basic = ranked if ranked is not None else chosen(basic, accuracies, params)
    return group_contributions(updates, basic, last_step if direction == "last_step" else None)


RANK_SLACK = 0.1
"""How far (in the true class's mean rank, 0 to classes − 1) a basic group's model may
rank behind the round's global model and still set the direction under ``rank_below``.
Measured (issue 13, README "eleventh change"): near chance, honest groups with skewed
data rank up to 0.12 behind it now and then, groups holding two of three poisoners
0.15-1.9 behind."""


def needs_anchor(
    params: DetectionParams, basic: Sequence[int], accuracies: Mapping[int, float]
) -> bool:
    """Whether this round's contributions are measured along :func:`ranked_basic`'s
    groups, which needs the global model's rank: ``rank_below`` is set, the direction
    is one of :data:`CHOSEN_MEDIANS` and τ (:func:`exact_tau`) is below ``rank_below``."""
    below = params.rank_below
    if below is None or params.contribution_direction not in CHOSEN_MEDIANS or not basic:
        return False
    return exact_tau(basic, accuracies) < below


def ranked_basic(
    basic: Sequence[int],
    accuracies: Mapping[int, float],
    params: DetectionParams,
    ranks: Mapping[int, float | None],
    anchor: float | None,
) -> list[int] | None:
    """The basic groups whose model ranks the true class no worse than the round's
    global model (its mean rank ``anchor``) did, within :data:`RANK_SLACK`
    (:attr:`DetectionParams.rank_below`); None where :func:`needs_anchor` says no, the
    anchor or a basic group's rank is unknown, or fewer than half of the basic groups are
    within it. Honest majorities move the model forward; where most groups fall behind
    the model they started from, the rank says nothing about poisoners (30 users holding
    45 images each: their groups overfit, and at chance half of them ranked 0.18 or more
    behind the global model; README, "eleventh change"). The ranks are exactly rounded
    quotients of integers (:mod:`fairbus.evaluation`), so every machine picks the same
    groups."""
    if not needs_anchor(params, basic, accuracies) or anchor is None:
        return None
    known = [(gid, ranks.get(gid)) for gid in basic]
    if not math.isfinite(anchor) or any(r is None or not math.isfinite(r) for _, r in known):
        return None
    bar = anchor + RANK_SLACK
    chosen = [gid for gid, rank in known if rank is not None and rank <= bar]
    return chosen if chosen and 2 * len(chosen) >= len(known) else None


def exact_tau(basic: Sequence[int], accuracies: Mapping[int, float]) -> float:
    """τ over ``basic`` as an exactly rounded sum (``math.fsum``) over the count: the same
    number whatever order the groups are listed in."""
    missing = [gid for gid in basic if gid not in accuracies]
    if missing:
        raise DetectionError(f"no accuracy for basic groups {missing}")
    return math.fsum(accuracies[gid] for gid in basic) / len(basic)


def accurate_basic(
    basic: Sequence[int], accuracies: Mapping[int, float], params: DetectionParams
) -> list[int]:
    """The basic groups whose accuracy beats :func:`accuracy_bar` (all of them where none
    does): the median direction of ``accurate_median`` is taken over them only. τ here is
    an exactly rounded sum (``math.fsum``) over the count, so every machine picks the
    same groups from the same recorded accuracies whatever order it lists them in."""
    return _groups_above(basic, accuracies, accuracy_bar(params, exact_tau(basic, accuracies)))


def leading_basic(
    basic: Sequence[int], accuracies: Mapping[int, float], params: DetectionParams
) -> list[int]:
    """The basic groups whose accuracy is above τ − ``tolerance`` (all of them where none
    is): the median direction of ``leading_median`` is taken over them only. τ is
    :func:`exact_tau`, so every machine picks the same groups from the same recorded
    accuracies whatever order it lists them in."""
    return _groups_above(basic, accuracies, exact_tau(basic, accuracies) - params.tolerance)


def _groups_above(basic: Sequence[int], accuracies: Mapping[int, float], bar: float) -> list[int]:
    """The basic groups whose accuracy is above ``bar``, in their order; all of them where
    none is."""
    return [gid for gid in basic if accuracies[gid] > bar] or list(basic)


def _exact_sum(values: npt.NDArray[np.float64]) -> float:
    """The correctly rounded sum, whatever the order (NaN where an infinity or an
    overflow leaves no sum: only models that are out of range anyway)."""
    try:
        return math.fsum(values.tolist())
    except (OverflowError, ValueError):
        return math.nan


def _kept_history(
    window: tuple[RoundContributions, ...], level_rounds: int | None
) -> tuple[RoundContributions, ...]:
    """The rounds the next round's fit takes from the past: the last level_rounds − 1."""
    if not level_rounds or level_rounds < 2:
        return ()
    return window[-(level_rounds - 1) :]


def _level_window(
    grouping: Grouping,
    accuracies: Mapping[int, float],
    params: DetectionParams,
    contributions: Mapping[int, float] | None,
    history: Sequence[RoundContributions],
    class_counts: Mapping[int, ClassCounts] | None = None,
) -> tuple[RoundContributions, ...]:
    """Up to ``level_rounds`` − 1 rounds of ``history`` and this one, oldest first (this
    one with its informedness where ``class_counts`` has every group's)."""
    if not params.level_rounds or params.contribution_tolerance is None or contributions is None:
        return ()
    groups = sorted(grouping.groups, key=lambda g: g.gid)
    if any(g.gid not in contributions for g in groups):
        return ()  # _checked_level names the missing contributions
    informedness = None
    if class_counts is not None and all(g.gid in class_counts for g in groups):
        informedness = tuple(class_counts[g.gid].informedness() for g in groups)
    this = RoundContributions(
        tuple(g.members for g in groups),
        tuple(float(contributions[g.gid]) for g in groups),
        tuple(float(accuracies[g.gid]) for g in groups),
        informedness,
    )
    earlier = tuple(history)[-(params.level_rounds - 1) :] if params.level_rounds > 1 else ()
    return (*earlier, this)


@dataclass(frozen=True)
class ContributionFit:
    """What :func:`fit_contributions` found: one level per round, one weight per user."""

    levels: tuple[float, ...]
    weights: Mapping[int, float]
    noise: tuple[float, ...] = ()
    """Per round, the fit's relative residual: the root mean square of contribution −
    level · mean θ over the round's groups, divided by the level's size."""


LEVEL_DIGITS = 9
"""The fitted level is rounded to this many significant digits before groups are compared
with it: the fit runs on LAPACK, whose last bits may differ between machines, and the
ledger re-derives every decision (a group would score differently only within 1e-9 of
the bar)."""


def _significant(value: float) -> float:
    """``value`` to :data:`LEVEL_DIGITS` significant digits (what every comparison of a
    fitted number with a bar or a floor takes)."""
    return float(f"{value:.{LEVEL_DIGITS}g}")


def clean_level(rounds: Sequence[RoundContributions]) -> float | None:
    """The contribution a group of users who all trained honestly has in the last of
    ``rounds`` (:func:`fit_contributions`), to :data:`LEVEL_DIGITS` significant digits;
    None where the fit has nothing to stand on."""
    fit = fit_contributions(rounds)
    if fit is None:
        return None
    level = fit.levels[-1]
    return _significant(level)


def fit_contributions(
    rounds: Sequence[RoundContributions], iterations: int = 30
) -> ContributionFit | None:
    """Fit every round's clean level and every user's weight to the group contributions
    of ``rounds``; None where the fit has nothing to stand on.

    Not in the paper. Model: a group's contribution is L_r times the mean of its
    members' θ_u, with L_r one level per round and θ_u one weight per user over the
    rounds (about 1 for an honest user, 0 for a free-rider, below 0 for a poisoner).
    Alternating least squares: θ given the levels, then each level given θ, with θ
    scaled so that the median of its upper half is 1 (honest users are at least a
    quarter of the users). The groupings change every round, so users that no single
    round tells apart are told apart over several. No group sum of a round determines
    a user's model (the exposure check), and θ_u is one number over several rounds.
    Written here because it is a dozen lines of numpy; no library fits this bilinear
    model with that normalisation.
    """
    if iterations < 1:
        raise DetectionError(f"iterations must be >= 1, got {iterations}")
    return _fit(tuple(rounds), iterations)


@functools.lru_cache(maxsize=16)
def _fit(rounds: tuple[RoundContributions, ...], iterations: int) -> ContributionFit | None:
    """:func:`fit_contributions`, kept: one detection fits the same window twice (the
    level, then the weights of ``weight_floor``), and at 1,000 users a fit is 30 dense
    least-squares solves. A pure function of frozen input."""
    users = sorted({u for r in rounds for members in r.groups for u in members})
    if not rounds or not users:
        return None
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            return _alternating_fit(rounds, users, iterations)
    except (np.linalg.LinAlgError, FloatingPointError, OverflowError):
        # Contributions so large that the fit overflows (a provider's decoder takes any
        # finite float): the round's largest contribution is the yardstick then.
        return None


def _alternating_fit(
    rounds: Sequence[RoundContributions], users: list[int], iterations: int
) -> ContributionFit | None:
    incidence = _incidence(rounds, users)
    observed = [np.asarray(r.contributions, dtype=np.float64) for r in rounds]
    accuracies = [np.asarray(r.accuracies, dtype=np.float64) for r in rounds]
    levels = np.array([max(c.max(), 0.0) for c in observed])
    if not levels.any():
        return None
    theta = np.ones(len(users))
    start = _linear_start(incidence, observed)
    if start is not None:
        theta = start
        levels = _levels_given(incidence, observed, theta, levels)
    for _ in range(iterations):
        design = np.vstack([a * level for a, level in zip(incidence, levels, strict=True)])
        theta = np.linalg.lstsq(design, np.concatenate(observed), rcond=None)[0]
        scale = _upper_median(theta)
        if not scale > 0 and _upper_median(-theta) > 0:
            # L·θ = (−L)·(−θ): the levels started positive, but where the median of the
            # basic groups points backwards (strong poisoners) the honest majority comes
            # out negative. The sign is settled by accuracy below.
            theta, levels, scale = -theta, -levels, _upper_median(-theta)
        if not scale > 0 or not math.isfinite(scale):
            return None
        theta /= scale
        levels = _levels_given(incidence, observed, theta, levels)
    # Forward is where accuracy is: the groups of users with larger θ should be the more
    # accurate ones. Over several rounds this is clear even when, with as many poisoners
    # as honest users, the fit cannot tell which of the two camps is which.
    spread_acc = [acc - acc.mean() for acc in accuracies]
    spread_fit = [a @ theta - (a @ theta).mean() for a in incidence]
    alignment = sum(float(x @ y) for x, y in zip(spread_acc, spread_fit, strict=True))
    size = math.sqrt(sum(float(x @ x) for x in spread_acc) * sum(float(y @ y) for y in spread_fit))
    # Turned round only when accuracy clearly says so: with every group equally accurate
    # the alignment is rounding noise, whose sign may differ between machines.
    # Where turning it round leaves no positive upper median (every user moved the model
    # forward, as with no attacker), the alignment is noise between equally accurate
    # groups: the fit stays as it is. Returning None there made the round's largest
    # contribution the yardstick in about 40% of the rounds of a converged run (issue 13).
    if alignment < -1e-6 * size and _upper_median(-theta) > 0:
        theta, levels = -theta, -levels
        scale = _upper_median(theta)
        theta, levels = theta / scale, levels * scale
    if not (np.isfinite(levels).all() and np.isfinite(theta).all()):
        return None
    noise = tuple(
        math.sqrt(float(np.mean(np.square(c - level * (a @ theta))))) / abs(float(level))
        if level != 0
        else math.inf
        for a, c, level in zip(incidence, observed, levels, strict=True)
    )
    return ContributionFit(
        tuple(float(v) for v in levels),
        {u: float(w) for u, w in zip(users, theta, strict=True)},
        noise,
    )


def _incidence(
    rounds: Sequence[RoundContributions], users: Sequence[int]
) -> list[npt.NDArray[np.float64]]:
    """Per round, each group's row of 1/k for each of its k members (a column per user,
    in the order of ``users``): its mean weight is this row times θ."""
    column = {u: k for k, u in enumerate(users)}
    blocks = []
    for r in rounds:
        block = np.zeros((len(r.groups), len(users)))
        for row, members in enumerate(r.groups):
            block[row, [column[u] for u in members]] = 1.0 / len(members)
        blocks.append(block)
    return blocks


def _levels_given(
    incidence: Sequence[npt.NDArray[np.float64]],
    observed: Sequence[npt.NDArray[np.float64]],
    theta: npt.NDArray[np.float64],
    levels: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Each round's least-squares level given the weights (kept where no group moves)."""
    fitted = levels.copy()
    for k, (a, c) in enumerate(zip(incidence, observed, strict=True)):
        mean_weight = a @ theta
        norm = float(mean_weight @ mean_weight)
        if norm > 0:
            fitted[k] = float(mean_weight @ c) / norm
    return fitted


def _linear_start(
    incidence: Sequence[npt.NDArray[np.float64]], observed: Sequence[npt.NDArray[np.float64]]
) -> npt.NDArray[np.float64] | None:
    """Weights to start the alternating fit from, or None (start from all ones).

    c_r = L_r · A_r θ is c_r / L_r = A_r θ: linear in θ and μ_r = 1/L_r, so the
    right singular vector of [A_r | −c_r] (stacked over the rounds) with the smallest
    singular value fits the model in one solve, each round's level with its own sign.
    Started from all ones and positive levels instead, the alternating fit can settle
    where a level has the wrong sign (issue 13: poisoners of three times the honest step
    turn the median of the basic groups round in some rounds and not in others; the fit
    then put honest weights at ±8 with relative residuals of 4-7). Sign and scale as
    the fit's: the median of the larger half of θ is 1.
    """
    users = incidence[0].shape[1]
    rounds = len(observed)
    blocks = []
    for k, (a, c) in enumerate(zip(incidence, observed, strict=True)):
        block = np.zeros((a.shape[0], users + rounds))
        block[:, :users] = a
        block[:, users + k] = -c
        blocks.append(block)
    stacked = np.vstack(blocks)
    if stacked.shape[0] < stacked.shape[1]:
        return None  # fewer groups than unknowns: no single smallest direction
    vector = np.linalg.svd(stacked, full_matrices=False)[2][-1]
    # A singular vector's sign is LAPACK's choice and may differ between machines: fix it
    # (largest entry positive) before the sign that makes honest users positive is taken,
    # so that every machine starts the fit from the same weights.
    if vector[int(np.argmax(np.abs(vector)))] < 0:
        vector = -vector
    theta = vector[:users]
    for signed in (theta, -theta):
        scale = _upper_median(signed)
        if scale > 0 and math.isfinite(scale):
            return np.asarray(signed / scale, dtype=np.float64)
    return None


def _upper_median(theta: npt.NDArray[np.float64]) -> float:
    """The median of the larger half of the weights: what honest users' weight is."""
    return float(np.median(np.sort(theta)[::-1][: (len(theta) + 1) // 2]))
