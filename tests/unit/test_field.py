import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fairbus import field
from fairbus.errors import FieldError, FieldRangeError
from fairbus.field import FixedPointCodec, P

elements = hnp.arrays(np.uint32, st.integers(1, 200), elements=st.integers(0, P - 1))


@given(elements, elements)
def test_add_sub_mul_match_python_integers(a: np.ndarray, b: np.ndarray) -> None:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ai, bi = [int(v) for v in a], [int(v) for v in b]
    assert field.add(a, b).tolist() == [(x + y) % P for x, y in zip(ai, bi, strict=False)]
    assert field.sub(a, b).tolist() == [(x - y) % P for x, y in zip(ai, bi, strict=False)]
    assert field.mul(a, b).tolist() == [(x * y) % P for x, y in zip(ai, bi, strict=False)]
    assert field.neg(a).tolist() == [(-x) % P for x in ai]


@given(hnp.arrays(np.uint64, st.integers(1, 100), elements=st.integers(0, 2**64 - 1)))
def test_reduce64_is_exact_for_every_uint64(x: np.ndarray) -> None:
    expected = [int(v) % P for v in x]
    assert field.reduce64(x.copy()).tolist() == expected


@given(st.lists(elements, min_size=1, max_size=8))
def test_sum_vectors(vectors: list[np.ndarray]) -> None:
    n = min(len(v) for v in vectors)
    vectors = [v[:n] for v in vectors]
    expected = [sum(int(v[k]) for v in vectors) % P for k in range(n)]
    assert field.sum_vectors(vectors).tolist() == expected


def test_inverse() -> None:
    for c in (1, 2, 3, 7, P - 1, 123456789):
        assert c * field.inverse(c) % P == 1
    with pytest.raises(FieldError):
        field.inverse(P)


def test_check_field_names_index_and_value() -> None:
    v = np.array([0, 5, P, 7], dtype=np.uint32)
    with pytest.raises(FieldRangeError) as info:
        field.check_field(v)
    assert info.value.index == 2 and info.value.value == P
    assert "[2]" in str(info.value)
    with pytest.raises(FieldError):
        field.check_field(np.zeros(3, dtype=np.int64))  # type: ignore[arg-type]


@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 300),
        elements=st.floats(-1000, 1000, width=32, allow_nan=False),
    ),
    st.integers(1, 7),
    st.integers(0, 20),
)
def test_encode_decode_roundtrip(x: np.ndarray, summands: int, frac_bits: int) -> None:
    codec = FixedPointCodec(frac_bits)
    if np.abs(x).max() > codec.max_abs(summands):
        with pytest.raises(FieldRangeError):
            codec.encode(x, summands=summands)
        return
    enc = codec.encode(x, summands=summands)
    assert enc.dtype == np.uint32 and (enc < P).all()
    expected = np.rint(x.astype(np.float64) * 2.0**frac_bits) / 2.0**frac_bits
    np.testing.assert_array_equal(codec.decode(enc), expected)
    # float64 input gives the same field elements as float32
    np.testing.assert_array_equal(codec.encode(x.astype(np.float64), summands=summands), enc)


@given(
    st.lists(
        hnp.arrays(np.float32, 50, elements=st.floats(-100, 100, width=32)),
        min_size=1,
        max_size=7,
    )
)
def test_decoding_a_sum_of_encodings(models: list[np.ndarray]) -> None:
    codec = FixedPointCodec()
    n = len(models)
    total = field.sum_vectors([codec.encode(m, summands=n) for m in models])
    expected = sum(np.rint(m.astype(np.float64) * 65536) for m in models) / 65536
    np.testing.assert_array_equal(codec.decode(total), expected)
    np.testing.assert_array_equal(codec.decode_mean(total, n), (expected / n).astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6, -40000.0])
def test_encode_refuses_unrepresentable_values_naming_them(bad: float) -> None:
    x = np.zeros(10, dtype=np.float32)
    x[6] = bad
    with pytest.raises(FieldRangeError) as info:
        FixedPointCodec().encode(x, summands=3)
    assert info.value.index == 6
    assert "index 6" in str(info.value)
    assert np.isnan(info.value.value) if np.isnan(bad) else info.value.value == np.float32(bad)


def test_range_limit_depends_on_summands() -> None:
    codec = FixedPointCodec()
    edge = np.array([codec.max_abs(3)], dtype=np.float64)
    codec.encode(edge, summands=3)
    with pytest.raises(FieldRangeError):
        codec.encode(edge, summands=4)
    with pytest.raises(FieldError):
        FixedPointCodec(frac_bits=40)
    with pytest.raises(FieldError):
        codec.encode(np.array([1, 2, 3]))  # type: ignore[arg-type]
