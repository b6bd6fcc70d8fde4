"""Algorithms 3-5: keys sum to zero, masked uploads decrypt to the exact group mean."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fairbus import field, keyneg, masking
from fairbus.errors import FieldError, MismatchedShareError, ShamirError
from fairbus.field import FixedPointCodec


@st.composite
def group_case(draw: st.DrawFn) -> tuple[keyneg.GroupKeying, list[np.ndarray]]:
    n = draw(st.integers(3, 7))
    t = draw(st.integers(1, n))
    members = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n, unique=True))
    d = draw(st.integers(1, 300))
    models = [
        draw(hnp.arrays(np.float32, d, elements=st.floats(-50, 50, width=32))) for _ in range(n)
    ]
    return keyneg.GroupKeying.of(members, t), models


@given(group_case())
def test_masks_sum_to_zero_and_group_mean_is_exact(
    case: tuple[keyneg.GroupKeying, list[np.ndarray]],
) -> None:
    keying, models = case
    codec = FixedPointCodec()
    d = len(models[0])
    keys = keyneg.negotiate_in_process(keying, d)
    assert keyneg.keys_sum_to_zero(list(keys.values()))
    masked = [
        masking.mask_model(m, keys[u], codec, keying.size)
        for u, m in zip(keying.members, models, strict=True)
    ]
    result = masking.aggregate_decrypt(masked, codec)
    plain = field.sum_vectors([codec.encode(m, summands=keying.size) for m in models])
    np.testing.assert_array_equal(result.field_sum, plain)  # bit for bit in the field
    expected = sum(np.rint(m.astype(np.float64) * 65536) for m in models) / 65536 / keying.size
    np.testing.assert_array_equal(result.mean, expected.astype(np.float32))


def test_each_step_of_algorithm_3_by_hand() -> None:
    keying = keyneg.GroupKeying.of([9, 4, 6])
    assert keying.members == (4, 6, 9) and keying.threshold == 3
    assert [keying.point_of(u) for u in keying.members] == [1, 2, 3]
    d = 1000
    dealt = {u: keyneg.deal_shares(keying, d) for u in keying.members}
    summed = {
        u: keyneg.sum_received(keying, u, {j: dealt[j].shares[u] for j in keying.members})
        for u in keying.members
    }
    s_g = keyneg.recover_group_sum(keying, summed)
    expected = sum(dealt[u].rand.astype(np.int64) for u in keying.members) % field.P
    np.testing.assert_array_equal(s_g, expected)
    inv3 = field.inverse(3)
    for u in keying.members:
        sk = keyneg.derive_key(dealt[u].rand, s_g, 3)
        by_hand = (dealt[u].rand.astype(np.int64) - s_g.astype(np.int64) * inv3) % field.P
        np.testing.assert_array_equal(sk, by_hand)


def test_with_threshold_below_group_size_any_t_summed_shares_suffice() -> None:
    keying = keyneg.GroupKeying.of([1, 2, 3, 4, 5], threshold=3)
    dealt = {u: keyneg.deal_shares(keying, 50) for u in keying.members}
    summed = {
        u: keyneg.sum_received(keying, u, {j: dealt[j].shares[u] for j in keying.members})
        for u in keying.members
    }
    full = keyneg.recover_group_sum(keying, summed)
    partial = keyneg.recover_group_sum(keying, {u: summed[u] for u in (2, 4, 5)})
    np.testing.assert_array_equal(full, partial)


def test_fresh_randomness_every_negotiation() -> None:
    keying = keyneg.GroupKeying.of([1, 2, 3])
    a = keyneg.negotiate_in_process(keying, 64)
    b = keyneg.negotiate_in_process(keying, 64)
    assert not np.array_equal(a[1], b[1])


def test_missing_or_misplaced_shares_are_refused() -> None:
    keying = keyneg.GroupKeying.of([1, 2, 3])
    dealt = {u: keyneg.deal_shares(keying, 10) for u in keying.members}
    with pytest.raises(MismatchedShareError, match=r"missing \[3\]"):
        keyneg.sum_received(keying, 1, {j: dealt[j].shares[1] for j in (1, 2)})
    with pytest.raises(MismatchedShareError, match="point"):
        keyneg.sum_received(keying, 1, {j: dealt[j].shares[2] for j in (1, 2, 3)})
    summed = {
        u: keyneg.sum_received(keying, u, {j: dealt[j].shares[u] for j in keying.members})
        for u in keying.members
    }
    with pytest.raises(MismatchedShareError, match="non-members"):
        keyneg.recover_group_sum(keying, {**summed, 7: summed[1]})
    with pytest.raises(ShamirError, match="at least 3"):
        keyneg.GroupKeying.of([1, 2])
    with pytest.raises(ShamirError):
        keyneg.GroupKeying.of([1, 2, 3], threshold=4)


def test_aggregate_decrypt_refuses_mismatched_or_invalid_uploads() -> None:
    codec = FixedPointCodec()
    a = np.zeros(5, dtype=np.uint32)
    with pytest.raises(FieldError):
        masking.aggregate_decrypt([a, np.zeros(4, dtype=np.uint32)], codec)
    with pytest.raises(FieldError):
        masking.aggregate_decrypt([], codec)
    bad = a.copy()
    bad[2] = field.P
    with pytest.raises(FieldError):
        masking.aggregate_decrypt([a, bad], codec)
    with pytest.raises(FieldError):
        masking.mask(a, np.zeros(6, dtype=np.uint32))
