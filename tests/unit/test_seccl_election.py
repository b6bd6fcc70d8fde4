"""The consensus contract's Borda election (SecCL, "Consensus among Participants")."""

from __future__ import annotations

import pytest

from fairbus.errors import SecclError
from fairbus.seccl import candidate_count, elect
from fairbus.seccl.election import ballot, points


@pytest.mark.parametrize(
    ("share", "n", "m"),
    [(0.2, 20, 4), (0.4, 20, 8), (0.2, 30, 6), (0.4, 30, 12), (0.1, 30, 3), (0.1, 4, 1),
     (0.25, 6, 2), (0.01, 5, 1), (1.0, 5, 5)],
)  # fmt: skip
def test_the_candidate_count_is_the_nearest_whole_number(share: float, n: int, m: int) -> None:
    assert candidate_count(share, n) == m


@pytest.mark.parametrize("share", [0.0, 1.01, float("inf"), None, True])
def test_a_bad_candidate_share_is_refused(share: object) -> None:
    with pytest.raises(SecclError):
        candidate_count(share, 10)  # type: ignore[arg-type]


def test_borda_points_by_position_in_the_top_m() -> None:
    assert [points(p, 3) for p in range(5)] == [3, 2, 1, 0, 0]
    assert ballot({4: 0.5, 2: 0.9, 3: 0.5, 7: 0.1}, 3) == (2, 3, 4)  # 3 before 4: equal values


def test_the_candidates_have_the_greatest_totals() -> None:
    evaluations = {
        1: {2: 0.9, 3: 0.8, 4: 0.1},
        2: {1: 0.7, 3: 0.9, 4: 0.2},
        3: {1: 0.6, 2: 0.5, 4: 0.3},
        4: {1: 0.9, 2: 0.8, 3: 0.7},
    }
    result = elect(evaluations, [1, 2, 3, 4], 2)
    # ballots: 1 → (2, 3); 2 → (3, 1); 3 → (1, 2); 4 → (1, 2)
    assert dict(result.totals) == {1: 5, 2: 4, 3: 3, 4: 0}
    assert dict(result.first_places) == {1: 2, 2: 1, 3: 1, 4: 0}
    assert result.candidates == (1, 2)


def test_ties_go_to_more_first_places_then_the_lower_id() -> None:
    evaluations = {
        1: {2: 0.9, 3: 0.1, 4: 0.5},  # 2 first, 4 second
        2: {1: 0.1, 3: 0.9, 4: 0.5},  # 3 first, 4 second
        3: {1: 0.2, 2: 0.1, 4: 0.5},  # 4 first, 1 second
        4: {1: 0.3, 2: 0.9, 3: 0.1},  # 2 first, 1 second
    }
    result = elect(evaluations, [1, 2, 3, 4], 2)
    assert dict(result.totals) == {1: 2, 2: 4, 3: 2, 4: 4}
    # 2 and 4 tie at 4 points: 2 has two first places, 4 one
    assert result.candidates == (2, 4)
    # equal totals and first places: the lower id
    even = {1: {2: 1.0, 3: 0.0}, 2: {3: 1.0, 1: 0.0}, 3: {1: 1.0, 2: 0.0}}
    assert elect(even, [1, 2, 3], 1).candidates == (1,)


def test_colluders_who_vote_for_each_other_win_only_with_enough_votes() -> None:
    honest = {u: {v: (0.1 if v in (5, 6) else 0.9 - v / 100) for v in range(1, 7) if v != u}
              for u in range(1, 5)}  # fmt: skip
    colluding = {5: {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 6: 1.0},
                 6: {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 1.0}}  # fmt: skip
    result = elect({**honest, **colluding}, range(1, 7), 2)
    assert result.candidates == (1, 2)


def test_the_election_refuses_what_the_contract_refuses() -> None:
    with pytest.raises(SecclError, match="itself"):
        elect({1: {1: 0.5, 2: 0.5}}, [1, 2], 1)
    with pytest.raises(SecclError, match="uploaded nothing"):
        elect({1: {3: 0.5}}, [1, 2], 1)
    with pytest.raises(SecclError, match="finite"):
        elect({1: {2: float("nan")}}, [1, 2], 1)
    with pytest.raises(SecclError):
        elect({}, [], 1)
    with pytest.raises(SecclError):
        elect({1: {2: 0.5}}, [1, 2], 0)
    # more candidates than uploads: all of them
    assert elect({1: {2: 0.5}}, [1, 2], 5).candidates == (2, 1)
