"""Algorithm 2 and the exposure check."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fairbus.errors import GroupingError
from fairbus.grouping import (
    BASIC,
    FOCUS,
    REFERENCE,
    check_grouping,
    exposed_users,
    make_grouping,
    partition_sizes,
)


def test_exposure_by_hand() -> None:
    assert exposed_users([[1, 2, 3], [4, 5, 6]]) == []
    # {1,2,3} − {2,3} = e1
    assert exposed_users([[1, 2, 3], [2, 3]]) == [1]
    # {1,2,3}, {1,2,4}, {3,4,5}, {1,2,5}: (123) − (124) = e3 − e4; (124)−(125) = e4 − e5;
    # and (345) = e3+e4+e5 → 3·e5 + 2(e4−e5) + (e3−e4) … determines e5, e4, e3
    assert exposed_users([[1, 2, 3], [1, 2, 4], [3, 4, 5], [1, 2, 5]]) == [3, 4, 5]


def test_partition_sizes() -> None:
    assert partition_sizes(9) == [3, 3, 3]
    assert partition_sizes(10) == [4, 3, 3]
    assert partition_sizes(11) == [4, 4, 3]
    assert partition_sizes(4) == [4]
    assert partition_sizes(5) == [5]
    with pytest.raises(GroupingError, match="at least 3"):
        partition_sizes(2)


@given(st.integers(3, 20), st.data())
def test_groupings_are_well_formed_and_never_expose(n: int, data: st.DataObject) -> None:
    users = list(range(1, n + 1))
    keys = data.draw(st.lists(st.sampled_from(users), max_size=3, unique=True))
    seed = data.draw(st.integers(0, 10_000))
    grouping = make_grouping(users, keys, basic_groupings=2, key_repeats=2, seed=seed)
    assert all(len(g.members) >= 3 for g in grouping.groups)
    assert exposed_users([g.members for g in grouping.groups]) == []
    # each basic grouping is a partition of all users
    basics = grouping.basic
    per = len(partition_sizes(n))
    for k in range(grouping.basic_groupings):
        part = basics[k * per : (k + 1) * per]
        assert sorted(u for g in part for u in g.members) == users
    for g in grouping.focus:
        assert g.kind == FOCUS and g.focus in keys and g.focus in g.members
        assert len(g.members) == 3
    for u in users:
        assert {g.gid for g in grouping.active(u)} >= {g.gid for g in basics if u in g.members}
        assert all(g.kind == BASIC or g.focus == u for g in grouping.active(u))
        assert all(g.focus != u and u in g.members for g in grouping.passive(u))


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a = make_grouping(range(1, 10), [2, 5], seed=7)
    b = make_grouping(range(1, 10), [2, 5], seed=7)
    c = make_grouping(range(1, 10), [2, 5], seed=8)
    assert a == b
    assert a != c


def test_focus_groups_pair_key_users_with_general_users() -> None:
    g = make_grouping(range(1, 10), [4], key_repeats=2, seed=3)
    assert len(g.focus) == 2
    for group in g.focus:
        assert group.focus == 4
        assert set(group.members) - {4} <= set(range(1, 10)) - {4}
    assert len({group.members for group in g.focus}) == 2  # distinct focus groups


def test_focus_partners_and_references_come_from_the_trusted_users() -> None:
    g = make_grouping(range(1, 10), [4], key_repeats=2, seed=3, partners=[1, 2, 3], references=1)
    assert g.focus
    for group in g.focus:
        assert set(group.members) - {4} <= {1, 2, 3}
    assert [x.members for x in g.groups if x.kind == REFERENCE] == [(1, 2, 3)]


def test_with_too_few_trusted_general_users_trusted_key_users_partner() -> None:
    # key users 1-7: the only general users (8, 9) are not trusted; 1-3 are
    g = make_grouping(
        range(1, 10), range(1, 8), key_repeats=1, seed=5, partners=[1, 2, 3], references=0
    )
    assert g.focus
    for group in g.focus:
        assert set(group.members) - {group.focus} <= {1, 2, 3}, group


def test_focus_repeats_are_reduced_when_they_would_expose() -> None:
    # 6 key users of 9 leave 3 general users: 2 repeats each cannot all stay hidden
    g = make_grouping(range(1, 10), range(1, 7), key_repeats=2, seed=0)
    assert g.key_repeats < 2
    assert exposed_users([x.members for x in g.groups]) == []


def test_prior_groups_of_the_round_count() -> None:
    prior = [(1, 2, 3), (1, 2, 4)]  # the provider may hold these sums already
    g = make_grouping(range(1, 10), [], seed=1, prior_groups=prior)
    assert exposed_users([*prior, *(x.members for x in g.groups)]) == []


def test_crafted_groupings_are_refused() -> None:
    with pytest.raises(GroupingError, match=r"user\(s\) \[3, 4, 5\]"):
        check_grouping([[1, 2, 3], [1, 2, 4], [3, 4, 5], [1, 2, 5]])
    with pytest.raises(GroupingError, match="fewer than 3"):
        check_grouping([[1, 2], [1, 2, 3]])
    with pytest.raises(GroupingError, match=r"\[1\]"):
        check_grouping([[2, 3, 4]], prior_groups=[[1, 2, 3, 4]])


def test_impossible_groupings_fail_clearly() -> None:
    with pytest.raises(GroupingError, match="keeps every model hidden"):
        make_grouping([1, 2, 3, 4], [], seed=0, prior_groups=[(1, 2, 3)], tries=20)
    with pytest.raises(GroupingError):
        make_grouping([1, 2], [], seed=0)
