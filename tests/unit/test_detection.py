"""Algorithm 6 against cases computed by hand."""

import math
import statistics
from dataclasses import replace

import numpy as np
import pytest

from fairbus import detection as detection_module
from fairbus.detection import (
    CLASS_LEAD_ROUNDS,
    CONVICT_NOISE,
    CONVICT_ROUNDS,
    CONVICT_TAU,
    CONVICT_TYPICAL_NOISE,
    RANK_SLACK,
    ClassCounts,
    DetectionParams,
    DetectionResult,
    RoundContributions,
    accuracy_bar,
    at_plateau,
    class_leaders,
    clean_level,
    contributions_along,
    convict_bar,
    detect,
    fit_contributions,
    fit_convicted,
    group_contributions,
    leading_basic,
    needs_anchor,
    ranked_basic,
    sharp_fit,
    suspects,
    typical_noise,
    weight_bounds,
    yardstick,
)
from fairbus.errors import DetectionError
from fairbus.grouping import BASIC, FOCUS, Group, Grouping
from fairbus.protocol.provider import TrustRecord

GROUPS = (
    Group(0, BASIC, (1, 2, 3)),
    Group(1, BASIC, (4, 5, 6)),
    Group(2, BASIC, (1, 4, 5)),
    Group(3, BASIC, (2, 3, 6)),
    Group(4, FOCUS, (1, 5, 6), focus=1),
    Group(5, FOCUS, (1, 2, 4), focus=1),
)
GROUPING = Grouping(GROUPS, frozenset({1}), key_repeats=2, basic_groupings=2)
PARAMS = DetectionParams(bound_score=0.3, bound_conf=0.5)


def test_key_user_failing_every_group_is_a_violator() -> None:
    acc = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: 0.3}
    result = detect(GROUPING, acc, PARAMS)
    assert result.tau == pytest.approx(0.7)  # lines 5-8: basic groups only
    scores = {u: a.score for u, a in result.assessments.items()}
    assert scores == {1: 0.0, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5, 6: 1.0}
    a1 = result.assessments[1]
    assert a1.active_groups == 4 and (a1.conf_lo, a1.conf_up) == (0.0, 0.0)
    assert result.assessments[2].conf_lo is None  # intervals only for key users
    assert result.violators == {1}
    assert result.new_key_users == frozenset()  # line 28: moved out of NKI


def test_key_user_with_a_wide_interval_stays_a_key_user() -> None:
    acc = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: 0.75}
    result = detect(GROUPING, acc, PARAMS)
    a1 = result.assessments[1]
    assert a1.score == 0.25
    spread = math.sqrt((3 * 0.25**2 + 0.75**2) / 4)
    half = spread / 2 * 3.182446305284263  # t_0.975 with 3 degrees of freedom
    assert a1.conf_lo == pytest.approx(0.25 - half)
    assert a1.conf_up == pytest.approx(0.25 + half)
    assert result.violators == frozenset()
    assert result.new_key_users == {1}


def test_new_key_users_need_a_low_score_and_are_not_violators_yet() -> None:
    plain = Grouping(GROUPS[:4], frozenset(), 0, 2)
    acc = {0: 0.1, 1: 0.9, 2: 0.2, 3: 0.8}  # τ = 0.5; threshold 0.2
    result = detect(plain, acc, PARAMS)
    assert result.assessments[1].score == 0.0
    assert result.new_key_users == {1}  # scores below τ − bound_score
    assert result.violators == frozenset()  # not a key user before this round


def test_no_key_users_while_tau_is_below_bound_score() -> None:
    acc = {0: 0.1, 1: 0.2, 2: 0.1, 3: 0.2, 4: 0.1, 5: 0.1}
    result = detect(GROUPING, acc, DetectionParams(bound_score=0.5))
    assert result.new_key_users == frozenset() and result.violators == frozenset()


def test_deterministic_and_pure() -> None:
    acc = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: 0.3}
    assert detect(GROUPING, acc, PARAMS) == detect(GROUPING, dict(acc), PARAMS)
    assert acc == {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: 0.3}


def test_bad_inputs() -> None:
    with pytest.raises(DetectionError, match=r"no accuracy for groups \[5\]"):
        detect(GROUPING, {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4}, PARAMS)
    with pytest.raises(DetectionError, match="must be in"):
        detect(GROUPING, {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: float("nan")}, PARAMS)
    with pytest.raises(DetectionError):
        DetectionParams(confidence=1.5)


def test_contribution_test_catches_a_group_that_barely_moved_the_model() -> None:
    plain = Grouping(GROUPS[:4], frozenset({3}), 0, 2)
    acc = {0: 0.9, 1: 0.9, 2: 0.9, 3: 0.9}  # accuracy cannot tell: nobody beats τ − 0
    contributions = {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.5}  # group 3 (users 2, 3, 6) moved half as far
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.01, contribution_tolerance=0.2
    )
    result = detect(plain, acc, params, contributions)
    # floor: 0.8 times the largest contribution, 1.0
    scores = {u: a.score for u, a in result.assessments.items()}
    assert scores == {1: 1.0, 2: 0.5, 3: 0.5, 4: 1.0, 5: 1.0, 6: 0.5}
    contributions[0] = 0.5  # now users 2 and 3 sit in two slow groups
    result = detect(plain, acc, params, contributions)
    assert result.assessments[3].score == 0.0
    assert result.violators == {3}  # key user with a zero-width interval
    assert result.new_key_users == {1, 2, 6}  # scores 0.5, 0, 0.5 are below τ − 0.3
    with pytest.raises(DetectionError, match="contribution of every group"):
        detect(plain, acc, params)
    with pytest.raises(DetectionError, match="finite"):
        detect(plain, acc, params, {**contributions, 3: float("inf")})
    with pytest.raises(DetectionError):
        DetectionParams(contribution_tolerance=1.5)


def test_contributions_project_on_the_median_of_basic_updates() -> None:
    honest = np.array([3.0, 4.0])  # every honest user's update; |honest| = 5
    updates = {
        0: honest,  # clean
        1: honest * 2 / 3,  # one free-rider in three
        2: honest * 1 / 3,  # one poisoner (scale 1) in three
        3: -honest / 3,  # two poisoners in three
        4: honest + np.array([4.0, -3.0]),  # noise orthogonal to the honest direction
    }
    got = group_contributions(updates, basic=[0, 1, 2])  # median: 2/3 of honest
    assert got == pytest.approx({0: 5.0, 1: 10 / 3, 2: 5 / 3, 3: -5 / 3, 4: 5.0})
    assert group_contributions({0: np.zeros(2)}, [0]) == {0: 0.0}
    with pytest.raises(DetectionError):
        group_contributions(updates, [])


def test_noise_leaks_into_the_median_but_not_into_the_last_step() -> None:
    """Two disguised free-riders (8 and 9) upload noise ten times the honest step per
    weight, orthogonal to it. The median of the basic groups' updates leans towards that
    noise, and their groups read 1.6-2.2 times a clean group; along the global model's
    last step they read what they moved the model by: 2/3 and 1/3 (issue 13)."""
    j = np.arange(600, dtype=np.float64)
    step = 0.001 * (1.0 + 0.5 * np.sin(j))  # every honest user's update, and the last step
    noise = {8: 0.01 * np.sin(j * 12.9898 + 1.3), 9: 0.01 * np.cos(j * 78.233 + 0.7)}
    for n in noise.values():
        n -= (n @ step) / (step @ step) * step
    user = {u: noise.get(u, step) for u in range(1, 10)}
    groups = {0: (1, 2, 3), 1: (4, 5, 6), 2: (7, 8, 9), 3: (1, 4, 7), 4: (2, 5, 8), 5: (3, 6, 9)}
    updates = {g: sum(user[u] for u in members) / 3 for g, members in groups.items()}
    median = group_contributions(updates, list(groups))
    along = group_contributions(updates, list(groups), step)
    assert all(median[g] / median[0] > 1.6 for g in (2, 4, 5))
    expected = {0: 1.0, 1: 1.0, 2: 1 / 3, 3: 1.0, 4: 2 / 3, 5: 2 / 3}
    assert {g: c / along[0] for g, c in along.items()} == pytest.approx(expected, abs=1e-9)
    # a step that did not move the model says nothing: the median is used
    assert group_contributions(updates, list(groups), np.zeros(600)) == median
    with pytest.raises(DetectionError, match="last step has 5 values"):
        group_contributions(updates, list(groups), np.ones(5))


def test_the_accurate_median_leaves_out_basic_groups_that_fail_the_accuracy_bar() -> None:
    """Two poisoners in a basic group of three upload a large step across the honest
    one; with two basic groups the median is their mean, and it leans so far that the
    poisoners' group reads above the clean one. ``accurate_median`` takes the median over
    the basic groups that beat Alg. 6's accuracy bar only, and the clean group is then
    the level and the poisoners' group moves nothing along it (issue 13)."""
    honest = np.array([3.0, 4.0])  # |honest| = 5
    updates = {0: honest, 1: np.array([-8.0, 6.0]), 2: honest * 2 / 3}
    accuracies = {0: 0.8, 1: 0.2, 2: 0.75}
    # τ = 0.5 over groups 0 and 1: bar 0.45
    params = DetectionParams(tolerance=0.05, contribution_direction="accurate_median")
    median = group_contributions(updates, [0, 1])
    assert median[1] > median[0]
    got = contributions_along(params, updates, [0, 1], accuracies)
    assert got == pytest.approx({0: 5.0, 1: 0.0, 2: 10 / 3})
    # the order the basic groups come in does not change which beat the bar
    assert contributions_along(params, updates, [1, 0], accuracies) == got
    # where no basic group beats the bar, every one sets the direction, as the median
    even = {0: 0.5, 1: 0.5, 2: 0.5}
    assert contributions_along(replace(params, tolerance=0.0), updates, [0, 1], even) == median
    with pytest.raises(DetectionError, match=r"no accuracy for basic groups \[1\]"):
        contributions_along(params, updates, [0, 1], {0: 0.8})


def test_the_leading_median_leaves_out_basic_groups_below_the_bar_without_its_loosening() -> None:
    """Issue 13, label flippers: a group holding one classifies at 0.45-0.57 where a
    clean group reaches 0.92, so τ falls to 0.62 and the accuracy bar, loosened by the
    error left (``relative_tolerance``), to 0.51: two flippers' groups beat it, and
    along the median they help set a flipper's group reads 0.83 of a clean one.
    ``leading_median`` takes the median over the basic groups above τ − ``tolerance``
    only (0.57), and a group with one flipper of three reads 2/3 of a clean one, what it
    moves the model forward."""
    clean, flipped = np.array([3.0, 4.0]), np.array([4.0, -3.0])  # flipped ⟂ clean
    one_of_three = (2 * clean + flipped) / 3
    updates = {0: clean, 1: one_of_three, 2: one_of_three * 1.05, 3: (clean + flipped) / 2}
    accuracies = {0: 0.92, 1: 0.57, 2: 0.55, 3: 0.45}  # τ 0.6225
    basic = [0, 1, 2, 3]
    loose = DetectionParams(tolerance=0.05, relative_tolerance=0.3)
    bar = accuracy_bar(loose, 0.6225)
    assert [g for g in basic if accuracies[g] > bar] == [0, 1, 2]
    accurate = contributions_along(replace(loose, contribution_direction="accurate_median"),
                                   updates, basic, accuracies)  # fmt: skip
    assert accurate[1] / accurate[0] == pytest.approx(0.825, abs=1e-3)
    leading = replace(loose, contribution_direction="leading_median")
    got = contributions_along(leading, updates, basic, accuracies)
    assert leading_basic(basic, accuracies, leading) == [0]
    assert got == pytest.approx({0: 5.0, 1: 10 / 3, 2: 3.5, 3: 2.5})
    # a group within the tolerance below τ leads too
    assert leading_basic(basic, {**accuracies, 1: 0.6}, leading) == [0, 1]  # τ 0.63
    # the order the basic groups come in does not change which lead
    assert contributions_along(leading, updates, basic[::-1], accuracies) == got
    # none above the bar (τ − tolerance is above them all only if tolerance < 0, which
    # DetectionParams refuses; here every one is within it): the median of them all
    even = dict.fromkeys(basic, 0.1)
    assert leading_basic(basic, even, leading) == basic
    assert contributions_along(leading, updates, basic, even) == group_contributions(updates, basic)
    assert leading_basic(basic, even, replace(leading, tolerance=0.0)) == basic
    with pytest.raises(DetectionError, match=r"no accuracy for basic groups \[3\]"):
        contributions_along(leading, updates, basic, {0: 0.8, 1: 0.8, 2: 0.8})


def test_near_chance_the_median_is_over_groups_ranking_no_worse_than_the_global_model() -> None:
    """Poisoners hold the model at chance: every basic group beats the (loose) accuracy
    bar, and three of five basic groups hold poisoners, so the median of all of them is
    theirs. While τ is below ``rank_below`` the median is taken over the basic groups
    whose true class's mean rank is at most the global model's (the anchor) plus
    ``RANK_SLACK``: a poisoner's group falls behind the model it started from (issue 13)."""
    honest, backwards = np.array([3.0, 4.0]), np.array([-3.0, -4.0])
    updates = {
        0: honest,
        1: honest * 0.9,
        2: backwards,
        3: backwards * 1.2,
        4: backwards * 0.8,
        5: honest * 2 / 3,  # a focus group: measured, never part of the direction
    }
    accuracies = {0: 0.12, 1: 0.11, 2: 0.10, 3: 0.10, 4: 0.11, 5: 0.12}  # bar below 0
    ranks: dict[int, float | None] = {0: 3.0, 1: 3.2, 2: 4.4, 3: 4.5, 4: 4.6, 5: 3.5}
    basic = [0, 1, 2, 3, 4]
    params = DetectionParams(tolerance=0.05, contribution_direction="accurate_median")
    by_accuracy = contributions_along(params, updates, basic, accuracies, None, ranks, 4.35)
    assert by_accuracy[0] == pytest.approx(-5.0)  # along the poisoners' median, backwards
    ranked = replace(params, rank_below=0.35)
    assert needs_anchor(ranked, basic, accuracies) and not needs_anchor(params, basic, accuracies)
    got = contributions_along(ranked, updates, basic, accuracies, None, ranks, 4.35)
    expected = {0: 5.0, 1: 4.5, 2: -5.0, 3: -6.0, 4: -4.0, 5: 10 / 3}  # along honest · 0.9
    assert got == pytest.approx(expected)
    assert ranked_basic(basic, accuracies, ranked, ranks, 4.35) == [0, 1, 2]
    # fewer than half of the basic groups as good as the global model: it says nothing
    assert ranked_basic(basic, accuracies, ranked, ranks, 4.4 - 2 * RANK_SLACK) is None
    assert ranked_basic(basic[:4], accuracies, ranked, ranks, 4.4 - 2 * RANK_SLACK) == [0, 1]
    assert ranked_basic(basic[::-1], accuracies, ranked, ranks, 4.35) == [2, 1, 0]
    assert contributions_along(ranked, updates, basic[::-1], accuracies, None, ranks, 4.35) == got
    # no basic group as good as the global model, no anchor, a basic group without a
    # rank, or τ at rank_below: the accuracy bar's groups, as without it
    assert ranked_basic(basic, accuracies, ranked, ranks, 2.0) is None
    assert ranked_basic(basic, accuracies, ranked, ranks, None) is None
    assert ranked_basic(basic, accuracies, ranked, {**ranks, 2: None}, 4.35) is None
    assert ranked_basic(basic, accuracies, ranked, {0: 3.0, 1: 3.2}, 4.35) is None
    learnt = {**accuracies, 0: 0.9, 1: 0.9}  # τ 0.424
    assert not needs_anchor(ranked, basic, learnt)
    assert ranked_basic(basic, learnt, ranked, ranks, 4.35) is None
    assert contributions_along(ranked, updates, basic, accuracies, None, ranks, 2.0) == by_accuracy
    with pytest.raises(DetectionError, match="rank_below must be in"):
        DetectionParams(rank_below=1.5)


def test_contributions_along_the_feature_layers_ignore_the_classifier() -> None:
    """Issue 13, users holding two or three classes: every group moves the feature
    layers (the first 2 values) alike, but the classifier (the last 3) only for its own
    classes; most groups hold classes 0 and 1, one group classes 2 and 3. Along every
    layer the median is the majority's classifier rows and the minority group reads
    0.27 of the others; along the features it reads the same."""
    features = np.array([3.0, 4.0])
    majority = np.concatenate([features, [6.0, 0.0, 0.0]])
    minority = np.concatenate([features, [0.0, 6.0, 6.0]])
    updates = {0: majority, 1: majority, 2: minority, 3: np.zeros(5)}  # 3: a free-rider's
    basic = [0, 1, 2]
    along_all = contributions_along(DetectionParams(), updates, basic, {}, features=2)
    assert along_all[2] / along_all[0] == pytest.approx(25 / 61)
    params = DetectionParams(contribution_layers="features")
    got = contributions_along(params, updates, basic, {}, features=2)
    assert got == pytest.approx({0: 5.0, 1: 5.0, 2: 5.0, 3: 0.0})
    # a model without a known split counts every value, as "all" does
    assert contributions_along(params, updates, basic, {}, features=None) == along_all
    with pytest.raises(DetectionError, match="feature values"):
        contributions_along(params, updates, basic, {}, features=6)


def test_an_unknown_contribution_layers_is_refused() -> None:
    with pytest.raises(DetectionError, match="contribution_layers must be one of"):
        DetectionParams(contribution_layers="classifier")


def test_an_unknown_contribution_direction_is_refused() -> None:
    with pytest.raises(DetectionError, match="contribution_direction must be one of"):
        DetectionParams(contribution_direction="mean")


def test_key_score_replaces_tau_minus_bound_score_once_tau_reaches_it() -> None:
    acc = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: 0.3}  # τ = 0.7
    as_written = detect(GROUPING, acc, PARAMS)  # key bar τ − 0.3 = 0.4
    assert {2, 3, 4, 5} <= {u for u, a in as_written.assessments.items() if a.score == 0.5}
    assert as_written.new_key_users == frozenset()
    params = DetectionParams(bound_score=0.3, bound_conf=0.5, key_score=0.6)
    assert detect(GROUPING, acc, params).new_key_users == {2, 3, 4, 5}  # 0.5 < 0.6
    low = {0: 0.1, 1: 0.2, 2: 0.1, 3: 0.2, 4: 0.1, 5: 0.1}  # τ = 0.15 < bound_score
    result = detect(GROUPING, low, params)
    assert result.assessments[1].score == 0.0
    assert result.new_key_users == frozenset() and result.violators == frozenset()


def test_carried_evidence_counts_focus_groups_across_rounds() -> None:
    acc = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: 0.3}  # user 1 fails its 2 focus groups
    params = DetectionParams(bound_score=0.3, bound_conf=0.5, carry_evidence=True, min_evidence=3)
    first = detect(GROUPING, acc, params)
    assert first.assessments[1].active_groups == 2  # focus groups only, not enough yet
    assert first.violators == frozenset() and first.evidence == {1: (0.0, 0.0)}
    second = detect(GROUPING, acc, params, carried=first.evidence)
    assert second.assessments[1].active_groups == 4
    assert second.violators == {1}
    # a key user whose focus groups pass keeps a wide interval
    passing = {**acc, 4: 0.95}
    third = detect(GROUPING, passing, params, carried={1: (0.0, 0.0)})
    assert third.violators == frozenset()


def test_key_evidence_only_drops_the_evidence_of_a_user_who_stops_being_a_key_user() -> None:
    # user 1 fails its two focus groups, but its score (1 of 4 groups) stays above the
    # key bar: it stops being a key user, and with key_evidence_only its failures go
    acc = {0: 0.9, 1: 0.9, 2: 0.9, 3: 0.2, 4: 0.4, 5: 0.3}  # τ = 0.725
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, carry_evidence=True, min_evidence=3, key_score=0.2
    )
    kept = detect(GROUPING, acc, params, carried={1: (0.0,), 9: (0.0, 0.0)})
    assert 1 not in kept.new_key_users
    assert kept.evidence[1] == (0.0, 0.0, 0.0) and kept.evidence[9] == (0.0, 0.0)
    dropped = detect(
        GROUPING, acc, replace(params, key_evidence_only=True), carried={1: (0.0,), 9: (0.0, 0.0)}
    )
    assert 1 not in dropped.evidence  # no longer a key user
    assert dropped.evidence[9] == (0.0, 0.0)  # not in this round: carried as before
    # a user who stays a key user keeps its evidence either way
    failing = {**acc, 2: 0.2}  # score 1 of 5 < 0.3; three scores are short of min_evidence 4
    strict = replace(params, key_score=0.3, min_evidence=4, key_evidence_only=True)
    stays = detect(GROUPING, failing, strict, carried={1: (0.0,)})
    assert 1 in stays.new_key_users and stays.evidence[1] == (0.0, 0.0, 0.0)


# --- extensions: the fitted clean level, the evidence window, a key user's pooled score ----


def _contributions(
    groups: tuple[tuple[int, ...], ...], weights: dict[int, float], level: float
) -> RoundContributions:
    """Contributions exactly as the model of fit_contributions says (L · mean θ), and
    accuracies that grow with mean θ."""
    means = [sum(weights[u] for u in g) / len(g) for g in groups]
    return RoundContributions(
        groups, tuple(level * m for m in means), tuple(0.5 + 0.1 * m for m in means)
    )


THETA = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.0, 6: -1.0}  # 5 free-rides, 6 poisons
ROUND_A = ((1, 2, 3), (4, 5, 6), (1, 4, 5), (2, 3, 6), (1, 2, 5), (3, 4, 6))
ROUND_B = ((1, 5, 6), (2, 3, 4), (1, 3, 5), (2, 4, 6), (1, 2, 6), (3, 4, 5))


def test_fit_recovers_levels_and_weights_of_an_exact_system() -> None:
    rounds = [_contributions(ROUND_A, THETA, 2.0), _contributions(ROUND_B, THETA, 3.0)]
    fit = fit_contributions(rounds)
    assert fit is not None
    assert fit.levels == pytest.approx((2.0, 3.0), abs=1e-9)
    assert fit.weights == pytest.approx(THETA, abs=1e-9)
    assert clean_level(rounds) == pytest.approx(3.0, abs=1e-9)


def test_fitted_level_sees_through_a_round_where_every_group_holds_the_free_rider() -> None:
    # Round 2: users 1-4 honest, 5 free-rides, and every group has 5 in it; each group's
    # contribution is then 2/3 of a clean group's (level 3), so the largest one is 2.
    theta = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.0}
    first = _contributions(((1, 2, 3), (1, 4, 5), (2, 3, 5), (2, 4, 5), (1, 3, 4)), theta, 3.0)
    groups = (Group(0, BASIC, (1, 2, 5)), Group(1, BASIC, (3, 4, 5)))
    grouping = Grouping(groups, frozenset(), 0, 1)
    contributions = {0: 2.0, 1: 2.0}
    acc = {0: 0.9, 1: 0.9}
    as_before = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2
    )
    assert detect(grouping, acc, as_before, contributions).group_scores == {0: 1.0, 1: 1.0}
    fitted = replace(as_before, level_rounds=2)
    result = detect(grouping, acc, fitted, contributions, history=(first,))
    assert result.group_scores == {0: 0.0, 1: 0.0}  # 2 < 0.8 · 3
    assert len(result.history) == 1 and result.history[0].contributions == (2.0, 2.0)


def test_fit_has_nothing_to_stand_on_without_a_positive_contribution() -> None:
    assert clean_level([RoundContributions(((1, 2, 3),), (-1.0,), (0.5,))]) is None
    assert clean_level([]) is None


@pytest.mark.parametrize(
    ("groups", "contributions", "accuracies", "problem"),
    [
        (((1, 2, 3),), (1.0, 2.0), (0.5,), "one contribution and one accuracy"),
        (((1, 2, 3),), (1.0,), (0.5, 0.5), "one contribution and one accuracy"),
        (((1, 1, 2),), (1.0,), (0.5,), "distinct members"),
        (((),), (1.0,), (0.5,), "distinct members"),
        (((1, 2, 3),), (math.nan,), (0.5,), "finite"),
        (((1, 2, 3),), (1.0,), (1.5,), r"\[0, 1\]"),
        (((1, 2, 3),), (True,), (0.5,), "finite numbers"),
        (((1, 2, 3),), ("1",), (0.5,), "finite numbers"),
        (("abc",), (1.0,), (0.5,), "tuple of user ids"),
        (((1, 2.0, 3),), (1.0,), (0.5,), "tuple of user ids"),
        ((), (), (), "at least one group"),
    ],
)
def test_round_contributions_refuse_bad_input(
    groups: tuple[tuple[int, ...], ...],
    contributions: tuple[float, ...],
    accuracies: tuple[float, ...],
    problem: str,
) -> None:
    with pytest.raises(DetectionError, match=problem):
        RoundContributions(groups, contributions, accuracies)


def test_fit_finds_forward_from_accuracy_when_the_median_pointed_backwards() -> None:
    # two honest, two free-riders, two poisoners: both signs fit the contributions
    # equally well; the median of the basic updates followed the poisoners (level < 0)
    # and the groups with more honest users are the more accurate ones
    theta = {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: -1.0, 6: -1.0}
    rounds = [_contributions(ROUND_B, theta, -3.0), _contributions(ROUND_A, theta, -2.0)]
    fit = fit_contributions(rounds)
    assert fit is not None
    assert fit.weights == pytest.approx(theta, abs=1e-9)
    assert fit.levels == pytest.approx((-3.0, -2.0), abs=1e-9)
    # a group then scores by its contribution over that negative level
    grouping = Grouping(tuple(Group(k, BASIC, m) for k, m in enumerate(ROUND_A)), frozenset(), 0, 1)
    last = rounds[1]
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.5, contribution_tolerance=0.4, level_rounds=2
    )
    result = detect(
        grouping,
        dict(enumerate(last.accuracies)),
        params,
        dict(enumerate(last.contributions)),
        history=rounds[:1],
    )
    assert result.level == pytest.approx(-2.0)
    # ROUND_A's mean θ: (1,2,3) 2/3, (4,5,6) -2/3, then 0, 0, 1/3, -1/3; 2/3 ≥ 1 - 0.4
    assert result.group_scores == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"level_rounds": 0}, "level_rounds must be >= 1"),
        ({"level_rounds": 2.5}, "whole number"),
        ({"min_evidence": 4.0}, "whole number"),
        ({"evidence_window": 3, "min_evidence": 4, "carry_evidence": True}, "evidence_window"),
        ({"evidence_window": True}, "whole number"),
    ],
)
def test_extension_parameters_are_checked(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(DetectionError, match=problem):
        DetectionParams(**changes)  # type: ignore[arg-type]


def test_evidence_window_keeps_the_last_focus_scores() -> None:
    acc = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.4, 5: 0.3}  # user 1 fails its 2 focus groups
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, carry_evidence=True, min_evidence=3, evidence_window=3
    )
    # a lucky early score two rounds back drops out of the window: violator
    result = detect(GROUPING, acc, params, carried={1: (1.0, 0.0)})
    assert result.assessments[1].active_groups == 3  # (1, 0, 0, 0) cut to (0, 0, 0)
    assert result.violators == {1} and 1 not in result.evidence
    without = detect(GROUPING, acc, replace(params, evidence_window=None), carried={1: (1.0, 0.0)})
    assert without.violators == frozenset()  # (1, 0, 0, 0): interval too wide


def test_key_users_score_counts_its_carried_focus_groups() -> None:
    # User 1's basic groups both beat τ this round, its focus groups failed before and now.
    acc = {0: 0.9, 1: 0.5, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.3}
    params = DetectionParams(bound_score=0.3, bound_conf=0.5, carry_evidence=True, min_evidence=3)
    carried = {1: (0.0, 0.0, 0.0, 0.0)}
    result = detect(GROUPING, acc, params, carried=carried)
    # as written its score would be 2/4 (two basic groups of four active ones); pooled
    # with the carried focus groups it is 2/8, below τ − bound_score = 0.7 − 0.3
    assert result.assessments[1].score == pytest.approx(2 / 8)
    assert 1 in result.violators
    as_written = detect(GROUPING, acc, replace(params, carry_evidence=False))
    assert as_written.assessments[1].score == pytest.approx(2 / 4)


def test_provider_trusts_users_by_their_fitted_weight() -> None:
    rounds = (_contributions(ROUND_A, THETA, 2.0), _contributions(ROUND_B, THETA, 3.0))
    groups = tuple(Group(k, BASIC, m) for k, m in enumerate(ROUND_B))
    result = DetectionResult(
        0.9,
        {},
        frozenset(),
        frozenset(),
        group_scores=dict.fromkeys(range(6), 1.0),
        history=rounds,
    )
    record = TrustRecord()
    assert record.most_trusted([1, 5, 6]) == [1, 5, 6]  # no record yet: all alike
    record.add(Grouping(groups, frozenset(), 0, 1), result)
    # every group scored, but the fit says 5 free-rides and 6 poisons
    assert sorted(record.most_trusted([1, 2, 3, 4, 5, 6])) == [1, 2, 3, 4]
    assert record.most_trusted([1, 5, 6]) == [1, 5, 6]  # at least three, best first


def test_a_fit_that_overflows_falls_back_to_the_largest_contribution() -> None:
    # A provider's Evaluation may carry any finite float; the ledger re-derives with it.
    groups = tuple(Group(k, BASIC, m) for k, m in enumerate(ROUND_A))
    grouping = Grouping(groups, frozenset(), 0, 1)
    params = DetectionParams(contribution_tolerance=0.2, level_rounds=8)
    huge = {k: (1e308 if k % 2 else -1e308) for k in range(6)}
    result = detect(grouping, dict.fromkeys(range(6), 0.5), params, huge)
    assert result.level == 1e308
    with pytest.raises(DetectionError, match="iterations"):
        fit_contributions([_contributions(ROUND_A, THETA, 2.0)], iterations=0)


def test_equal_accuracies_do_not_turn_the_fit_round() -> None:
    # Nothing to orient by: the fit keeps the orientation least squares found, whatever
    # the rounding noise in the alignment (which may differ between machines).
    rounds = [_contributions(ROUND_A, THETA, 2.0), _contributions(ROUND_B, THETA, 3.0)]
    flat = [replace(r, accuracies=(0.1,) * len(r.groups)) for r in rounds]
    fitted, flat_fit = fit_contributions(rounds), fit_contributions(flat)
    assert fitted is not None and flat_fit is not None
    assert flat_fit.levels == pytest.approx(fitted.levels)


def test_a_lone_basic_group_says_nothing_about_its_members() -> None:
    """Where the grouping has room for focus groups only with one basic group of all
    users, that group is τ itself: it counts for no one's score_i; the focus groups decide."""
    groups = (Group(0, BASIC, (1, 2, 3, 4, 5, 6)), Group(1, FOCUS, (1, 5, 6), focus=1))
    grouping = Grouping(groups, frozenset({1}), key_repeats=1, basic_groupings=1)
    params = DetectionParams(carry_evidence=True, min_evidence=2)
    result = detect(grouping, {0: 0.9, 1: 0.5}, params, carried={1: (0.0,)})
    assert result.assessments[1].score == 0.0  # its focus groups, now and carried
    assert all(result.assessments[u].score == 1.0 for u in (2, 3, 4, 5, 6))
    assert result.violators == {1}


def test_a_fit_of_honest_users_is_not_turned_round_by_noise_in_the_alignment() -> None:
    # Everyone honest (θ = 1): the groups' accuracies differ by noise only, here against
    # the fitted weights. Turning the fit round would leave no positive upper median; it
    # used to return None, so the round's largest contribution became the yardstick and
    # an ordinary honest group fell short of it (issue 13: 21 of 50 rounds of a run).
    theta = dict.fromkeys(range(1, 7), 1.0) | {6: 0.9}
    rounds = [_contributions(ROUND_A, theta, 2.0), _contributions(ROUND_B, theta, 3.0)]
    against = [replace(r, accuracies=tuple(0.1 + 0.1 * (6 in m) for m in r.groups)) for r in rounds]
    fit = fit_contributions(against)
    assert fit is not None
    assert fit.weights == pytest.approx(theta, abs=1e-9)
    assert clean_level(against) == pytest.approx(3.0, abs=1e-9)


def test_relative_tolerance_follows_the_error_left() -> None:
    acc = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.8, 4: 0.62, 5: 0.3}  # τ = 0.7
    strict = replace(PARAMS, tolerance=0.05)
    assert detect(GROUPING, acc, strict).group_scores[4] == 0.0  # 0.62 ≤ 0.65
    relative = replace(strict, relative_tolerance=0.5)  # τ − max(0.05, 0.5 · 0.3) = 0.55
    result = detect(GROUPING, acc, relative)
    assert result.group_scores[4] == 1.0 and result.group_scores[5] == 0.0
    # near convergence the fixed tolerance is the larger: τ = 0.95, bar 0.9
    high = {0: 0.95, 1: 0.95, 2: 0.95, 3: 0.95, 4: 0.91, 5: 0.89}
    same = detect(GROUPING, high, strict).group_scores
    assert detect(GROUPING, high, relative).group_scores == same
    with pytest.raises(DetectionError, match="relative_tolerance"):
        DetectionParams(relative_tolerance=1.5)


def test_weight_floor_excuses_a_short_contribution_of_a_user_the_fit_trusts() -> None:
    # Round 1 fits θ: 1-4 honest, 5 free-rides, 6 poisons. In round 2 the focus groups of
    # user 1 (honest) and user 5 both fall short of 0.8 of the level (2.0) by contribution.
    first = _contributions(ROUND_A, THETA, 2.0)
    groups = (
        *(Group(k, BASIC, m) for k, m in enumerate(ROUND_B[:4])),
        Group(4, FOCUS, (1, 2, 3), focus=1),
        Group(5, FOCUS, (2, 4, 5), focus=5),
    )
    grouping = Grouping(groups, frozenset({1, 5}), key_repeats=1, basic_groupings=1)
    theta_mean = [sum(THETA[u] for u in g.members) / 3 for g in groups]
    contributions = {g.gid: 2.0 * t for g, t in zip(groups, theta_mean, strict=True)}
    contributions[4] = 1.2  # an honest group's short, noisy contribution
    acc = dict.fromkeys(range(6), 0.9)
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=2,
    )  # fmt: skip
    before = detect(grouping, acc, base, contributions, history=(first,))
    assert (before.group_scores[4], before.group_scores[5]) == (0.0, 0.0)
    floored = replace(base, weight_floor=0.5)
    after = detect(grouping, acc, floored, contributions, history=(first,))
    assert (after.group_scores[4], after.group_scores[5]) == (1.0, 0.0)  # θ_5 ≈ 0 < 0.5
    low = dict(acc) | {4: 0.5}  # the floor excuses contribution only, not accuracy
    assert detect(grouping, low, floored, contributions, history=(first,)).group_scores[4] == 0.0
    with pytest.raises(DetectionError, match="weight_floor"):
        DetectionParams(weight_floor=-0.1)


NINE_A = ((1, 2, 3), (4, 5, 6), (7, 8, 9), (1, 4, 7), (2, 5, 8), (3, 6, 9))
NINE_B = ((1, 5, 9), (2, 6, 7), (3, 4, 8), (1, 6, 8), (2, 4, 9), (3, 5, 7))


def test_fit_survives_strong_poisoners_that_turn_the_first_solve_round() -> None:
    # Seven honest users and two poisoners of three times the honest step (θ = -3); the
    # median of the basic updates followed the poisoners (level < 0), so the groups of
    # honest users have negative contributions and the poisoners' groups positive ones.
    # The fit starts from positive levels, its first solve puts the honest majority
    # below 0, and before issue 13's fix it gave up (no positive upper median): the
    # round's largest contribution, a poisoner's group, became the yardstick.
    theta = {u: 1.0 for u in range(1, 8)} | {8: -3.0, 9: -3.0}
    rounds = [_contributions(NINE_A, theta, -2.0), _contributions(NINE_B, theta, -1.5)]
    assert max(rounds[1].contributions) > 0 > min(rounds[1].contributions)
    fit = fit_contributions(rounds)
    assert fit is not None
    assert fit.weights == pytest.approx(theta, abs=1e-6)
    assert fit.levels == pytest.approx((-2.0, -1.5), abs=1e-6)
    assert clean_level(rounds) == pytest.approx(-1.5, abs=1e-6)


NINE_C = ((1, 2, 6), (3, 7, 9), (4, 5, 8), (1, 3, 8), (2, 5, 7), (4, 6, 9))


def test_noise_widening_lowers_the_contribution_bar_in_a_noisy_round() -> None:
    # Nine honest users; two earlier rounds fit the model exactly, and in the last one the
    # groups scatter around it (0.6 and 1.4 of the level in turn): the fixed bar (0.8)
    # convicts the short ones, a bar widened to a multiple of the fit's relative
    # residual in that round does not.
    honest = {u: 1.0 for u in range(1, 10)}
    history = (_contributions(NINE_A, honest, 2.0), _contributions(NINE_C, honest, 3.0))
    exact = _contributions(NINE_B, honest, 2.0)
    scatter = (0.6, 1.4) * 3
    pairs = zip(exact.contributions, scatter, strict=True)
    contributions = {k: c * m for k, (c, m) in enumerate(pairs)}
    noisy = RoundContributions(exact.groups, tuple(contributions.values()), exact.accuracies)
    fit = fit_contributions([*history, noisy])
    assert fit is not None and len(fit.noise) == 3
    sigma = fit.noise[-1]
    assert max(fit.noise[:2]) < 0.1 < sigma < 0.2
    grouping = Grouping(tuple(Group(k, BASIC, m) for k, m in enumerate(NINE_B)), frozenset(), 0, 1)
    acc = dict.fromkeys(range(6), 0.9)
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3,
    )  # fmt: skip
    before = detect(grouping, acc, base, contributions, history=history)
    assert before.level is not None
    short = [g for g in contributions if contributions[g] / before.level < 0.8]
    assert short == [0, 2, 4]
    assert all(before.group_scores[g] == 0.0 for g in short)
    ratios = [contributions[g] / before.level for g in short]
    assert 1 - 2.0 * sigma > max(ratios) and min(ratios) >= 1 - 5.0 * sigma
    for widening, expected in ((0.0, 0.0), (2.0, 0.0), (5.0, 1.0)):
        params = replace(base, noise_widening=widening)
        widened = detect(grouping, acc, params, contributions, history=history)
        assert [widened.group_scores[g] for g in short] == [expected] * 3
    with pytest.raises(DetectionError, match="noise_widening"):
        DetectionParams(noise_widening=-1.0)


def _noisy_third_round() -> tuple[tuple[RoundContributions, ...], dict[int, float], Grouping]:
    """Two rounds of nine honest users that the fit matches exactly, and a third (NINE_B,
    basic groups) whose groups read 0.6 and 1.4 of the level in turn: σ in (0.1, 0.2)."""
    honest = {u: 1.0 for u in range(1, 10)}
    history = (_contributions(NINE_A, honest, 2.0), _contributions(NINE_C, honest, 3.0))
    exact = _contributions(NINE_B, honest, 2.0)
    pairs = zip(exact.contributions, (0.6, 1.4) * 3, strict=True)
    contributions = {k: c * m for k, (c, m) in enumerate(pairs)}
    grouping = Grouping(tuple(Group(k, BASIC, m) for k, m in enumerate(NINE_B)), frozenset(), 0, 1)
    return history, contributions, grouping


def test_noise_ceiling_leaves_the_contribution_test_out_of_a_noisy_round() -> None:
    # The noisy round of the test above (σ between 0.1 and 0.2): a ceiling above σ keeps
    # the contribution test (the short groups fail), one below σ leaves it out (they
    # score on accuracy, and fail only where accuracy says so).
    history, contributions, grouping = _noisy_third_round()
    acc = {0: 0.9, 1: 0.9, 2: 0.9, 3: 0.9, 4: 0.5, 5: 0.9}
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3,
    )  # fmt: skip
    scores = {}
    for ceiling in (None, 0.2, 0.1):
        params = replace(base, noise_ceiling=ceiling)
        result = detect(grouping, acc, params, contributions, history=history)
        scores[ceiling] = [result.group_scores[g] for g in range(6)]
    assert scores[None] == scores[0.2] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert scores[0.1] == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]  # group 4 is below τ − 0.05
    with pytest.raises(DetectionError, match="noise_ceiling"):
        DetectionParams(noise_ceiling=11.0)


def test_the_widened_tolerance_is_capped_so_a_group_that_moved_backwards_never_scores() -> None:
    # The noisy round with group 0 pointing backwards (−0.1 of its share): widened to ten
    # times the residual, the bar falls below 0 and group 0 scores; capped at 1 the bar
    # is 0 and it does not, while the groups with a positive contribution still do.
    history, contributions, grouping = _noisy_third_round()
    contributions[0] = -0.1 * contributions[0]
    acc = dict.fromkeys(range(6), 0.9)
    widened = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3, noise_widening=10.0,
    )  # fmt: skip
    fit = fit_contributions((*history, _round_of(grouping, contributions, acc)))
    assert fit is not None and 10.0 * fit.noise[-1] > 1.0
    result = detect(grouping, acc, widened, contributions, history=history)
    assert result.level is not None and contributions[0] / result.level < 0
    assert result.group_scores[0] == 1.0
    capped = detect(
        grouping, acc, replace(widened, widening_cap=1.0), contributions, history=history
    )
    assert capped.group_scores == {0: 0.0} | {g: 1.0 for g in range(1, 6)}
    with pytest.raises(DetectionError, match="widening_cap"):
        DetectionParams(contribution_tolerance=0.2, widening_cap=0.1)


def test_at_a_plateau_only_a_round_with_a_sharp_fit_tests_contributions() -> None:
    # The noisy round above (σ between 0.1 and 0.2) at a contribution tolerance of 0.1:
    # the fit is loose. Every round of the window is at accuracy 0.6: the model has
    # stopped learning, and with plateau_gain the round tests accuracy alone.
    history, contributions, grouping = _noisy_third_round()
    acc = dict.fromkeys(range(6), 0.6) | {4: 0.5}
    assert {a for r in history for a in r.accuracies} == {0.6}
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.1,
        level_rounds=3,
    )  # fmt: skip
    window = (*history, _round_of(grouping, contributions, acc))
    fit = fit_contributions(window)
    assert fit is not None and 0.1 < fit.noise[-1] < 0.2

    def scores(params: DetectionParams, accuracies: dict[int, float] = acc) -> list[float]:
        result = detect(grouping, accuracies, params, contributions, history=history)
        return [result.group_scores[g] for g in range(6)]

    tested = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # the short groups fail on contribution
    assert scores(base) == tested
    plateau = replace(base, plateau_gain=0.05)  # the means span 0.6 − 0.583 = 0.017
    assert at_plateau(plateau, window, learnt=True)
    assert scores(plateau) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]  # group 4: accuracy
    # not where the means span more than the gain: the model still learns
    assert not at_plateau(replace(base, plateau_gain=0.01), window, learnt=True)
    assert scores(replace(base, plateau_gain=0.01)) == tested
    # not where the window is not full (4 rounds asked for, 3 held)
    assert scores(replace(plateau, level_rounds=4)) == tested
    # not before the model has learnt (τ below bound_score)
    assert not at_plateau(plateau, window, learnt=False)
    assert scores(replace(plateau, bound_score=0.6)) == tested  # τ = 0.583
    # at a plateau a sharp round still tests contributions: at tolerance 0.2, σ < 0.2
    sharp = replace(plateau, contribution_tolerance=0.2)
    assert scores(sharp) == scores(replace(base, contribution_tolerance=0.2)) == tested
    with pytest.raises(DetectionError, match="plateau_gain"):
        DetectionParams(plateau_gain=1.5)


def test_the_fit_does_not_depend_on_the_sign_lapack_gives_a_singular_vector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three poisoners, three free-riders, three honest users: θ and −θ both have a
    # positive upper median, so the start must not follow the sign the SVD happens to
    # return (it may differ between the provider's machine and a ledger node's).
    theta = {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.0, 7: -1.0, 8: -1.0, 9: -1.0}
    rounds = [_contributions(NINE_A, theta, 2.0), _contributions(NINE_B, theta, 1.5)]
    rounds[1] = RoundContributions(
        rounds[1].groups,
        tuple(c + 0.01 * k for k, c in enumerate(rounds[1].contributions)),
        rounds[1].accuracies,
    )
    as_given = fit_contributions(rounds, iterations=3)
    assert as_given is not None
    assert min(as_given.weights[u] for u in (1, 2, 3)) > max(as_given.weights[u] for u in (7, 8, 9))
    svd = np.linalg.svd

    def flipped(matrix: np.ndarray, full_matrices: bool = True) -> tuple[np.ndarray, ...]:
        u, s, vt = svd(matrix, full_matrices=full_matrices)
        return -u, s, -vt

    monkeypatch.setattr(np.linalg, "svd", flipped)
    detection_module._fit.cache_clear()  # the fit is kept per window
    assert fit_contributions(rounds, iterations=3) == as_given


def _suspect_round(
    weights: dict[int, float], key_users: frozenset[int] = frozenset()
) -> tuple[Grouping, dict[int, float], dict[int, float]]:
    """NINE_B as basic groups (and a focus group for user 5 where it is a key user), every
    group accurate, contributions exactly L · mean θ at L = 2."""
    groups = [Group(k, BASIC, m) for k, m in enumerate(NINE_B)]
    if key_users:
        groups.append(Group(6, FOCUS, (1, 2, 5), focus=5))
    contributions = {g.gid: 2.0 * sum(weights[u] for u in g.members) / 3 for g in groups}
    grouping = Grouping(tuple(groups), key_users, key_repeats=1, basic_groupings=1)
    return grouping, dict.fromkeys(contributions, 0.9), contributions


def test_suspect_weight_keeps_a_user_the_sharp_fit_weighs_low_among_the_key_users() -> None:
    # User 5 moves the model by 0.45 of an honest user: each of its groups reads
    # (2 + 0.45) / 3 ≈ 0.82 of a clean one, above the 0.8 bar, so its score is 1 and
    # line 21 never makes it a key user. The fit over three rounds sees θ_5 = 0.45.
    weights = {u: 1.0 for u in range(1, 10)} | {5: 0.45}
    history = (_contributions(NINE_A, weights, 2.0), _contributions(NINE_C, weights, 3.0))
    grouping, acc, contributions = _suspect_round(weights)
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3, key_score=0.3,
    )  # fmt: skip
    plain = detect(grouping, acc, base, contributions, history=history)
    assert plain.assessments[5].score == 1.0 and not plain.new_key_users
    suspecting = replace(base, suspect_weight=0.5)
    result = detect(grouping, acc, suspecting, contributions, history=history)
    assert result.new_key_users == {5} and not result.violators
    assert not detect(grouping, acc, replace(base, suspect_weight=0.4), contributions,
                      history=history).new_key_users  # fmt: skip
    this = _contributions(NINE_B, weights, 2.0)
    assert suspects(grouping, suspecting, (*history, this)) == {5}
    # one round alone has fewer groups (6) than unknowns (9 weights, 1 level): none
    assert not suspects(grouping, suspecting, (this,))
    # and only where this round's contributions sit closer to the fit than the bar
    scattered = RoundContributions(
        this.groups, (*this.contributions[:5], 0.2 * this.contributions[5]), this.accuracies
    )
    fit = fit_contributions((*history, scattered))
    assert fit is not None and 0.1 < fit.noise[-1] < 0.2 and fit.weights[5] < 0.5
    assert 5 in suspects(grouping, suspecting, (*history, scattered))
    stricter = replace(suspecting, contribution_tolerance=0.1)
    assert not suspects(grouping, stricter, (*history, scattered))
    # and in every round of the window: here an earlier round strays (one group turned)
    earlier = history[1]
    turned = RoundContributions(
        earlier.groups, (*earlier.contributions[:5], -earlier.contributions[5]), earlier.accuracies
    )
    fit = fit_contributions((history[0], turned, this))
    assert fit is not None and fit.noise[-1] < 0.2 < fit.noise[1] and fit.weights[5] < 0.5
    assert not suspects(grouping, suspecting, (history[0], turned, this))
    # A round that strays by a repeated group read once high, once low: θ stays exact.
    first, group, c = history[0], history[0].groups[0], history[0].contributions[0]
    strays = RoundContributions(
        (*first.groups, group), (1.5 * c, *first.contributions[1:], 0.5 * c), (0.6,) * 7
    )
    fit = fit_contributions((strays, history[1], this))
    assert fit is not None and fit.noise[0] > 0.2 and fit.weights[5] == pytest.approx(0.45)
    assert not suspects(grouping, suspecting, (strays, history[1], this))
    # It is not held against the fit where the model had not learnt (at chance, < 0.3).
    at_chance = RoundContributions(strays.groups, strays.contributions, (0.1,) * 7)
    assert suspects(grouping, suspecting, (at_chance, history[1], this)) == {5}


def _weak_user_5_with_a_focus_group() -> tuple[
    tuple[RoundContributions, ...], Grouping, dict[int, float], dict[int, float]
]:
    """Two rounds of history and a round with a focus group for user 5, who moves the
    model by 0.45 of an honest user (the others by 1)."""
    weights = {u: 1.0 for u in range(1, 10)} | {5: 0.45}
    history = (_contributions(NINE_A, weights, 2.0), _contributions(NINE_C, weights, 3.0))
    return (history, *_suspect_round(weights, key_users=frozenset({5})))


def _round_of(
    grouping: Grouping, contributions: dict[int, float], acc: dict[int, float]
) -> RoundContributions:
    groups = sorted(grouping.groups, key=lambda g: g.gid)
    return RoundContributions(
        tuple(g.members for g in groups),
        tuple(contributions[g.gid] for g in groups),
        tuple(acc[g.gid] for g in groups),
    )


def test_weight_veto_refuses_a_focus_group_whose_user_the_sharp_fit_weighs_low() -> None:
    # User 5 moves the model by 0.45 of an honest user; its focus group (1, 2, 5) reads
    # (2 + 0.45) / 3 ≈ 0.82 of the level, above the 0.8 bar: a lucky pass. Under the
    # sharp fit of three rounds θ_5 = 0.45, and the veto takes the pass away.
    history, grouping, acc, contributions = _weak_user_5_with_a_focus_group()
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3, key_score=0.3, weight_floor=0.5,
    )  # fmt: skip
    assert detect(grouping, acc, base, contributions, history=history).group_scores[6] == 1.0
    vetoing = replace(base, weight_veto=0.5)
    result = detect(grouping, acc, vetoing, contributions, history=history)
    assert result.group_scores[6] == 0.0
    # only the focus group: the basic groups that hold user 5 still score on their own
    assert result.group_scores == {gid: 1.0 for gid in range(6)} | {6: 0.0}
    below = replace(base, weight_veto=0.4)  # θ_5 = 0.45 is above this veto
    assert detect(grouping, acc, below, contributions, history=history).group_scores[6] == 1.0
    # not without a sharp fit: one round alone fits anything exactly
    assert detect(grouping, acc, vetoing, contributions).group_scores[6] == 1.0
    # nor where this round strays from the fit by more than the contribution tolerance
    # (basic group 1 moved nothing: θ_5 reads 0.72 there, the residual 0.26)
    high = replace(base, weight_floor=None, weight_veto=0.9)
    assert detect(grouping, acc, high, contributions, history=history).group_scores[6] == 0.0
    scattered = dict(contributions) | {1: 0.0}
    window = (*history, _round_of(grouping, scattered, acc))
    fit = fit_contributions(window)
    assert fit is not None and fit.noise[-1] > 0.2 and fit.weights[5] < 0.9
    assert sharp_fit(high, window) is None
    assert detect(grouping, acc, high, scattered, history=history).group_scores[6] == 1.0
    # nor before the model has learnt (τ below bound_score: no key users are made there)
    at_chance = dict.fromkeys(acc, 0.2) | {6: 0.25}
    assert (
        detect(grouping, at_chance, vetoing, contributions, history=history).group_scores[6] == 1.0
    )
    with pytest.raises(DetectionError, match="weight_veto"):
        DetectionParams(weight_veto=1.5)
    with pytest.raises(DetectionError, match="must not exceed weight_floor"):
        DetectionParams(weight_floor=0.3, weight_veto=0.4)


def test_a_suspect_whose_focus_groups_score_stays_a_key_user_but_is_not_convicted() -> None:
    # Line 25 convicts a key user that stays a key user with a narrow interval. A user
    # kept among the key users by its weight alone has not failed anything: its focus
    # group scores (carried 1, 1 and now 1: an interval of width 0), and it is not a
    # violator, only a key user again.
    history, grouping, acc, contributions = _weak_user_5_with_a_focus_group()
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3, key_score=0.3, carry_evidence=True, suspect_weight=0.5,
    )  # fmt: skip
    result = detect(grouping, acc, params, contributions, {5: (1.0, 1.0)}, history)
    assert result.evidence[5] == (1.0, 1.0, 1.0)
    assert result.new_key_users == {5} and not result.violators
    # its groups fall below τ (basic groups 0 and 5 hold it): now its score convicts it
    failing = dict(acc) | {0: 0.5, 5: 0.5, 6: 0.5}
    convicted = detect(grouping, failing, params, contributions, {5: (0.0, 0.0)}, history)
    assert convicted.violators == {5}


def test_the_intervals_t_quantile_is_scipy_stats_own() -> None:
    # Lines 16-20 take Student's t quantile from scipy.special.stdtrit, which is what
    # scipy.stats.t.ppf computes, without importing scipy.stats at every start: the
    # same number to the bit (the ledger re-derives every interval).
    from scipy import special, stats

    for confidence in (0.8, 0.9, 0.95, 0.99):
        q = 1 - (1 - confidence) / 2
        for df in range(1, 200):
            assert float(special.stdtrit(df, q)) == float(stats.t.ppf(q, df))


def _jittered(groups: tuple[tuple[int, ...], ...], weights: dict[int, float], level: float,
              jitter: float) -> RoundContributions:  # fmt: skip
    """:func:`_contributions`, each group read ``jitter`` high and low in turn."""
    exact = _contributions(groups, weights, level)
    read = tuple(c + (jitter if k % 2 else -jitter) * level
                 for k, c in enumerate(exact.contributions))  # fmt: skip
    return RoundContributions(exact.groups, read, exact.accuracies)


FIVE_ATTACKERS = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.0, 6: 0.0, 7: 0.0, 8: -1.0, 9: -1.0}


def test_convict_below_makes_violators_of_the_users_the_fit_weighs_low_with_confidence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four honest users, three free-riders (θ 0), two poisoners (θ −1), each group read
    # 5% of the level off the model: Alg. 6 has no key users to convict, every group is
    # accurate, and only the fit over the four rounds tells the users apart.
    weights = FIVE_ATTACKERS
    history = tuple(_jittered(g, weights, lv, 0.05)
                    for g, lv in ((NINE_A, 2.0), (NINE_C, 3.0), (NINE_A, 2.5)))  # fmt: skip
    grouping, acc, contributions = _suspect_round(weights)
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=4, key_score=0.3,
    )  # fmt: skip
    assert not detect(grouping, acc, base, contributions, history=history).violators
    convicting = replace(base, convict_below=0.5)
    result = detect(grouping, acc, convicting, contributions, history=history)
    assert result.violators == {5, 6, 7, 8, 9}
    assert not result.new_key_users & result.violators
    window = (*history, _contributions(NINE_B, weights, 2.0))
    fit = fit_contributions(window)
    bounds = weight_bounds(fit, window, 0.95) if fit else None
    assert fit is not None and bounds is not None
    # each bound lies above its weight, the free-riders' below the bar, the honest users' above
    assert all(bounds[u] > fit.weights[u] for u in weights)
    assert max(bounds[u] for u in (5, 6, 7)) < 0.5 < min(bounds[u] for u in (1, 2, 3, 4))
    # a lower bar keeps the free-riders (their θ ≈ 0 is not surely below 0)
    lower = replace(convicting, convict_below=0.05)
    assert fit_convicted(grouping, lower, window, 0.9, False) == {8, 9}
    # not at a plateau, not near chance, not with fewer rounds than CONVICT_ROUNDS
    assert not fit_convicted(grouping, convicting, window, 0.9, True)
    assert fit_convicted(grouping, convicting, window, CONVICT_TAU, False)
    assert not fit_convicted(grouping, convicting, window, CONVICT_TAU - 0.01, False)
    assert len(window) == CONVICT_ROUNDS
    assert not fit_convicted(grouping, convicting, window[1:], 0.9, False)
    assert not detect(grouping, acc, convicting, contributions, history=history[1:]).violators
    # A round whose level is near 0 (the median turned half way) and whose groups scatter
    # around it: fitted 1.4 times its level, believed; not where that is over CONVICT_NOISE.
    exact = _contributions(NINE_A, weights, 0.05)
    scattered = RoundContributions(
        exact.groups,
        tuple(c + (0.2 if k % 2 else -0.2) for k, c in enumerate(exact.contributions)),
        exact.accuracies,
    )
    strayed = (scattered, *window[1:])
    fit = fit_contributions(strayed)
    assert fit is not None and 1.0 < max(fit.noise) < CONVICT_NOISE
    assert fit_convicted(grouping, convicting, strayed, 0.9, False) == {5, 6, 7, 8, 9}
    monkeypatch.setattr(detection_module, "CONVICT_NOISE", 1.0)
    assert not fit_convicted(grouping, convicting, strayed, 0.9, False)
    monkeypatch.undo()
    # nor where the rounds are fitted worse than CONVICT_TYPICAL_NOISE in the median
    assert sorted(fit.noise)[len(fit.noise) // 2] < 0.1
    monkeypatch.setattr(detection_module, "CONVICT_TYPICAL_NOISE", 0.01)
    assert not fit_convicted(grouping, convicting, window, 0.9, False)
    monkeypatch.undo()
    # and only users of this round: one excluded earlier is not convicted again
    without_9 = Grouping(
        tuple(Group(g.gid, g.kind, tuple(u for u in g.members if u != 9)) for g in grouping.groups),
        frozenset(), key_repeats=1, basic_groupings=1,
    )  # fmt: skip
    assert 9 not in fit_convicted(without_9, convicting, window, 0.9, False)
    # nor where it would leave fewer users than a basic group holds: with users 1-4 gone,
    # the five weighed low and honest user 1 form the round, and one would be left
    nearly_all = Grouping(
        (Group(0, BASIC, (1, 5, 6)), Group(1, BASIC, (7, 8, 9))), frozenset(),
        key_repeats=1, basic_groupings=1,
    )  # fmt: skip
    assert not fit_convicted(nearly_all, convicting, window, 0.9, False)
    four_left = Grouping(
        (Group(0, BASIC, (1, 2, 5)), Group(1, BASIC, (3, 4, 6)), Group(2, BASIC, (7, 8, 9))),
        frozenset(), key_repeats=1, basic_groupings=1,
    )  # fmt: skip
    assert fit_convicted(four_left, convicting, window, 0.9, False) == {5, 6, 7, 8, 9}


def test_the_conviction_bar_shrinks_as_the_fit_loosens() -> None:
    """Issue 13, users holding two or three classes: where one weight per user describes
    the rounds loosely (each group read 10% of its level off the fit), a user's bound
    says how its own groups scatter, not how far its one weight is from what it did.
    The bar is ``convict_below`` times one less the median relative residual: a bound
    between the two is not convicted, the poisoners' (θ −1) still are."""
    weights = FIVE_ATTACKERS
    rounds = ((NINE_A, 2.0), (NINE_C, 3.0), (NINE_A, 2.5), (NINE_B, 2.0))
    window = tuple(_jittered(g, weights, lv, 0.1) for g, lv in rounds)
    grouping, _, _ = _suspect_round(weights)
    fit = fit_contributions(window)
    bounds = weight_bounds(fit, window, 0.95) if fit else None
    assert fit is not None and bounds is not None
    typical = statistics.median(fit.noise)
    assert 0.05 < typical < CONVICT_TYPICAL_NOISE
    rider = bounds[5]  # a free-rider's, the lowest but the poisoners'
    assert max(bounds[8], bounds[9]) < 0 < rider < min(b for u, b in bounds.items() if 5 < u < 8)
    base = DetectionParams(contribution_tolerance=0.2, level_rounds=4)
    between = replace(base, convict_below=rider / (1 - typical / 2))
    assert fit_convicted(grouping, between, window, 0.9, False) == {8, 9}
    past = replace(base, convict_below=rider / (1 - typical) * 1.01)
    assert fit_convicted(grouping, past, window, 0.9, False) == {5, 8, 9}
    assert convict_bar(0.4, 0.2) == pytest.approx(0.32)
    assert convict_bar(0.4, 0.0) == 0.4


def test_rounds_whose_groups_all_hold_the_same_users_do_not_make_the_fit_look_sharp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13, IID 3+3 seed 6: once six attackers of nine were out, every group of a
    round held the three honest users left, read the same contribution, and was fitted
    exactly (residual 0) whatever the weights. Two such rounds pulled the window's median
    residual under CONVICT_TYPICAL_NOISE and a fit that could not be believed convicted
    two honest users. The median is taken over the rounds whose groups differ."""
    weights = FIVE_ATTACKERS
    rounds = ((NINE_A, 2.0), (NINE_C, 3.0), (NINE_A, 2.5), (NINE_B, 2.0))
    informative = tuple(_jittered(g, weights, lv, 0.1) for g, lv in rounds)
    last_three = ((1, 2, 3), (1, 2, 3), (3, 2, 1))
    same = RoundContributions(last_three, (1.0, 1.0, 1.0), (0.9, 0.9, 0.9))
    window = (*informative, same, same, same, same)
    grouping, _, _ = _suspect_round(weights)
    fit = fit_contributions(window)
    assert fit is not None and fit.noise[-4:] == (0.0, 0.0, 0.0, 0.0)
    typical = typical_noise(fit, window)
    assert typical == pytest.approx(statistics.median(fit.noise[:4]), rel=1e-8)
    assert statistics.median(fit.noise) < typical / 2
    params = DetectionParams(contribution_tolerance=0.2, level_rounds=8, convict_below=0.5)
    assert {8, 9} <= fit_convicted(grouping, params, window, 0.9, False)
    # a bar between the two medians: the rounds of the same users do not lower it
    monkeypatch.setattr(detection_module, "CONVICT_TYPICAL_NOISE", typical * 0.75)
    assert not fit_convicted(grouping, params, window, 0.9, False)
    only_same = (same,) * 4
    fit_same = fit_contributions(only_same)
    assert fit_same is not None and typical_noise(fit_same, only_same) == math.inf


def _turned(
    groups: tuple[tuple[int, ...], ...], weights: dict[int, float], offsets: tuple[float, ...]
) -> RoundContributions:
    """A round whose median a ×3 poisoner turned half way: its level is near 0 and its
    groups read ``offsets`` from it (none of it along the groups' mean weights, so no
    level explains it)."""
    exact = _contributions(groups, weights, 0.05)
    read = tuple(c + off for c, off in zip(exact.contributions, offsets, strict=True))
    return RoundContributions(exact.groups, read, exact.accuracies)


def test_a_round_the_fit_cannot_explain_is_left_out_of_the_conviction_fit() -> None:
    # Four rounds read 5% off the model and one turned round: fitted with it the window
    # has a round over CONVICT_NOISE and convicted no one; without it the four convict.
    weights = FIVE_ATTACKERS
    levels = ((NINE_A, 2.0), (NINE_C, 3.0), (NINE_A, 2.5), (NINE_B, 2.0))
    clean = tuple(_jittered(g, weights, lv, 0.05) for g, lv in levels)
    grouping, _, _ = _suspect_round(weights)
    convicting = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=5, key_score=0.3, convict_below=0.5,
    )  # fmt: skip
    # in NINE_C the groups 1, 2 and 5 have mean weight 0: the offsets are not along it
    window = (_turned(NINE_C, weights, (0.0, 1.0, -1.0, 0.0, 0.0, 1.0)), *clean)
    fit = fit_contributions(window)
    assert fit is not None and max(fit.noise) > CONVICT_NOISE
    assert sorted(fit.noise)[1] <= CONVICT_NOISE  # only the turned round is unexplained
    assert fit_convicted(grouping, convicting, window, 0.9, False) == {5, 6, 7, 8, 9}
    assert fit_convicted(grouping, convicting, clean, 0.9, False) == {5, 6, 7, 8, 9}
    # left without CONVICT_ROUNDS explained rounds, it convicts no one
    assert len(clean) == CONVICT_ROUNDS
    assert not fit_convicted(grouping, convicting, window[:-1], 0.9, False)
    # nor with fewer degrees of freedom (groups − users − rounds) than users: four rounds
    # of six groups leave 24 − 9 − 4 = 11 for nine users; one group fewer in two of them
    # 9, in three of them 8
    thinned = tuple(RoundContributions(r.groups[1:], r.contributions[1:], r.accuracies[1:])
                    for r in clean)  # fmt: skip
    assert fit_convicted(grouping, convicting, thinned[:2] + clean[2:], 0.9, False)
    assert not fit_convicted(grouping, convicting, thinned[:3] + clean[3:], 0.9, False)


def test_believed_noise_makes_the_largest_contribution_the_yardstick_past_an_unexplained_round(
) -> None:  # fmt: skip
    # Every user honest; a turned round in the window bends the fitted level. Within
    # believed_noise of every round the level is the yardstick, past it the round's
    # largest contribution is, as without a window.
    weights = {u: 1.0 for u in range(1, 10)}
    grouping, acc, contributions = _suspect_round(weights)
    this = _round_of(grouping, contributions, acc)
    scatter = (-0.3, 0.3, -0.3, 0.3, -0.3, 0.3)  # all weights 1: every group's mean is 1
    window = (_turned(NINE_C, weights, scatter), _contributions(NINE_A, weights, 3.0), this)
    fit = fit_contributions(window)
    assert fit is not None and CONVICT_NOISE < max(fit.noise) < 10
    level = clean_level(window)
    assert level is not None and level != max(contributions.values())
    assert yardstick(grouping, contributions, window) == level
    assert yardstick(grouping, contributions, window, max(fit.noise) * 1.01) == level
    assert yardstick(grouping, contributions, window, CONVICT_NOISE) == 2.0
    assert yardstick(grouping, contributions, window[1:], CONVICT_NOISE) == clean_level(window[1:])
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3, key_score=0.3, believed_noise=CONVICT_NOISE,
    )  # fmt: skip
    assert detect(grouping, acc, params, contributions, history=window[:-1]).level == 2.0
    believing = replace(params, believed_noise=None)
    assert detect(grouping, acc, believing, contributions, history=window[:-1]).level == level
    with pytest.raises(DetectionError, match="believed_noise must be in"):
        DetectionParams(believed_noise=11.0)


BENT_BY_9 = (
    ((1, 2, 3), (4, 6, 7), (5, 8, 9), (1, 4, 8), (2, 5, 9), (3, 6, 9)),
    ((1, 4, 6), (2, 3, 7), (5, 8, 9), (1, 2, 8), (3, 5, 9), (4, 6, 7)),
    ((1, 2, 7), (3, 4, 8), (5, 6, 9), (1, 3, 6), (2, 5, 9), (4, 7, 8)),
    ((1, 5, 9), (2, 4, 6), (3, 7, 8), (1, 4, 7), (2, 3, 8), (5, 6, 9)),
)
"""Four rounds in which user 5 shares each of its groups with poisoner 9."""


def _departed_poisoner_window(
    theta_5: float,
) -> tuple[tuple[RoundContributions, ...], Grouping, DetectionParams]:
    """Poisoner 9 (θ −1) has been excluded; in the four rounds before, every group it
    shared with user 5 read as if 5 had moved the model by −1 (one θ cannot hold a ×3
    poisoner's harm, which differs group by group). This round 5 (θ ``theta_5`` in every
    round) is a key user with two focus groups."""
    weights = {u: 1.0 for u in range(1, 10)} | {5: theta_5, 9: -1.0}

    def read(groups: tuple[tuple[int, ...], ...], level: float) -> RoundContributions:
        bent = [{**weights, 5: -1.0} if {5, 9} <= set(g) else weights for g in groups]
        means = [sum(w[u] for u in g) / len(g) for g, w in zip(groups, bent, strict=True)]
        return RoundContributions(groups, tuple(level * m for m in means), (0.9,) * len(groups))

    history = tuple(read(g, 2.0 + 0.3 * k) for k, g in enumerate(BENT_BY_9))
    groups = (
        Group(0, BASIC, (1, 2, 3)), Group(1, BASIC, (4, 6, 7)), Group(2, BASIC, (1, 5, 8)),
        Group(3, FOCUS, (2, 4, 5), focus=5), Group(4, FOCUS, (3, 5, 6), focus=5),
        Group(5, BASIC, (2, 7, 8)),
    )  # fmt: skip
    grouping = Grouping(groups, frozenset({5}), key_repeats=2, basic_groupings=1)
    this = read(tuple(g.members for g in groups), 2.0)
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=5, key_score=0.3, weight_veto=0.4,
    )  # fmt: skip
    return (*history, this), grouping, params


def _focus_scores(
    window: tuple[RoundContributions, ...], grouping: Grouping, params: DetectionParams
) -> tuple[float, float]:
    """Alg. 6's scores of user 5's two focus groups (3 and 4) this round."""
    this = window[-1]
    contributions = {g.gid: c for g, c in zip(grouping.groups, this.contributions, strict=True)}
    accuracies = dict.fromkeys(contributions, 0.9)
    result = detect(grouping, accuracies, params, contributions, history=window[:-1])
    return result.group_scores[3], result.group_scores[4]


def test_the_veto_asks_the_fit_without_the_groups_of_users_who_left() -> None:
    window, grouping, params = _departed_poisoner_window(1.0)
    fit = sharp_fit(params, window)
    assert fit is not None and fit.weights[5] < 0.4  # bent by 9's groups
    assert _focus_scores(window, grouping, params) == (0.0, 0.0)  # each read a clean group
    assert _focus_scores(window, grouping, replace(params, weight_veto=None)) == (1.0, 1.0)
    checking = replace(params, veto_without_departed=True)
    assert _focus_scores(window, grouping, checking) == (1.0, 1.0)
    rest = detection_module._without_departed(window, frozenset(grouping.users))
    assert len(rest) == len(window) and sum(len(r.groups) for r in rest) == 3 + 4 + 4 + 4 + 6
    fit = sharp_fit(params, rest)
    assert fit is not None and fit.weights[5] == pytest.approx(1.0)
    # a free-rider is weighed low by both fits and stays vetoed
    window, grouping, params = _departed_poisoner_window(0.0)
    assert _focus_scores(window, grouping, replace(params, veto_without_departed=True)) == (0, 0)
    # where the fit without them is not sharp (each earlier round keeps one group without
    # 9: 4 + 6 equations for 8 weights and 5 levels) the veto keeps its fit
    window, grouping, params = _departed_poisoner_window(1.0)
    thin = tuple(_with_9_and_one_more(r) for r in window[:-1]) + window[-1:]
    thin_rest = detection_module._without_departed(thin, frozenset(grouping.users))
    assert sharp_fit(params, thin) is not None and sharp_fit(params, thin_rest) is None
    assert detection_module._vetoed_groups(grouping, checking, thin, True) == {3, 4}
    assert not detection_module._vetoed_groups(grouping, checking, window, True)


def _with_9_and_one_more(r: RoundContributions) -> RoundContributions:
    rows = [k for k, g in enumerate(r.groups) if 9 in g]
    rows = sorted([*rows, next(k for k, g in enumerate(r.groups) if 9 not in g)])
    return RoundContributions(
        tuple(r.groups[k] for k in rows),
        tuple(r.contributions[k] for k in rows),
        tuple(r.accuracies[k] for k in rows),
    )


def test_trusted_weight_lets_a_focus_group_of_a_user_the_sharp_fit_trusts_score() -> None:
    # User 5 moves the model as every other user (θ 1) but its focus group (1, 2, 5) is
    # the least accurate, 0.5 against τ 0.9: it trained on little data and overfit it.
    weights = {u: 1.0 for u in range(1, 10)}
    history = (_contributions(NINE_A, weights, 2.0), _contributions(NINE_C, weights, 3.0))
    grouping, acc, contributions = _suspect_round(weights, key_users=frozenset({5}))
    acc[6] = 0.5
    base = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3, key_score=0.3,
    )  # fmt: skip
    assert detect(grouping, acc, base, contributions, history=history).group_scores[6] == 0.0
    trusting = replace(base, trusted_weight=0.5)
    assert detect(grouping, acc, trusting, contributions, history=history).group_scores[6] == 1.0
    # a user the fit weighs below the bar is not trusted (a free-rider, θ 0)
    idle = weights | {5: 0.0}
    history = (_contributions(NINE_A, idle, 2.0), _contributions(NINE_C, idle, 3.0))
    grouping, acc, contributions = _suspect_round(idle, key_users=frozenset({5}))
    acc[6] = 0.5
    assert detect(grouping, acc, trusting, contributions, history=history).group_scores[6] == 0.0
    with pytest.raises(DetectionError, match="trusted_weight must be in"):
        DetectionParams(trusted_weight=1.5)


def test_weight_bounds_need_a_degree_of_freedom() -> None:
    # one round of six groups has fewer equations than its ten unknowns
    this = _jittered(NINE_B, FIVE_ATTACKERS, 2.0, 0.05)
    fit = fit_contributions((this,))
    assert fit is not None and weight_bounds(fit, (this,), 0.95) is None
    with pytest.raises(DetectionError, match="convict_below must be in"):
        DetectionParams(convict_below=1.5)


def test_a_focus_group_smaller_than_a_lone_basic_group_is_scored_on_its_contribution() -> None:
    # Six users left, one basic group of all of them (τ = the whole population's model)
    # and a focus group of three around key user 9: its skewed data cannot reach τ's
    # accuracy, and only its contribution tells whether 9 trained.
    weights = {u: 1.0 for u in (3, 4, 5, 7, 8, 9)}
    history = tuple(
        _contributions(groups, weights, 2.0)
        for groups in (((3, 4, 5), (7, 8, 9), (3, 7, 8), (4, 5, 9)),) * 2
    )
    lone = Grouping(
        (Group(0, BASIC, (3, 4, 5, 7, 8, 9)), Group(1, FOCUS, (4, 5, 9), focus=9)),
        frozenset({9}), key_repeats=1, basic_groupings=1,
    )  # fmt: skip
    params = DetectionParams(
        bound_score=0.3, bound_conf=0.5, tolerance=0.05, contribution_tolerance=0.2,
        level_rounds=3, key_score=0.3,
    )  # fmt: skip
    accuracies = {0: 0.59, 1: 0.42}
    clean = {0: 2.0, 1: 2.1}
    result = detect(lone, accuracies, params, clean, history=history)
    assert result.group_scores[1] == 1.0 and result.assessments[9].score == 1.0
    short = {0: 2.0, 1: 2.0 / 3}  # a free-rider's focus group with two clean partners
    assert detect(lone, accuracies, params, short, history=history).group_scores[1] == 0.0
    # with two basic groups τ is taken over groups of its size: accuracy counts again
    split = Grouping(
        (Group(0, BASIC, (3, 4, 5)), Group(2, BASIC, (7, 8, 9)),
         Group(1, FOCUS, (4, 5, 9), focus=9)),
        frozenset({9}), key_repeats=1, basic_groupings=1,
    )  # fmt: skip
    result = detect(split, {0: 0.59, 2: 0.59, 1: 0.42}, params, {**clean, 2: 2.0}, history=history)
    assert result.group_scores[1] == 0.0


def test_informedness_does_not_reward_calling_every_sample_one_class() -> None:
    """Youden's J per class: a model that calls every sample class 0 knows no class
    (J = 1 − 1 = 0), a perfect one every class (1), one that swaps two classes less than
    nothing there (−J of the swap)."""
    samples = (4, 4, 2)
    assert ClassCounts(samples, (4, 0, 0), (10, 0, 0)).informedness() == (0.0, 0.0, 0.0)
    assert ClassCounts(samples, samples, samples).informedness() == (1.0, 1.0, 1.0)
    swapped = ClassCounts(samples, (0, 0, 2), (4, 4, 2)).informedness()
    assert swapped == (-4 / 6, -4 / 6, 1.0)
    # a class with no test sample says nothing
    assert ClassCounts((5, 0, 5), (5, 0, 5), (5, 0, 5)).informedness() == (1.0, 0.0, 1.0)
    # a model holding NaN or infinity predicts nothing: no class led
    assert ClassCounts((5, 5), (0, 0), (0, 0)).informedness() == (0.0, 0.0)


@pytest.mark.parametrize(
    ("samples", "right", "called", "why"),
    [
        ((4, 4), (5, 0), (5, 3), "more samples classified right than it has"),
        ((4, 4), (3, 2), (2, 6), "more samples classified right than called"),
        ((4, 4), (1, 1), (4, 3), "every test sample"),
        ((1, 1), (0, 0), (2, 0), "called by more samples of others"),
        ((4, 4), (1,), (4,), "one number per class"),
        ((4, 4), (1, -1), (4, 4), "whole numbers"),
        ((4, 4), (1.0, 1), (4, 4), "whole numbers"),
    ],
)
def test_class_counts_that_do_not_add_up_are_refused(
    samples: tuple[int, ...], right: tuple[int, ...], called: tuple[int, ...], why: str
) -> None:
    with pytest.raises(DetectionError, match=why):
        ClassCounts(samples, right, called)


def _classed(window: tuple[RoundContributions, ...], leader: int, lead: float,
             rounds_led: int) -> tuple[RoundContributions, ...]:  # fmt: skip
    """``window`` with three classes' informedness per group: 0.6 everywhere but class 1
    of ``leader``'s groups, ``lead`` (give or take 0.02 by round) higher, in the last
    ``rounds_led`` rounds (the earlier ones are not counted by class)."""
    out = []
    for k, r in enumerate(window):
        if k < len(window) - rounds_led:
            out.append(r)
            continue
        jitter = 0.02 if k % 2 else -0.02
        rows = tuple((0.6, 0.6 + (lead + jitter if leader in m else 0.0), 0.6) for m in r.groups)
        out.append(RoundContributions(r.groups, r.contributions, r.accuracies, rows))
    return tuple(out)


def test_a_user_whose_groups_lead_a_class_is_not_convicted_on_its_weight() -> None:
    """Issue 13, users holding two or three classes: the fit weighs a user whose classes
    others also hold near a free-rider, but its groups know its classes better than the
    others round after round. With ``class_lead`` it is not convicted once
    :data:`CLASS_LEAD_ROUNDS` rounds show a lead of at least ``class_lead`` whose lower
    bound is above 0; a smaller lead, fewer rounds, or a lead that comes and goes do not
    excuse it, and the poisoners (who lead nothing) are convicted as before."""
    weights = FIVE_ATTACKERS
    rounds = ((NINE_A, 2.0), (NINE_C, 3.0), (NINE_A, 2.5), (NINE_B, 2.0), (NINE_C, 2.2),
              (NINE_B, 2.4))  # fmt: skip
    window = tuple(_jittered(g, weights, lv, 0.05) for g, lv in rounds)
    assert len(window) == CLASS_LEAD_ROUNDS
    grouping, _, _ = _suspect_round(weights)
    convicting = DetectionParams(contribution_tolerance=0.2, level_rounds=6, convict_below=0.5)
    assert fit_convicted(grouping, convicting, window, 0.9, False) == {5, 6, 7, 8, 9}
    led = _classed(window, 5, 0.3, CLASS_LEAD_ROUNDS)
    excusing = replace(convicting, class_lead=0.1)
    assert class_leaders(range(1, 10), led, 0.1, 0.95) == {5}
    assert fit_convicted(grouping, excusing, led, 0.9, False) == {6, 7, 8, 9}
    # off, or the lead below class_lead, or counted in fewer rounds: convicted
    assert fit_convicted(grouping, convicting, led, 0.9, False) == {5, 6, 7, 8, 9}
    too_small = replace(excusing, class_lead=0.4)
    assert fit_convicted(grouping, too_small, led, 0.9, False) == {5, 6, 7, 8, 9}
    fewer = _classed(window, 5, 0.3, CLASS_LEAD_ROUNDS - 1)
    assert not class_leaders([5], fewer, 0.1, 0.95)
    # a lead that comes and goes (0.4, then −0.2, in turn) has a lower bound below 0
    swinging = tuple(
        RoundContributions(r.groups, r.contributions, r.accuracies, tuple(
            (0.6, 0.6 + ((0.4 if k % 2 else -0.2) if 5 in m else 0.0), 0.6) for m in r.groups
        ))
        for k, r in enumerate(window)
    )  # fmt: skip
    assert not class_leaders([5], swinging, 0.1, 0.95)
    # a round whose informedness rows are not one per group is refused
    with pytest.raises(DetectionError, match="one row per group"):
        RoundContributions(window[0].groups, window[0].contributions, window[0].accuracies,
                           ((0.5, 0.5),))  # fmt: skip


def test_detect_reads_the_groups_class_counts_into_the_window() -> None:
    """``detect`` turns each group's :class:`ClassCounts` into informedness in the
    window it keeps (none where some group was not counted by class)."""
    weights = FIVE_ATTACKERS
    grouping, acc, contributions = _suspect_round(weights)
    params = DetectionParams(contribution_tolerance=0.2, level_rounds=4)
    counts = {g.gid: ClassCounts((3, 3), (2, 3), (2, 4)) for g in grouping.groups}
    result = detect(grouping, acc, params, contributions, class_counts=counts)
    assert result.history[-1].informedness == ((2 / 3 - 0 / 3, 1.0 - 1 / 3),) * len(counts)
    partial = dict(list(counts.items())[1:])
    result = detect(grouping, acc, params, contributions, class_counts=partial)
    assert result.history[-1].informedness is None
