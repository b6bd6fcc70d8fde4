"""Algorithms 4 and 5 of the fairness paper: masking and aggregate decryption.

Algorithm 4, line 1: m_gi ← m_i + sk_gi, computed in GF(p) on the fixed-point
encoding of m_i. Algorithm 5, line 1: m_g ← agg(m_gi, i ∈ I_g); because
Σ_i sk_gi ≡ 0 (Eq. 1) the field sum of the masked uploads *is* the field sum of
the plaintext encodings, bit for bit, and agg() divides it by |I_g| (Eq. 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fairbus import field
from fairbus.errors import FieldError
from fairbus.field import FieldVector, FixedPointCodec


def mask(encoding: FieldVector, key: FieldVector) -> FieldVector:
    """Alg. 4, line 1: add the negotiated key to an encoded model (mod p)."""
    if encoding.shape != key.shape:
        raise FieldError(f"model has {encoding.shape[0]} parameters but the key has {key.shape[0]}")
    return field.add(encoding, key)


def mask_model(
    model: npt.NDArray[np.floating],
    key: FieldVector,
    codec: FixedPointCodec,
    group_size: int,
) -> FieldVector:
    """Encode a float model for a sum of ``group_size`` uploads, then mask it (Alg. 4)."""
    return mask(codec.encode(model, summands=group_size), key)


@dataclass(frozen=True, eq=False)
class GroupAggregate:
    """The result of Alg. 5 for one group: the exact field sum and the decoded mean."""

    field_sum: FieldVector
    mean: npt.NDArray[np.float32]
    count: int


def aggregate_decrypt(masked: Sequence[FieldVector], codec: FixedPointCodec) -> GroupAggregate:
    """Alg. 5, line 1: sum every member's masked upload and decode the mean.

    All uploads of the group must be present: a missing one leaves its key in the
    sum and the result is noise, which is why a dropout voids the group.
    """
    if len(masked) < 1:
        raise FieldError("aggregate_decrypt needs at least one upload")
    for k, m in enumerate(masked):
        field.check_field(m, name=f"upload {k}")
    total = field.sum_vectors(list(masked))
    return GroupAggregate(total, codec.decode_mean(total, len(masked)), len(masked))
