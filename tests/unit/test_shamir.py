import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fairbus import shamir
from fairbus.csprng import expand_field, new_seed, random_field
from fairbus.errors import (
    DuplicateShareError,
    FieldRangeError,
    MismatchedShareError,
    ShamirError,
    TooFewSharesError,
)
from fairbus.field import P
from fairbus.shamir import Share


@st.composite
def sharing_case(draw: st.DrawFn) -> tuple[int, int, int, list[int]]:
    n = draw(st.integers(3, 7))
    t = draw(st.integers(1, n))
    length = draw(st.integers(1, 64))
    subset = draw(st.permutations(range(n)))[: draw(st.integers(t, n))]
    return n, t, length, subset


@given(sharing_case())
def test_any_t_shares_reconstruct(case: tuple[int, int, int, list[int]]) -> None:
    n, t, length, subset = case
    secret = random_field(length)
    shares = shamir.share(secret, n, t)
    assert [s.x for s in shares] == list(range(1, n + 1))
    np.testing.assert_array_equal(shamir.reconstruct([shares[k] for k in subset], t), secret)


@given(sharing_case())
def test_fewer_than_t_shares_do_not_reveal_the_secret(
    case: tuple[int, int, int, list[int]],
) -> None:
    n, t, length, _ = case
    if t < 2:
        return
    secret = random_field(max(length, 16))
    shares = shamir.share(secret, n, t)
    # interpolating t-1 shares as if t-1 were the threshold gives an unrelated vector
    guess = shamir.reconstruct(shares[: t - 1], t - 1)
    assert not np.array_equal(guess, secret)


@given(st.integers(3, 7), st.data())
def test_share_addition_is_a_share_of_the_sum(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    secrets = [random_field(20) for _ in range(n)]
    dealt = [shamir.share(s, n, t) for s in secrets]
    summed = [shamir.add_shares([d[k] for d in dealt]) for k in range(n)]
    expected = sum(s.astype(np.int64) for s in secrets) % P
    np.testing.assert_array_equal(shamir.reconstruct(summed, t), expected)


def test_large_points_take_the_general_path() -> None:
    secret = random_field(100)
    poly_seed = new_seed()
    shares = shamir.share(secret, 5, 3, seed=poly_seed)
    coefs = [expand_field(shamir.substream_seed(poly_seed, b"coef%d" % k), 100) for k in (1, 2)]

    def at(x: int) -> Share:
        vals = [
            (int(s) + int(c1) * x + int(c2) * x * x) % P
            for s, c1, c2 in zip(secret, *coefs, strict=False)
        ]
        return Share(x, np.array(vals, dtype=np.uint32))

    # the small-x shares agree with a direct evaluation of the same polynomial
    np.testing.assert_array_equal(shares[4].values, at(5).values)
    far = [at(P - 1), at(P - 2), at(123456789)]
    np.testing.assert_array_equal(shamir.reconstruct(far, 3), secret)


def test_seeded_sharing_is_deterministic() -> None:
    secret = random_field(10)
    seed = new_seed()
    a = shamir.share(secret, 4, 3, seed=seed)
    b = shamir.share(secret, 4, 3, seed=seed)
    assert all(np.array_equal(x.values, y.values) for x, y in zip(a, b, strict=False))


def test_bad_inputs_are_refused_clearly() -> None:
    secret = random_field(8)
    shares = shamir.share(secret, 5, 3)
    with pytest.raises(TooFewSharesError, match="need 3"):
        shamir.reconstruct(shares[:2], 3)
    with pytest.raises(DuplicateShareError, match=r"x=\[2\]"):
        shamir.reconstruct([shares[1], shares[1], shares[2]], 3)
    short = Share(4, shares[3].values[:5])
    with pytest.raises(MismatchedShareError, match="5 elements"):
        shamir.reconstruct([shares[0], shares[1], short], 3)
    with pytest.raises(MismatchedShareError, match="one point"):
        shamir.add_shares([shares[0], shares[1]])
    with pytest.raises(ShamirError):
        shamir.share(secret, 3, 4)
    with pytest.raises(ShamirError):
        Share(0, secret)
    bad = secret.copy()
    bad[3] = P
    with pytest.raises(FieldRangeError):
        shamir.share(bad, 3, 2)
    with pytest.raises(TooFewSharesError):
        shamir.reconstruct([], 1)


def test_lagrange_weights_are_exact_integers_over_a_common_denominator() -> None:
    weights, den = shamir.lagrange_weights_at_zero([1, 2, 3])
    assert (weights, den) == ([3, -3, 1], 1)
    weights, den = shamir.lagrange_weights_at_zero([2, 4, 5])
    assert sum(weights) == den  # Σ λ_j = 1
