"""The server's update of the global model with the candidates' changes (SecCL,
"Message Interaction Protocol": "At the end of each round of training, the server
receives a list of candidates selected by CSC and updates the global model").

The paper names no formula ("the aggregation method (e.g., parameter averaging)",
"Security against Collusions"). Here, per coordinate, the mean of the changes of the
candidates whose type (a) message includes that coordinate, added to the global model;
a coordinate no candidate shares keeps its value. In float32, elementwise, the
candidates taken in ascending id order: every machine computes the same bytes, so the
ledger re-derives the new global model's hash (:mod:`fairbus.ledger.seccl`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fairbus.errors import SecclError
from fairbus.seccl.sparse import SparseChange


def aggregate(
    global_params: npt.NDArray[np.float32], changes: Mapping[int, SparseChange]
) -> npt.NDArray[np.float32]:
    """The new global model: ``global_params`` plus, per coordinate, the mean of the
    candidates' changes that include it (``changes``: candidate id → its change)."""
    base = np.asarray(global_params)
    if base.ndim != 1 or base.dtype != np.float32:
        raise SecclError("the global model must be a 1-D float32 vector")
    if not changes:
        raise SecclError("an aggregation of no candidates")
    sums = np.zeros(base.size, dtype=np.float32)
    counts = np.zeros(base.size, dtype=np.int64)
    for user in sorted(changes):
        change = changes[user]
        if change.length != base.size:
            raise SecclError(
                f"candidate {user}'s change is to {change.length} parameters, the model "
                f"has {base.size}"
            )
        # indices are distinct within a change, so the fancy += adds each value once
        sums[change.indices] += change.values
        counts[change.indices] += 1
    shared = counts > 0
    out = base.copy()
    out[shared] = base[shared] + sums[shared] / counts[shared].astype(np.float32)
    return out
