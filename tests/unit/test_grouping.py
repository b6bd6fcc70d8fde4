"""Algorithm 2 under the exposure check with a collusion bound c (issue 12, item 2)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairbus.errors import GroupingError
from fairbus.exposure import components, exposing_sets
from fairbus.grouping import (
    BASIC,
    BLOCK,
    FOCUS,
    REFERENCE,
    Grouping,
    check_grouping,
    group_size,
    make_grouping,
    partition_sizes,
)


def test_partition_sizes() -> None:
    assert partition_sizes(9) == [3, 3, 3]
    assert partition_sizes(10) == [4, 3, 3]
    assert partition_sizes(11) == [4, 4, 3]
    assert partition_sizes(4) == [4]
    assert partition_sizes(5) == [5]
    assert partition_sizes(9, 4) == [5, 4]
    with pytest.raises(GroupingError, match="at least 3"):
        partition_sizes(2)


def test_group_size_grows_with_the_collusion_bound() -> None:
    assert [group_size(c) for c in (0, 1, 2, 3)] == [3, 3, 4, 5]


@settings(deadline=None, max_examples=40)
@given(st.integers(3, 20), st.integers(1, 2), st.data())
def test_groupings_are_well_formed_and_never_expose(n: int, c: int, data: st.DataObject) -> None:
    users = list(range(1, n + 1))
    if n < group_size(c):
        with pytest.raises(GroupingError):
            make_grouping(users, c=c)
        return
    keys = data.draw(st.lists(st.sampled_from(users), max_size=3, unique=True))
    seed = data.draw(st.integers(0, 10_000))
    grouping = make_grouping(users, keys, c=c, basic_groupings=2, key_repeats=2, seed=seed)
    assert all(len(g.members) >= group_size(c) for g in grouping.groups)
    assert exposing_sets([g.members for g in grouping.groups], users, c) == []
    # the first groups are one basic grouping: a partition of all users (with key users
    # it may have one group fewer than the most, to make room for focus groups)
    most = len(partition_sizes(n, group_size(c)))
    per = next(
        k
        for k in (most, most - 1)
        if sorted(u for g in grouping.groups[:k] for u in g.members) == users
    )
    assert per == most or keys
    first = grouping.groups[:per]
    assert all(g.kind == BASIC for g in first)
    assert len(grouping.basic) == per * grouping.basic_groupings
    for g in grouping.focus:
        assert g.kind == FOCUS and g.focus in keys and g.focus in g.members
        assert len(g.members) == group_size(c)
    for u in users:
        assert all(g.kind == BASIC or g.focus == u for g in grouping.active(u))
        assert all(g.focus != u and u in g.members for g in grouping.passive(u))


def test_no_two_groups_of_three_share_two_members_under_c1() -> None:
    for seed in range(30):
        g = make_grouping(range(1, 10), [1, 5], key_repeats=6, references=2, seed=seed)
        for a in g.groups:
            for b in g.groups:
                if a.gid < b.gid and len(a.members) == len(b.members) == 3:
                    assert len(set(a.members) & set(b.members)) <= 1, (a, b)


def test_with_no_room_for_focus_groups_the_basic_grouping_has_one_group_fewer() -> None:
    # six users in two groups of three leave no room for a focus group of three
    g = make_grouping(range(1, 7), [1], key_repeats=2, seed=0)
    assert [x.members for x in g.basic] == [(1, 2, 3, 4, 5, 6)]
    assert len(g.focus) == 1
    plain = make_grouping(range(1, 7), [], seed=0)
    assert [len(x.members) for x in plain.basic][:2] == [3, 3]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a = make_grouping(range(1, 10), [2, 5], seed=7)
    b = make_grouping(range(1, 10), [2, 5], seed=7)
    c = make_grouping(range(1, 10), [2, 5], seed=8)
    assert a == b
    assert a != c


def test_focus_groups_pair_key_users_with_general_users() -> None:
    groupings = [make_grouping(range(1, 10), [4], key_repeats=2, seed=s) for s in range(10)]
    assert any(len(g.focus) == 2 for g in groupings)  # room for two beside one partition
    for g in groupings:
        assert g.focus
        for group in g.focus:
            assert group.focus == 4
            assert set(group.members) - {4} <= set(range(1, 10)) - {4}


def test_focus_partners_and_references_come_from_the_trusted_users() -> None:
    partners = [1, 2, 3, 6, 7, 8]
    g = make_grouping(range(1, 16), [4], key_repeats=2, seed=3, partners=partners, references=1)
    assert g.focus
    for group in g.focus:
        assert set(group.members) - {4} <= set(partners)
    references = [x.members for x in g.groups if x.kind == REFERENCE]
    assert references and set(references[0]) <= set(partners)


def test_with_too_few_trusted_general_users_trusted_key_users_partner() -> None:
    # key users 1-7: the only general users (8, 9) are not trusted; 1-3 are
    g = make_grouping(
        range(1, 10), range(1, 8), key_repeats=1, seed=5, partners=[1, 2, 3], references=0
    )
    for group in g.focus:
        assert set(group.members) - {group.focus} <= {1, 2, 3}, group


def test_focus_groups_are_shared_out_among_key_users() -> None:
    served = 0
    for seed in range(20):
        g = make_grouping(range(1, 16), [1, 2, 3], key_repeats=6, seed=seed)
        order = [x.focus for x in g.focus]
        first_repeat = next((k for k, u in enumerate(order) if u in order[:k]), len(order))
        # one at a time, in turn: every key user served comes before anyone's second
        assert set(order[:first_repeat]) == set(order)
        served += len(set(order)) == 3
    assert served >= 15


def test_prior_groups_count() -> None:
    prior = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]  # the provider may hold these sums already
    g = make_grouping(range(1, 10), [], seed=1, prior_groups=prior)
    assert exposing_sets([*prior, *(x.members for x in g.groups)], c=1) == []


def test_crafted_groupings_are_refused() -> None:
    # two groups sharing two members: x3 − x4, and a member knows its own model
    with pytest.raises(GroupingError, match=r"\{3, 4\}"):
        check_grouping([[1, 2, 3], [1, 2, 4]])
    # the 4-user design: every model is determined
    with pytest.raises(GroupingError, match="determine a model"):
        check_grouping([[1, 2, 3], [1, 2, 4], [1, 3, 4], [2, 3, 4]], c=0)
    with pytest.raises(GroupingError, match="fewer than 3"):
        check_grouping([[1, 2], [1, 2, 3]])
    with pytest.raises(GroupingError, match="fewer than 4"):
        check_grouping([[1, 2, 3], [4, 5, 6]], c=2)
    with pytest.raises(GroupingError, match=r"\{1\}"):
        check_grouping([[2, 3, 4]], prior_groups=[[1, 2, 3, 4]], c=0)
    check_grouping([[1, 2, 3], [4, 5, 6], [1, 4, 7], [7, 8, 9]])  # shares at most one


def test_impossible_groupings_fail_clearly() -> None:
    with pytest.raises(GroupingError, match="keeps every model hidden"):
        make_grouping([1, 2, 3, 4], [], seed=0, prior_groups=[(1, 2, 3)], tries=5)
    with pytest.raises(GroupingError):
        make_grouping([1, 2], [], seed=0)
    with pytest.raises(GroupingError, match="at least 4"):
        make_grouping([1, 2, 3], [], c=2)


def _well_formed(grouping: Grouping, users: list[int], keys: list[int], c: int) -> None:
    """The grouping's guarantees: sizes, the first basic grouping a partition of every
    user, the further ones too, focus groups a key user with general users."""
    size = group_size(c)
    assert all(len(g.members) >= size for g in grouping.groups)
    assert [g.gid for g in grouping.groups] == list(range(len(grouping.groups)))
    basic = grouping.basic
    assert len(basic) % grouping.basic_groupings == 0
    width = len(basic) // grouping.basic_groupings
    assert all(g.kind == BASIC for g in grouping.groups[:width])
    for k in range(grouping.basic_groupings):
        assert sorted(u for g in basic[k * width : (k + 1) * width] for u in g.members) == users
    for g in grouping.focus:
        assert g.focus in keys and set(g.members) - {g.focus} <= set(users) - set(keys)
        assert len(g.members) == size


def test_a_thousand_users_with_two_hundred_key_users() -> None:
    """Issue 16: 1,000 users, 200 of them key users, the provider's policy under c = 1,
    grouped in blocks; the exact check passes and every component is one block."""
    users = list(range(1, 1001))
    keys = users[::5]
    partners = [u for u in users if u not in set(keys)]
    grouping = make_grouping(
        users, keys, c=1, key_repeats=6, references=2, seed=(3, 1, 0), partners=partners
    )
    check_grouping(grouping, c=1)
    _well_formed(grouping, users, keys, 1)
    parts = components([g.members for g in grouping.groups])
    assert len(parts) == 1000 // BLOCK
    assert all(BLOCK <= len(p.users) < 2 * BLOCK for p in parts)
    assert len(grouping.focus) >= 2.5 * len(keys)
    assert len([g for g in grouping.groups if g.kind == REFERENCE]) <= 2


@pytest.mark.parametrize("c", [1, 2])
def test_grouping_in_blocks_keeps_the_guarantees(c: int) -> None:
    users = list(range(1, 41))
    keys = [3, 8, 13, 21, 22, 34, 40]
    for seed in range(4):
        grouping = make_grouping(
            users, keys, c=c, key_repeats=3, references=2, seed=seed, block=9,
            partners=[u for u in users if u not in keys],
        )  # fmt: skip
        check_grouping(grouping, c=c)
        _well_formed(grouping, users, keys, c)
        parts = components([g.members for g in grouping.groups])
        assert len(parts) == 4 and all(9 <= len(p.users) < 18 for p in parts)
        assert grouping.focus
        # key users come in turn: every key user served comes before anyone's second
        order = [g.focus for g in grouping.focus]
        first_repeat = next((k for k, u in enumerate(order) if u in order[:k]), len(order))
        assert set(order[:first_repeat]) == set(order)
        assert grouping == make_grouping(
            users, keys, c=c, key_repeats=3, references=2, seed=seed, block=9,
            partners=[u for u in users if u not in keys],
        )  # fmt: skip


def test_blocks_linked_by_prior_groups_are_grouped_together() -> None:
    users = list(range(1, 41))
    # prior sums over users that every dealing would split: 1-12 end up in one block
    prior = [(1, 2, 3, 4), (4, 5, 6, 7), (7, 8, 9, 10), (10, 11, 12), (41, 1, 20)]
    for seed in range(4):
        grouping = make_grouping(users, [], seed=seed, block=9, prior_groups=prior)
        check_grouping(grouping, prior_groups=prior)
        _well_formed(grouping, users, [], 1)
        parts = components([*prior, *(g.members for g in grouping.groups)])
        assert {1, 2, 12, 20, 41} <= set(parts[0].users)
        assert len(parts) >= 2
        assert grouping != make_grouping(users, [], seed=seed + 1, block=9, prior_groups=prior)


def test_the_scale_bench_draws_and_summarizes() -> None:
    from fairbus.bench import scale

    params = scale.GroupingParams(block=9)
    sample = scale.draw(20, 4, 1, 0, params)
    assert sample.components == 2 and 9 <= sample.largest_component < 18
    assert sample.focus_per_key is not None and sample.focus_per_key > 0
    report = scale.run((9, 100), (0.2,), (1,), 2, scale.GroupingParams())
    assert [(r.users, r.key_users, r.c, r.repeats) for r in report.rows] == [
        (9, 2, 1, 2),
        (100, 20, 1, 2),
    ]
    assert report.rows[0].target_s is None and report.rows[1].target_s == 0.5
    assert report.rows[1].components_mean == 2 and report.rows[1].largest_component == 50
