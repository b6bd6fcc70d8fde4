"""The content of SecCL's type (a) message: the parameter changes a participant shares.

"When the local training is completed, P asynchronously select partial parameters with
the largest changes to upload (i.e., Δθ_i in Fig. 3) and send a type (a) message to the
server" (SecCL, "Message Interaction Protocol"); the fraction of the sharing parameters
is θ = 0.1 in the experiments ("Experimental Evaluation").

Here: the change is Δ = trained − global (float32); a participant shares the
:func:`shared_count` (k = the nearest whole number to θ·n, at least 1) coordinates of
largest |Δ|, ties broken by the lower index, as a :class:`SparseChange` (ascending
indices and their float32 values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fairbus.errors import SecclError

Indices = npt.NDArray[np.int64]
Values = npt.NDArray[np.float32]


def _fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SecclError(f"{what} must be a number in (0, 1], not {value!r}")
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise SecclError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


def shared_count(theta: float, length: int) -> int:
    """k, how many of ``length`` parameter changes a participant shares: the nearest whole
    number to θ·``length`` (halves up), at least 1. IEEE arithmetic, so every machine
    computes the same k (θ = 0.1 of 5,000 is 500, not the 501 a ceiling of
    500.00000000000006 would give)."""
    theta = _fraction(theta, "θ (the shared fraction)")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise SecclError(f"a model has at least one parameter, not {length!r}")
    return max(1, min(length, math.floor(theta * length + 0.5)))


@dataclass(frozen=True, eq=False)
class SparseChange:
    """Changes to some coordinates of a ``length``-parameter model: ``indices`` strictly
    ascending in [0, ``length``), ``values`` their float32 changes, all finite. Checked on
    construction (:class:`~fairbus.errors.SecclError`), so one made from received bytes
    is safe to apply."""

    length: int
    indices: Indices
    values: Values

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise SecclError(f"a change to a model of {self.length!r} parameters")
        idx, val = self.indices, self.values
        if not isinstance(idx, np.ndarray) or idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise SecclError("a change's indices must be a 1-D integer array")
        if not isinstance(val, np.ndarray) or val.ndim != 1 or val.dtype != np.float32:
            raise SecclError("a change's values must be a 1-D float32 array")
        if idx.size != val.size:
            raise SecclError(f"a change has {idx.size} indices and {val.size} values")
        if idx.size == 0:
            raise SecclError("a change shares at least one parameter")
        if int(idx[0]) < 0 or int(idx[-1]) >= self.length:
            raise SecclError(f"a change's indices must lie in [0, {self.length})")
        if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise SecclError("a change's indices must be strictly ascending")
        bad = np.flatnonzero(~np.isfinite(val))
        if bad.size:
            raise SecclError(f"a change's value for index {int(idx[bad[0]])} is not finite")

    @property
    def count(self) -> int:
        return int(self.indices.size)

    def to_dense(self) -> Values:
        """The change as a full float32 vector (zero where nothing is shared)."""
        dense = np.zeros(self.length, dtype=np.float32)
        dense[self.indices] = self.values
        return dense


def top_changes(delta: npt.NDArray[np.floating], theta: float) -> SparseChange:
    """The :func:`shared_count` entries of ``delta`` with the largest magnitude (ties: the
    lower index first), as float32 (SecCL's Δθ_i). Refuses a non-finite change."""
    vector = np.asarray(delta)
    if vector.ndim != 1 or vector.dtype.kind != "f":
        raise SecclError("a parameter change must be a 1-D float vector")
    vector = vector.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(vector))
    if bad.size:
        raise SecclError(f"the parameter change at index {int(bad[0])} is not finite")
    k = shared_count(theta, int(vector.size))
    # A stable sort of −|Δ| keeps equal magnitudes in index order: the tie-break.
    order = np.argsort(-np.abs(vector), kind="stable")[:k]
    indices = np.sort(order).astype(np.int64)
    return SparseChange(int(vector.size), indices, vector[indices].copy())


def apply_change(params: npt.NDArray[np.float32], change: SparseChange) -> Values:
    """``params`` with ``change`` added (float32): the model a participant evaluates for
    another's upload (SecCL: "evaluate p_i's uploaded parameter changes")."""
    base = np.asarray(params)
    if base.ndim != 1 or base.size != change.length:
        raise SecclError(f"a change to {change.length} parameters, applied to {base.size}")
    out = base.astype(np.float32, copy=True)
    out[change.indices] += change.values
    return out
