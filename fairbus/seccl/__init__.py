"""SecCL (``../shared/papers/002_095742f01fca1438.txt``): selective sharing, peer
evaluation with the macro F-score and the consensus contract's Borda election. Pure
numpy (and scikit-learn for the F-score); no I/O.

- :mod:`fairbus.seccl.sparse`: the type (a) message's content, the fraction θ of a
  participant's parameter changes with the largest magnitude ("Message Interaction
  Protocol", Participant-Server Interaction), and applying changes to a model;
- :mod:`fairbus.seccl.fscore`: the evaluation value of a type (b) message, the macro
  F-score ("Experimental Evaluation": "the F-score is the average of each class");
- :mod:`fairbus.seccl.election`: the consensus contract's multi-winner election with
  the Borda positional scoring function ("Consensus among Participants");
- :mod:`fairbus.seccl.aggregate`: the server's update of the global model with the
  candidates' changes only (the paper leaves the method open: "e.g., parameter
  averaging", "Security against Collusions").

Every function here is deterministic on every machine (elementwise float32 numpy
operations in a fixed order, integer points), so the ledger re-derives the election and
the new global model bit for bit (:mod:`fairbus.ledger.seccl`).
"""

from __future__ import annotations

from fairbus.seccl.aggregate import aggregate
from fairbus.seccl.election import Election, candidate_count, elect
from fairbus.seccl.fscore import macro_f_score
from fairbus.seccl.sparse import SparseChange, apply_change, shared_count, top_changes

DEFAULT_THETA = 0.1
"""θ, the fraction of parameter changes a participant shares (the paper's 0.1)."""
DEFAULT_CANDIDATE_SHARE = 0.2
"""λ, the fraction of participants elected as candidates (the paper's Fig. 5: 0.2)."""

__all__ = [
    "DEFAULT_CANDIDATE_SHARE",
    "DEFAULT_THETA",
    "Election",
    "SparseChange",
    "aggregate",
    "apply_change",
    "candidate_count",
    "elect",
    "macro_f_score",
    "shared_count",
    "top_changes",
]
