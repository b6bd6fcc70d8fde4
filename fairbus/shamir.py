"""Shamir secret sharing of whole vectors over GF(p), p = 2^31 - 1.

Every element of the secret vector gets its own random polynomial of degree t - 1;
all polynomials are evaluated at once with numpy. Share ``j`` is the evaluation at
x = j (1-based), so shares of different secrets at the same x add up to a share of
the sum of the secrets: the additive homomorphism Algorithm 3 (line 7) relies on.

No Python Shamir package works on 582k-element vectors in milliseconds (they loop per
element over Python ints), so the vectorized kernels are written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import lcm

import numpy as np

from fairbus import field
from fairbus.csprng import expand_field, new_seed, substream_seed
from fairbus.errors import (
    DuplicateShareError,
    MismatchedShareError,
    ShamirError,
    TooFewSharesError,
)
from fairbus.field import FieldVector, P

_U64_LIMIT = 2**64


@dataclass(frozen=True, eq=False)
class Share:
    """One share: the evaluation point ``x`` and the polynomial values there."""

    x: int
    values: FieldVector

    def __post_init__(self) -> None:
        if not 1 <= self.x < P:
            raise ShamirError(f"share point x must be in 1..p-1, got {self.x}")


def share(secret: FieldVector, n: int, t: int, *, seed: bytes | None = None) -> list[Share]:
    """Split ``secret`` into ``n`` shares (x = 1..n), any ``t`` of which reconstruct it.

    The t - 1 coefficient vectors are expanded from ``seed`` (a fresh CSPRNG seed when
    omitted); give a seed only to reproduce a run, never reuse one across secrets.
    """
    if not 1 <= t <= n:
        raise ShamirError(f"need 1 <= t <= n, got t={t}, n={n}")
    if n >= P:
        raise ShamirError(f"n must be < p, got {n}")
    field.check_field(secret, name="secret")
    seed = new_seed() if seed is None else seed
    coefficients = [
        expand_field(substream_seed(seed, b"coef%d" % k), secret.shape[0]).astype(np.uint64)
        for k in range(1, t)
    ]
    shares: list[Share] = []
    scratch = np.empty(secret.shape, dtype=np.uint64)
    for x in range(1, n + 1):
        powers = [pow(x, k, P) for k in range(1, t)]
        if (P - 1) * (1 + sum(powers)) < _U64_LIMIT:
            # Small x: Σ_k c_k · x^k fits in uint64 unreduced; reduce once at the end.
            acc = secret.astype(np.uint64)
            for coef, xk in zip(coefficients, powers, strict=True):
                np.multiply(coef, np.uint64(xk), out=scratch)
                acc += scratch
            shares.append(Share(x, field.reduce64(acc)))
        else:
            value = secret.copy()
            for coef, xk in zip(coefficients, powers, strict=True):
                value = field.add(value, field.reduce64(coef * np.uint64(xk)))
            shares.append(Share(x, value))
    return shares


def _check_compatible(shares: Sequence[Share]) -> int:
    if not shares:
        raise TooFewSharesError("no shares given")
    length = shares[0].values.shape[0]
    for s in shares:
        if s.values.dtype != np.uint32 or s.values.ndim != 1:
            raise MismatchedShareError(f"share at x={s.x} is not a 1-D uint32 vector")
        if s.values.shape[0] != length:
            raise MismatchedShareError(
                f"share at x={s.x} has {s.values.shape[0]} elements, expected {length}"
            )
    return int(length)


def add_shares(shares: Sequence[Share]) -> Share:
    """Add shares of different secrets taken at the same point (Alg. 3, line 7)."""
    _check_compatible(shares)
    xs = {s.x for s in shares}
    if len(xs) != 1:
        raise MismatchedShareError(f"shares to add must share one point x, got {sorted(xs)}")
    for s in shares:
        field.check_field(s.values, name=f"share at x={s.x}")
    return Share(shares[0].x, field.sum_vectors([s.values for s in shares]))


def lagrange_weights_at_zero(xs: Sequence[int]) -> tuple[list[int], int]:
    """Integer weights w_j and a denominator L with λ_j(0) = w_j / L exactly.

    For small points the Lagrange basis at 0 is a ratio of small integers, so
    reconstruction can accumulate Σ w_j · s_j in uint64 and do one modular
    multiplication by L⁻¹ instead of one per share.
    """
    lambdas: list[Fraction] = []
    for j, xj in enumerate(xs):
        lam = Fraction(1)
        for m, xm in enumerate(xs):
            if m != j:
                lam *= Fraction(xm, xm - xj)
        lambdas.append(lam)
    denominator = lcm(*(lam.denominator for lam in lambdas))
    return [int(lam * denominator) for lam in lambdas], denominator


def reconstruct(shares: Sequence[Share], t: int) -> FieldVector:
    """Recover the secret from at least ``t`` shares by Lagrange interpolation at 0.

    With more than ``t`` shares the ``t`` with the smallest points are used.
    Raises :class:`TooFewSharesError`, :class:`DuplicateShareError` or
    :class:`MismatchedShareError` rather than returning a wrong secret.
    """
    if t < 1:
        raise ShamirError(f"threshold t must be >= 1, got {t}")
    _check_compatible(shares)
    xs_all = [s.x for s in shares]
    if len(set(xs_all)) != len(xs_all):
        dup = sorted({x for x in xs_all if xs_all.count(x) > 1})
        raise DuplicateShareError(f"duplicate share points x={dup}")
    if len(shares) < t:
        raise TooFewSharesError(f"need {t} shares to reconstruct, got {len(shares)}")
    chosen = sorted(shares, key=lambda s: s.x)[:t]
    for s in chosen:
        field.check_field(s.values, name=f"share at x={s.x}")
    weights, denominator = lagrange_weights_at_zero([s.x for s in chosen])
    positive = sum(w for w in weights if w > 0)
    negative = -sum(w for w in weights if w < 0)
    if max(positive, negative) * (P - 1) < _U64_LIMIT:
        pos = np.zeros(chosen[0].values.shape, dtype=np.uint64)
        negacc = np.zeros_like(pos)
        for s, w in zip(chosen, weights, strict=True):
            target = pos if w > 0 else negacc
            target += s.values.astype(np.uint64) * np.uint64(abs(w))
        result = field.sub(field.reduce64(pos), field.reduce64(negacc))
        return result if denominator == 1 else field.mul_scalar(result, field.inverse(denominator))
    inv_den = field.inverse(denominator)
    terms = [field.mul_scalar(s.values, w * inv_den) for s, w in zip(chosen, weights, strict=True)]
    return field.sum_vectors(terms)
