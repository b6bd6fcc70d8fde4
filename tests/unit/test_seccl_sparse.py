"""SecCL's type (a) content: the top-θ changes, their strict bounds, applying them, and
the aggregation of the candidates' changes."""

from __future__ import annotations

import numpy as np
import pytest

from fairbus.errors import FairbusError, SecclError
from fairbus.seccl import (
    SparseChange,
    aggregate,
    apply_change,
    macro_f_score,
    shared_count,
    top_changes,
)
from tests.support_draws import SeededDraws


def _change(length: int, indices: list[int], values: list[float]) -> SparseChange:
    return SparseChange(
        length, np.array(indices, dtype=np.int64), np.array(values, dtype=np.float32)
    )


@pytest.mark.parametrize(
    ("theta", "length", "k"),
    [(0.1, 5000, 500), (0.1, 10, 1), (0.1, 4, 1), (0.1, 15, 2), (1.0, 7, 7), (0.5, 3, 2)],
)
def test_the_shared_count_is_the_nearest_whole_number(theta: float, length: int, k: int) -> None:
    assert shared_count(theta, length) == k


@pytest.mark.parametrize("theta", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_a_bad_theta_is_refused(theta: object) -> None:
    with pytest.raises(SecclError):
        shared_count(theta, 10)  # type: ignore[arg-type]


def test_the_largest_magnitudes_are_shared_ties_by_lower_index() -> None:
    delta = np.array([0.1, -3.0, 2.0, -2.0, 0.0, 2.0, 1.0, 0.5, -0.2, 0.3], dtype=np.float32)
    change = top_changes(delta, 0.3)  # k = 3: |−3| then the first two of the three 2s
    assert change.indices.tolist() == [1, 2, 3]
    assert change.values.tolist() == [-3.0, 2.0, -2.0]
    assert change.values.dtype == np.float32 and change.count == 3
    assert np.array_equal(change.to_dense()[[1, 2, 3]], delta[[1, 2, 3]])
    assert top_changes(np.zeros(10, dtype=np.float32), 0.2).indices.tolist() == [0, 1]


def test_a_non_finite_change_is_refused() -> None:
    with pytest.raises(SecclError, match="index 2"):
        top_changes(np.array([0.0, 1.0, np.nan], dtype=np.float32), 0.5)
    with pytest.raises(SecclError):
        top_changes(np.zeros((2, 2), dtype=np.float32), 0.5)


@pytest.mark.parametrize(
    ("length", "indices", "values", "complaint"),
    [
        (4, [0, 0], [1.0, 2.0], "ascending"),
        (4, [2, 1], [1.0, 2.0], "ascending"),
        (4, [0, 4], [1.0, 2.0], r"\[0, 4\)"),
        (4, [-1, 2], [1.0, 2.0], r"\[0, 4\)"),
        (4, [0, 1], [1.0], "indices and"),
        (4, [], [], "at least one"),
        (4, [0, 1], [1.0, float("inf")], "not finite"),
        (0, [0], [1.0], "parameters"),
    ],
)
def test_a_sparse_change_is_checked_on_construction(
    length: int, indices: list[int], values: list[float], complaint: str
) -> None:
    with pytest.raises(SecclError, match=complaint):
        _change(length, indices, values)


def test_values_must_be_float32() -> None:
    with pytest.raises(SecclError, match="float32"):
        SparseChange(3, np.array([0]), np.array([1.0], dtype=np.float64))


def test_applying_a_change_adds_it_in_float32() -> None:
    params = np.arange(5, dtype=np.float32)
    out = apply_change(params, _change(5, [1, 4], [0.5, -1.0]))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 1.5, 2.0, 3.0, 3.0]
    assert params.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # not in place
    with pytest.raises(SecclError):
        apply_change(np.zeros(4, dtype=np.float32), _change(5, [1], [1.0]))


def test_the_aggregate_is_the_per_coordinate_mean_of_those_that_share_it() -> None:
    params = np.ones(6, dtype=np.float32)
    changes = {
        7: _change(6, [0, 1], [1.0, 2.0]),
        3: _change(6, [1, 2], [4.0, -1.0]),
        5: _change(6, [1, 5], [0.0, 0.25]),
    }
    out = aggregate(params, changes)
    assert out.dtype == np.float32
    assert out.tolist() == [2.0, 3.0, 0.0, 1.0, 1.0, 1.25]
    # order of the mapping does not matter: candidates are taken by id
    assert np.array_equal(aggregate(params, dict(reversed(list(changes.items())))), out)
    with pytest.raises(SecclError):
        aggregate(params, {})
    with pytest.raises(SecclError, match="candidate 1"):
        aggregate(params, {1: _change(5, [0], [1.0])})


def test_the_aggregate_is_reproducible_bit_for_bit() -> None:
    rng = SeededDraws(0)
    params = rng.normal(size=1000).astype(np.float32)
    changes = {u: top_changes(rng.normal(size=1000), 0.1) for u in range(1, 6)}
    first = aggregate(params, changes)
    again = aggregate(params.copy(), {u: changes[u] for u in (5, 2, 4, 1, 3)})
    assert first.tobytes() == again.tobytes()


def test_the_macro_f_score_averages_over_classes() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert macro_f_score(labels, labels) == 1.0
    # class 0: P = 1, R = 0.5, F = 2/3; class 1: P = 0.5, R = 1, F = 2/3
    assert macro_f_score(labels, np.array([0, 0, 1, 1, 1, 1])) == pytest.approx(2 / 3)
    assert macro_f_score(labels, np.zeros(6, dtype=np.int64)) == pytest.approx((0.8 + 0) / 2)
    with pytest.raises(FairbusError):
        macro_f_score(labels, labels[:3])
    with pytest.raises(FairbusError):
        macro_f_score(np.array([]), np.array([]))
