"""Algorithm 6 against cases computed by hand."""

import math

import numpy as np
import pytest

from fairbus.detection import DetectionParams, detect, group_contributions
from fairbus.errors import DetectionError
from fairbus.grouping import BASIC, FOCUS, Group, Grouping

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
