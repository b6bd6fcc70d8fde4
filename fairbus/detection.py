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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
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
    norm_tolerance: float | None = None
    """Not in the paper (None = not used): a group scores only if also the norm of its
    model's update, ‖m_g − M_global‖, is at least (1 − norm_tolerance) times the 75th
    percentile of the update norms of the basic groups of its size (all basic groups when
    none has its size). A free-rider's or poisoner's group moves
    the model less; accuracy alone often cannot tell (README, detection benchmark). (The
    largest norm as reference caught more free-riders but excluded honest users late in
    training, when updates are small and their norms noisy.)"""

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise DetectionError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.bound_conf < 0 or self.tolerance < 0:
            raise DetectionError("bound_conf and tolerance must be >= 0")
        if self.norm_tolerance is not None and not 0 <= self.norm_tolerance < 1:
            raise DetectionError(f"norm_tolerance must be in [0, 1), got {self.norm_tolerance}")


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


def detect(
    grouping: Grouping,
    accuracies: Mapping[int, float],
    params: DetectionParams = DetectionParams(),
    update_norms: Mapping[int, float] | None = None,
) -> DetectionResult:
    """Run Algorithm 6 on one round. ``accuracies`` maps group id → acc(m_g);
    ``update_norms`` (group id → ‖m_g − M_global‖) is needed with ``norm_tolerance``."""
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
    scores_group = _group_scorer(grouping, accuracies, bar, params, update_norms)

    assessments: dict[int, UserAssessment] = {}
    for user in grouping.users:
        # Lines 9-15: score_i, the fraction of the user's active groups that beat τ.
        group_scores = [scores_group(g.gid) for g in grouping.active(user)]
        n = len(group_scores)
        score = sum(group_scores) / n
        conf_lo = conf_up = None
        if user in key_users and n >= 2:
            # Lines 16-20: the 95% interval of the key user's group scores.
            spread = math.sqrt(sum((s - score) ** 2 for s in group_scores) / n)
            quantile = float(stats.t.ppf(1 - (1 - params.confidence) / 2, n - 1))
            half = spread / math.sqrt(n) * quantile
            conf_lo, conf_up = score - half, score + half
        assessments[user] = UserAssessment(user, score, n, conf_lo, conf_up)

    # Lines 21-24: users scoring below τ − bound_score become key users.
    new_key_users = {u for u, a in assessments.items() if a.score < tau - params.bound_score}
    # Lines 25-29: a key user who stays a key user with a narrow interval is a violator.
    violators = set()
    for user in sorted(new_key_users):
        a = assessments[user]
        if (
            user in key_users
            and a.conf_lo is not None
            and a.conf_up is not None
            and a.conf_up - a.conf_lo < params.bound_conf
        ):
            violators.add(user)
    return DetectionResult(
        tau, assessments, frozenset(new_key_users - violators), frozenset(violators)
    )


def _group_scorer(
    grouping: Grouping,
    accuracies: Mapping[int, float],
    bar: float,
    params: DetectionParams,
    update_norms: Mapping[int, float] | None,
) -> Callable[[int], float]:
    """score_g of line 11: 1 if the group beats τ (and, optionally, moved the model)."""
    if params.norm_tolerance is None:
        return lambda gid: 1.0 if accuracies[gid] > bar else 0.0
    if update_norms is None or any(g.gid not in update_norms for g in grouping.groups):
        raise DetectionError("norm_tolerance needs the update norm of every group")
    norms = update_norms
    # The mean of more updates moves the model less, so a group is held to the basic
    # groups of its own size where there are any.
    size = {g.gid: len(g.members) for g in grouping.groups}
    floor: dict[int, float] = {}
    for k in set(size.values()):
        same = [norms[g.gid] for g in grouping.basic if len(g.members) == k]
        pool = same or [norms[g.gid] for g in grouping.basic]
        floor[k] = (1 - params.norm_tolerance) * float(np.percentile(pool, 75))
    return lambda gid: 1.0 if accuracies[gid] > bar and norms[gid] >= floor[size[gid]] else 0.0
