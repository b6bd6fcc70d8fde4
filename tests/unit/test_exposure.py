"""The exposure check with a collusion bound c (issue 12, item 2), against a brute force.

The reference: a set S of users is tied together by the group sums iff some non-zero
vector of the row space of the incidence matrix A is supported within S, i.e. iff
removing the columns S lowers the rank of A. It is computed here with exact Fractions
over every subset of at most c + 1 users, and the minimal such sets are what
:func:`fairbus.exposure.exposing_sets` must return.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest
from flint import fmpz
from hypothesis import given, settings
from hypothesis import strategies as st

from fairbus import exposure
from fairbus.errors import GroupingError
from fairbus.exposure import (
    Component,
    ExposureScreen,
    check_exposure,
    components,
    exposing_sets,
    is_safe,
    null_space,
)
from fairbus.grouping import make_grouping
from tests.support_draws import SeededDraws

Groups = Sequence[Sequence[int]]


def _rank(rows: list[list[Fraction]]) -> int:
    rows = [r[:] for r in rows]
    rank = 0
    width = len(rows[0]) if rows else 0
    for col in range(width):
        pivot = next((r for r in range(rank, len(rows)) if rows[r][col] != 0), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        for r in range(len(rows)):
            if r != rank and rows[r][col] != 0:
                factor = rows[r][col] / rows[rank][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[rank], strict=True)]
        rank += 1
    return rank


def brute_force(groups: Groups, c: int) -> list[tuple[int, ...]]:
    """Minimal sets S, |S| ≤ c + 1, with rank(A without the columns S) < rank(A)."""
    users = sorted({u for g in groups for u in g})
    matrix = [[Fraction(int(u in g)) for u in users] for g in groups]
    full = _rank(matrix)
    tied: list[tuple[int, ...]] = []
    for size in range(1, c + 2):
        for subset in combinations(range(len(users)), size):
            if any(set(t) <= set(subset) for t in tied):
                continue  # not minimal
            kept = [[row[k] for k in range(len(users)) if k not in subset] for row in matrix]
            if _rank(kept) < full:
                tied.append(subset)
    return sorted((tuple(users[k] for k in s) for s in tied), key=lambda s: (len(s), s))


@st.composite
def groupings(draw: st.DrawFn) -> list[list[int]]:
    n = draw(st.integers(3, 9))
    group = st.lists(st.integers(1, n), min_size=2, max_size=min(n, 5), unique=True)
    return draw(st.lists(group, min_size=1, max_size=9))


@settings(max_examples=150)
@given(groupings(), st.sampled_from([0, 1, 2]))
def test_matches_the_brute_force(groups: list[list[int]], c: int) -> None:
    expected = brute_force(groups, c)
    assert exposing_sets(groups, c=c) == expected
    assert is_safe(groups, c) == (not expected)


@settings(max_examples=60)
@given(groupings(), st.sampled_from([0, 1, 2]))
def test_the_screen_agrees_on_small_groupings(groups: list[list[int]], c: int) -> None:
    users = sorted({u for g in groups for u in g})
    screen = ExposureScreen(users, c)
    for group in groups:
        admitted = screen.admits(group)
        assert admitted == is_safe([*screen.groups, group], c)
        assert screen.try_add(group) == admitted
        if not admitted:
            screen.add(group)
    assert screen.confirm() == exposing_sets(groups, users, c)


@settings(max_examples=40)
@given(groupings(), st.sampled_from([2, 3]))
def test_the_exact_fallback_when_every_prime_is_unlucky(groups: list[list[int]], c: int) -> None:
    expected = brute_force(groups, c)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exposure, "PRIMES", (2, 3))  # rank drops mod 2 and 3 are common
        assert exposing_sets(groups, c=c) == expected


def test_two_groups_sharing_two_members() -> None:
    groups = [(1, 2, 3), (1, 2, 4)]
    assert is_safe(groups, c=0)  # today's check passes it
    for c in (1, 2):
        assert (3, 4) in exposing_sets(groups, c=c)  # x3 − x4: one known model gives the other
        assert not is_safe(groups, c)
    with pytest.raises(GroupingError, match=r"\{3, 4\}"):
        check_exposure(groups, c=1)


def test_a_free_riders_known_model_exposes_a_group_mate() -> None:
    # 4 free-rides (its model is the public global model): the provider reads x3.
    basic = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    groups = [*basic, (1, 2, 4)]
    assert exposing_sets(groups, c=1) == [(3, 4)]
    with pytest.raises(GroupingError):
        check_exposure([(1, 2, 4)], c=1, prior_groups=basic)


def test_the_four_user_design() -> None:
    groups = [(1, 2, 3), (1, 2, 4), (1, 3, 4), (2, 3, 4)]
    for c in (0, 1, 2):
        assert exposing_sets(groups, c=c) == [(1,), (2,), (3,), (4,)]
        assert not is_safe(groups, c)


def test_one_partition_of_nine_is_safe_for_c1_not_c2() -> None:
    partition = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert exposing_sets(partition, c=1) == []
    assert is_safe(partition, c=1)
    # Two colluding members of a group of three read the third from the group sum:
    # c = 2 needs groups of four or more.
    assert exposing_sets(partition, c=2) == partition


def test_two_independent_partitions_of_nine_that_pass_c1() -> None:
    rows = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    columns = [(1, 4, 7), (2, 5, 8), (3, 6, 9)]
    assert exposing_sets([*rows, *columns], c=1) == []
    assert brute_force([*rows, *columns], 1) == []
    # ...while two partitions that share a pair fail
    assert (3, 6) in exposing_sets([*rows, (1, 2, 6), (3, 4, 5), (7, 8, 9)], c=1)


def test_groups_of_four_can_pass_c2() -> None:
    rows = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)]
    columns = [tuple(range(k, 17, 4)) for k in range(1, 5)]
    assert exposing_sets([*rows, *columns], c=2) == []
    assert exposing_sets([*rows, *columns], c=3) == sorted([*rows, *columns])


def test_the_providers_groupings_pass_under_their_c() -> None:
    for c in (1, 2):
        for seed in range(5):
            grouping = make_grouping(range(1, 16), [1, 2], c=c, key_repeats=2, seed=seed)
            groups = [g.members for g in grouping.groups]
            assert exposing_sets(groups, c=c) == []
            assert exposing_sets(groups, c=0) == []


def test_users_outside_every_group_are_never_exposed() -> None:
    groups = [(1, 2, 3), (1, 2, 4)]
    assert exposing_sets(groups, users=range(1, 10), c=1) == [(3, 4)]
    assert null_space(groups, users=range(1, 10)).dimension == 7
    with pytest.raises(GroupingError, match="outside"):
        exposing_sets(groups, users=[1, 2, 3], c=1)


def test_results_are_sorted_and_deterministic() -> None:
    groups = [(5, 1, 9), (9, 1, 7), (2, 3, 4), (3, 4, 8), (4, 2, 8)]
    first = exposing_sets(groups, c=2)
    assert first == exposing_sets(list(reversed(groups)), c=2)
    assert first == sorted(first, key=lambda s: (len(s), s))
    assert all(list(s) == sorted(s) for s in first)
    assert first == brute_force(groups, 2)


def test_larger_sets_agree_with_the_exact_search() -> None:
    """At 30 users the modular search (c = 2, 3) agrees with the exact integer one."""
    for seed in range(3):
        grouping = make_grouping(range(1, 31), [], seed=seed, references=2)
        groups = [g.members for g in grouping.groups]
        for c in (2, 3):
            found = exposing_sets(groups, c=c)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(exposure, "PRIMES", ())
                assert exposing_sets(groups, c=c) == found


def test_bad_bounds_are_refused() -> None:
    for c in (-1, True, 1.5):
        with pytest.raises(GroupingError, match="collusion bound"):
            exposing_sets([(1, 2, 3)], c=c)  # type: ignore[arg-type]


def test_no_groups_expose_no_one() -> None:
    assert exposing_sets([], c=1) == []
    assert exposing_sets([], users=[1, 2, 3], c=2) == []
    assert is_safe([], 3)


def test_the_primes_are_prime_and_fit_int64_products() -> None:
    for p in exposure.PRIMES:
        assert fmpz(p).is_prime()
        assert (p - 1) ** 2 < 2**63


def test_the_privacy_bench_draws_and_summarizes() -> None:
    from fairbus.bench import privacy

    params = privacy.GroupingParams()
    setting = privacy.Setting(9, privacy.key_count(9, 0.2))
    assert setting.key_users == 2
    sample = privacy.draw(setting, 0, (1, 2), params)
    assert sample.checks[1].sets == sample.checks[2].sets == 0  # built under each c
    assert sample.checks[1].focus_per_key is not None and sample.checks[1].focus_per_key > 0
    got, finished = privacy.collect(privacy.Setting(9, 0), (1,), 3, params, 60.0)
    assert finished and [s.seed for s in got] == [0, 1, 2]
    row = privacy.summarize(privacy.Setting(9, 0), 1, got, finished, 60.0)
    assert row.samples == 3 and row.stopped == "done" and row.focus_per_key_mean is None


@st.composite
def configurations(draw: st.DrawFn) -> list[list[int]]:
    """Small integer row configurations, often with planted dependent pairs and triples
    (the c = 2 screen must find exactly the circuits the general search finds)."""
    k = draw(st.integers(3, 7))
    n = draw(st.integers(3, 14))
    entry = st.integers(-3, 3)
    rows = draw(st.lists(st.lists(entry, min_size=k, max_size=k), min_size=n, max_size=n))
    for _ in range(draw(st.integers(0, 2))):
        i, j, x = draw(st.permutations(range(n)))[:3]
        s, t = draw(st.integers(-2, 2)), draw(st.integers(-2, 2))
        rows[x] = [s * a + t * b for a, b in zip(rows[i], rows[j], strict=True)]
    return rows


@settings(max_examples=200)
@given(configurations(), st.booleans())
def test_the_c2_screen_matches_the_general_search(rows: list[list[int]], coarse: bool) -> None:
    p = exposure.PRIMES[0]
    basis = np.array(rows, dtype=np.int64) % p
    with pytest.MonkeyPatch.context() as patch:
        if coarse:  # weights 1..3: the projection raises many false alarms to sort out
            weights = np.arange(4096, dtype=np.int64) * np.array([[1], [2], [3]]) % 3 + 1
            patch.setattr(exposure, "_PROJECTION", weights)
        fast = exposure._no_circuit_of_three(basis, p)
    assert fast == exposure._no_circuit(basis, p, 2)
    assert fast == exposure._safe_mod_p(basis, p, 2)


@given(st.lists(st.integers(0, 2**40), max_size=200))
def test_residues_are_inverted_one_by_one_or_in_a_batch(values: list[int]) -> None:
    p = exposure.PRIMES[0]
    residues = np.array(values, dtype=np.int64) % p
    inverse = exposure._inverse_mod(residues, p)
    assert inverse.shape == residues.shape
    for v, w in zip(residues.tolist(), inverse.tolist(), strict=True):
        assert w == (pow(v, -1, p) if v else 0)


def test_the_screen_remembers_verdicts_across_copies() -> None:
    screen = ExposureScreen(range(1, 10), c=2)
    assert screen.try_add((1, 2, 3, 4))
    twin = screen.copy()
    assert not twin.try_add((1, 2, 3, 5, 6))  # {4, 5, 6} would be tied together
    assert not screen.admits((1, 2, 3, 5, 6))  # the twin's verdict, on the same groups
    assert screen.groups == twin.groups == [(1, 2, 3, 4)]
    assert twin.try_add((5, 6, 7, 8))
    assert screen.admits((5, 6, 7, 8)) and screen.try_add((8, 5, 6, 7))
    assert screen.groups == twin.groups
    assert screen.confirm() == twin.confirm() == []


def _clustered_groups(rng: SeededDraws) -> list[list[int]]:
    """Random groups over 1-3 clusters of users, sometimes linked by one group: many
    components, many groupings that expose someone, some that do not."""
    users = list(range(1, int(rng.integers(4, 16)) + 1))
    parts = np.array_split(np.array(rng.permutation(users)), int(rng.integers(1, 4)))
    clusters = [[int(u) for u in part] for part in parts]
    groups = []
    for cluster in clusters:
        for _ in range(int(rng.integers(1, 4))):
            size = int(rng.integers(2, min(len(cluster), 5) + 1)) if len(cluster) >= 2 else 1
            groups.append(sorted(rng.choice(cluster, size)))
    if rng.random() < 0.3:
        groups.append(sorted(rng.choice(users, 3)))
    return groups


def test_the_component_check_agrees_with_the_whole_matrix_check() -> None:
    """Issue 16: the check runs per connected component; on 600 seeded random groupings
    (small n, several components, exposing and not) it finds exactly what the search on
    the whole incidence matrix finds."""
    split = exposing = passing = 0
    for seed in range(600):
        rng = SeededDraws(seed)
        groups = _clustered_groups(rng)
        c = int(rng.integers(0, 3))
        users = range(1, 17)
        whole = exposure._search(null_space(groups, users), c, first_only=False)
        assert exposing_sets(groups, users, c) == whole, (groups, c)
        assert is_safe(groups, c, users) == (not whole)
        split += len(components(groups)) > 1
        exposing += bool(whole)
        passing += not whole
    assert split > 200 and exposing > 100 and passing > 100


def test_components_are_the_linked_users_and_their_groups() -> None:
    groups = [(4, 5, 6), (1, 2, 3), (3, 7, 8), (5, 4, 6)]
    assert components(groups, users=range(1, 10)) == [
        Component((1, 2, 3, 7, 8), ((1, 2, 3), (3, 7, 8))),
        Component((4, 5, 6), ((4, 5, 6), (4, 5, 6))),
    ]
    assert components([]) == []
    with pytest.raises(GroupingError, match="outside"):
        components(groups, users=[1, 2, 3])
