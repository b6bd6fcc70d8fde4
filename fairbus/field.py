"""Arithmetic in GF(p), p = 2^31 - 1, over numpy vectors, and the fixed-point codec.

Elements are stored as ``uint32`` so a masked model is exactly as large as its
float32 plaintext (the paper's "no expansion", Table 2). Products are formed in
``uint64`` (< 2^62) and reduced with the Mersenne fold ``x = (x & p) + (x >> 31)``,
which is ~6x faster than numpy's ``%`` on this machine and never overflows.

numpy has no modular arithmetic of its own and galois-style libraries go through
object arrays or lookup tables that are far slower for a 31-bit Mersenne prime,
so the handful of kernels below are written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from fairbus.errors import FieldError, FieldRangeError

P: int = 2**31 - 1
"""The field modulus, a Mersenne prime."""

FieldVector: TypeAlias = npt.NDArray[np.uint32]

_P32 = np.uint32(P)
_P64 = np.uint64(P)
_SHIFT = np.uint64(31)
_SIGN32 = np.uint32(31)
_NEG_OFFSET = np.uint32(2**32 - P)
_HALF32 = np.uint32((P - 1) // 2)


def check_field(vector: npt.NDArray[Any], *, name: str = "vector") -> FieldVector:
    """Return ``vector`` if it is a 1-D uint32 array of elements < p, else raise.

    The error names the first offending index and its value.
    """
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.ndim != 1:
        dtype = getattr(vector, "dtype", type(vector).__name__)
        raise FieldError(f"{name} must be a 1-D uint32 array of field elements, got {dtype}")
    bad = np.flatnonzero(vector >= _P32)
    if bad.size:
        i = int(bad[0])
        raise FieldRangeError(
            f"{name}[{i}] = {int(vector[i])} is not a field element (must be < p = {P})",
            index=i,
            value=float(vector[i]),
        )
    return vector


def reduce64(x: npt.NDArray[np.uint64]) -> FieldVector:
    """Reduce any uint64 vector modulo p into canonical uint32 elements. ``x`` is clobbered."""
    # Two folds bring any 64-bit value below p + 8; one conditional subtraction finishes.
    hi = x >> _SHIFT
    x &= _P64
    x += hi
    np.right_shift(x, _SHIFT, out=hi)
    x &= _P64
    x += hi
    out = x.astype(np.uint32)
    np.minimum(out, out - _P32, out=out)
    return out


def add(a: FieldVector, b: FieldVector) -> FieldVector:
    """(a + b) mod p; both inputs canonical, so the uint32 sum cannot overflow."""
    s = a + b
    np.minimum(s, s - _P32, out=s)
    return s


def sub(a: FieldVector, b: FieldVector) -> FieldVector:
    """(a - b) mod p."""
    s = a + (_P32 - b)
    np.minimum(s, s - _P32, out=s)
    return s


def neg(a: FieldVector) -> FieldVector:
    """(-a) mod p."""
    s = _P32 - a
    np.minimum(s, s - _P32, out=s)
    return s


def mul_scalar(a: FieldVector, c: int) -> FieldVector:
    """(a * c) mod p for a Python integer scalar ``c``."""
    return reduce64(a.astype(np.uint64) * np.uint64(c % P))


def mul(a: FieldVector, b: FieldVector) -> FieldVector:
    """Element-wise (a * b) mod p."""
    return reduce64(a.astype(np.uint64) * b.astype(np.uint64))


def sum_vectors(vectors: list[FieldVector] | tuple[FieldVector, ...]) -> FieldVector:
    """Σ vectors mod p.

    Pairwise uint32 additions with a conditional subtraction: for the handful of
    uploads in a group this is ~10x faster than widening to uint64 and folding.
    """
    if not vectors:
        raise FieldError("cannot sum an empty list of field vectors")
    acc = vectors[0].copy()
    for v in vectors[1:]:
        if v.shape != acc.shape:
            raise FieldError(f"cannot sum vectors of lengths {acc.shape[0]} and {v.shape[0]}")
        acc += v
        np.minimum(acc, acc - _P32, out=acc)
    return acc


def inverse(c: int) -> int:
    """Multiplicative inverse of a non-zero scalar modulo p."""
    c %= P
    if c == 0:
        raise FieldError("0 has no inverse modulo p")
    return pow(c, P - 2, P)


@dataclass(frozen=True)
class FixedPointCodec:
    """Fixed point with ``frac_bits`` fractional bits, embedded in GF(p).

    A real x becomes round(x · 2^f) mod p; negative values wrap to the top half of
    the field. A sum of ``summands`` encodings decodes correctly as long as every
    encoding satisfies |round(x · 2^f)| · summands ≤ (p - 1) / 2, which
    :meth:`encode` checks, naming the first value that breaks it.
    """

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 24:
            raise FieldError(f"frac_bits must be in 0..24, got {self.frac_bits}")

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    def max_abs(self, summands: int = 1) -> float:
        """The largest |x| that :meth:`encode` accepts when ``summands`` encodings are summed."""
        return self._limit(summands) / self.scale

    def _limit(self, summands: int) -> int:
        if summands < 1:
            raise FieldError(f"summands must be >= 1, got {summands}")
        return ((P - 1) // 2) // summands

    def encode(self, values: npt.NDArray[np.floating], *, summands: int = 1) -> FieldVector:
        """Encode a real vector (float32 or float64) into field elements.

        Raises :class:`FieldRangeError` for NaN, ±inf or a value too large for a sum
        of ``summands`` encodings; nothing is returned in that case.
        """
        flat = np.asarray(values).reshape(-1)
        if flat.dtype != np.float32:
            if not np.issubdtype(flat.dtype, np.floating):
                raise FieldError(f"encode takes a float array, got {flat.dtype}")
            # float64 input: round in float64, where x · 2^f is still exact.
            scaled64 = np.rint(flat.astype(np.float64) * self.scale)
            self._check_range(flat, scaled64, summands)
            return self._wrap(scaled64.astype(np.int64).astype(np.int32))
        # x · 2^f is exact in float32 (a power-of-two scale), and rint of a float32 is an
        # integer-valued float32 exactly, so this is bit-identical to the float64 path.
        scaled = np.rint(flat * np.float32(self.scale))
        self._check_range(flat, scaled, summands)
        return self._wrap(scaled.astype(np.int32))

    def _check_range(
        self,
        original: npt.NDArray[np.floating],
        scaled: npt.NDArray[np.floating],
        summands: int,
    ) -> None:
        limit = self._limit(summands)
        ok = np.abs(scaled) <= limit  # NaN compares False, so NaN and inf are caught here
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            value = float(original[i])
            raise FieldRangeError(
                f"value at index {i} is {value!r}: outside ±{limit / self.scale:.6g}, the range "
                f"a sum of {summands} encodings with {self.frac_bits} fractional bits can hold",
                index=i,
                value=value,
            )

    @staticmethod
    def _wrap(signed: npt.NDArray[np.int32]) -> FieldVector:
        # |signed| < 2^30, so a negative v has its top bit set, and
        # p + v == (2^32 + v) - (2^32 - p) in wrapping uint32 arithmetic.
        u = signed.view(np.uint32)
        return u - (u >> _SIGN32) * _NEG_OFFSET

    def decode(self, field_sum: FieldVector) -> npt.NDArray[np.float64]:
        """Decode a field vector that is a sum of encodings back to reals (float64, exact)."""
        return self._signed(field_sum).astype(np.float64) / self.scale

    @staticmethod
    def _signed(field_sum: FieldVector) -> npt.NDArray[np.int32]:
        # Elements above (p-1)/2 stand for v - p; in wrapping uint32 that is v + (2^32 - p).
        upper = field_sum > _HALF32
        return (field_sum + upper * _NEG_OFFSET).view(np.int32)

    def decode_mean(self, field_sum: FieldVector, count: int) -> npt.NDArray[np.float32]:
        """Decode the sum of ``count`` encodings and divide by ``count`` (Alg. 5's agg())."""
        if count < 1:
            raise FieldError(f"count must be >= 1, got {count}")
        # One correctly rounded division by the exact float count · 2^f.
        return (self._signed(field_sum).astype(np.float64) / (count * self.scale)).astype(
            np.float32
        )
