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

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import stats

from fairbus.errors import DetectionError
from fairbus.grouping import Grouping


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
    attackers are many."""
    key_score: float | None = None
    """Not in the paper (None = as written): once τ ≥ bound_score, a user becomes a key
    user when its score is below this fraction, in place of line 21's τ − bound_score,
    which near convergence makes key users of everyone who shares one group with an
    attacker and leaves no general users to build focus groups with. While τ <
    bound_score there are no key users, as written: the model has not learnt enough for
    the groups' scores to say anything (with attackers in the majority it never does)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise DetectionError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.min_evidence < 2:
            raise DetectionError(f"min_evidence must be >= 2, got {self.min_evidence}")
        if self.bound_conf < 0 or self.tolerance < 0:
            raise DetectionError("bound_conf and tolerance must be >= 0")
        tol = self.contribution_tolerance
        if tol is not None and not 0 <= tol < 1:
            raise DetectionError(f"contribution_tolerance must be in [0, 1), got {tol}")
        if self.key_score is not None and not 0 <= self.key_score <= 1:
            raise DetectionError(f"key_score must be in [0, 1], got {self.key_score}")


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


def detect(
    grouping: Grouping,
    accuracies: Mapping[int, float],
    params: DetectionParams = DetectionParams(),
    contributions: Mapping[int, float] | None = None,
    carried: Mapping[int, Sequence[float]] | None = None,
) -> DetectionResult:
    """Run Algorithm 6 on one round. ``accuracies`` maps group id → acc(m_g);
    ``contributions`` (group id → :func:`group_contributions`) is needed with
    ``contribution_tolerance``; ``carried`` is last round's ``evidence``, used with
    ``carry_evidence``."""
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
    bar = tau - params.tolerance
    scores_group = _group_scorer(grouping, accuracies, bar, params, contributions)

    assessments: dict[int, UserAssessment] = {}
    evidence: dict[int, tuple[float, ...]] = {}
    for user in grouping.users:
        # Lines 9-15: score_i, the fraction of the user's active groups that beat τ.
        active = grouping.active(user)
        group_scores = tuple(scores_group(g.gid) for g in active)
        score = sum(group_scores) / len(group_scores)
        if params.carry_evidence:
            # one score per distinct focus group: a repeat is the same model again
            distinct = {g.members: g.gid for g in reversed(active) if g.focus == user}
            own = tuple(scores_group(gid) for gid in sorted(distinct.values()))
            group_scores = (tuple(carried.get(user, ())) if carried else ()) + own
        evidence[user] = group_scores
        n = len(group_scores)
        conf_lo = conf_up = None
        if user in key_users and n >= 2:
            # Lines 16-20: the 95% interval of the key user's group scores.
            mean = sum(group_scores) / n
            spread = math.sqrt(sum((s - mean) ** 2 for s in group_scores) / n)
            quantile = float(stats.t.ppf(1 - (1 - params.confidence) / 2, n - 1))
            half = spread / math.sqrt(n) * quantile
            conf_lo, conf_up = mean - half, mean + half
        assessments[user] = UserAssessment(user, score, n, conf_lo, conf_up)

    # Lines 21-24: users scoring below τ − bound_score become key users.
    key_bar = tau - params.bound_score
    if params.key_score is not None and key_bar >= 0:
        key_bar = params.key_score
    new_key_users = {u for u, a in assessments.items() if a.score < key_bar}
    # Lines 25-29: a key user who stays a key user with a narrow interval is a violator.
    violators = set()
    for user in sorted(new_key_users):
        a = assessments[user]
        if (
            user in key_users
            and a.conf_lo is not None
            and a.conf_up is not None
            and a.active_groups >= params.min_evidence
            and a.conf_up - a.conf_lo < params.bound_conf
        ):
            violators.add(user)
    keys = frozenset(new_key_users - violators)
    return DetectionResult(
        tau,
        assessments,
        keys,
        frozenset(violators),
        _kept_evidence(evidence, carried, violators) if params.carry_evidence else {},
        {g.gid: scores_group(g.gid) for g in grouping.groups},
    )


def _kept_evidence(
    evidence: Mapping[int, tuple[float, ...]],
    carried: Mapping[int, Sequence[float]] | None,
    violators: set[int],
) -> dict[int, tuple[float, ...]]:
    """This round's evidence, and what was carried for users not in this round."""
    kept = {u: tuple(scores) for u, scores in (carried or {}).items()}
    kept.update(evidence)
    return {u: kept[u] for u in sorted(kept) if kept[u] and u not in violators}


def _group_scorer(
    grouping: Grouping,
    accuracies: Mapping[int, float],
    bar: float,
    params: DetectionParams,
    contributions: Mapping[int, float] | None,
) -> Callable[[int], float]:
    """score_g of line 11: 1 if the group beats τ (and, optionally, moved the model)."""
    tol = params.contribution_tolerance
    if tol is None:
        return lambda gid: 1.0 if accuracies[gid] > bar else 0.0
    if contributions is None or any(g.gid not in contributions for g in grouping.groups):
        raise DetectionError("contribution_tolerance needs the contribution of every group")
    for gid, c in contributions.items():
        if not math.isfinite(c):
            raise DetectionError(f"contribution of group {gid} must be finite, got {c!r}")
    best = max(contributions[g.gid] for g in grouping.groups)
    if best <= 0:
        # No group moved the model forward: the contributions cannot rank anyone.
        return lambda gid: 1.0 if accuracies[gid] > bar else 0.0
    floor = (1 - tol) * best
    held = contributions
    return lambda gid: 1.0 if accuracies[gid] > bar and held[gid] >= floor else 0.0


def group_contributions(
    updates: Mapping[int, npt.NDArray[np.float64]], basic: Iterable[int]
) -> dict[int, float]:
    """Each group's update m_g − M_global projected on the coordinate-wise median of the
    basic groups' updates (unit length); not in the paper.

    The median follows the honest majority of the basic groups and the projection drops
    the part of an update that is local noise, so a clean group of any size scores about
    the same and a group with a free-rider (k − 1)/k of it.
    """
    basic = list(basic)
    if not basic:
        raise DetectionError("contributions need at least one basic group")
    direction = np.median(np.stack([updates[gid] for gid in basic]), axis=0)
    length = float(np.linalg.norm(direction))
    if length == 0.0 or not math.isfinite(length):
        return dict.fromkeys(updates, 0.0)
    direction /= length
    return {gid: float(update @ direction) for gid, update in updates.items()}
