"""What happened in one round: :class:`RoundRecord`, one line of ``rounds.jsonl``.

The simulator and the networked provider write the same records, so the plots, the
benches and ``fairbus demo`` read either.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fairbus.protocol.events import RoundDone

TIMING_PHASES = (
    "grouping",
    "training",
    "negotiation",
    "upload",
    "aggregation",
    "evaluation",
    "detection",
    "ledger",
)
"""What a round's time is spent on ("round": the whole, where measured)."""


@dataclass
class RoundRecord:
    round: int
    attempts: int
    global_accuracy: float
    groups: list[dict[str, Any]]
    tau: float | None
    scores: dict[int, dict[str, float | None]]
    key_users: list[int]
    violators: list[int]
    excluded: list[int]
    dropped: list[int]
    prior_groups: list[list[int]]
    timings_s: dict[str, float]
    bytes: dict[str, int]
    refusals: list[str] = field(default_factory=list)
    failed: str | None = None
    ledger_height: int | None = None
    """The height of the ledger's last block when the round ended (the simulator's
    in-process ledger, or the block that holds the networked provider's last transaction)."""
    candidates: list[int] = field(default_factory=list)
    """SecCL: the round's elected candidates, in rank order (empty in the fairness mode)."""
    borda: dict[int, int] = field(default_factory=dict)
    """SecCL: every uploader's total Borda points."""
    level: float | None = None
    """What a clean group contributed this round (Alg. 6 with issue 13's contribution
    test); each group's ``contribution`` over it is what the test compared."""
    weights: dict[int, float] = field(default_factory=dict)
    """Each user's fitted weight θ (about 1 honest, 0 free-rider, below 0 poisoner)."""
    # not serialized: for tests that check exactness against the plaintext
    local_models: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict, repr=False)
    field_sums: dict[int, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        skip = {"local_models", "field_sums"}
        return {k: v for k, v in vars(self).items() if k not in skip}

    @classmethod
    def empty(cls, round: int, attempts: int = 0) -> RoundRecord:
        """A record to fill in as the round goes."""
        return cls(round, attempts, 0.0, [], None, {}, [], [], [], [], [],
                   dict.fromkeys(TIMING_PHASES, 0.0), Counter())  # fmt: skip

    @classmethod
    def from_json(cls, line: dict[str, Any]) -> RoundRecord:
        """A record read back from ``rounds.jsonl`` (JSON keys are strings)."""
        record = cls(**line)
        record.scores = {int(u): s for u, s in record.scores.items()}
        record.borda = {int(u): p for u, p in record.borda.items()}
        record.weights = {int(u): w for u, w in record.weights.items()}
        return record


def record_round(record: RoundRecord, done: RoundDone) -> None:
    """Fill ``record`` from the provider's :class:`RoundDone` (the simulator's and the
    networked provider's records are the same shape, so the plots serve both)."""
    record.attempts = done.attempts
    record.groups = [
        {
            "gid": g.gid,
            "kind": g.kind,
            "members": list(g.members),
            "focus": g.focus,
            "accuracy": g.accuracy,
            "contribution": g.contribution,
            "scored": g.scored,
        }
        for g in done.groups
    ]
    record.level = done.level
    record.weights = dict(done.weights)
    record.field_sums = {g.gid: g.field_sum for g in done.groups}
    record.tau = done.tau
    record.scores = {
        u: {"score": a.score, "conf_lo": a.conf_lo, "conf_up": a.conf_up}
        for u, a in done.assessments.items()
    }
    record.key_users = sorted(done.key_users)
    record.violators = sorted(done.violators)
    record.excluded = sorted(done.excluded)
    record.dropped = sorted(done.dropped)
