"""The consensus contract's election (SecCL, "Consensus among Participants").

"Considering that we choose M candidates, CSC first sorts all evaluation values from
p_i in descending order and selects a subset including M participants of top
evaluation values. Then the scores of the other participants are calculated based on
PSF and their positions in the subset selected by p_i. The total Borda score of a
participant is the accumulative PSF score from all the other participants. Finally, C
should be the subset of P with the greatest total Borda score."

As implemented (:func:`elect`):

- M = :func:`candidate_count`: the nearest whole number to λ·N (halves up), at least 1
  and at most the number of participants that uploaded; λ is the task's candidate share
  and N the round's participants;
- each evaluator's ballot ranks the others' uploads by its evaluation value, highest
  first; equal values rank the lower participant id first;
- Borda points by position in the ballot's top M: M for the first, M − 1 for the
  second, …, 1 for the M-th, 0 below;
- a participant's total is the sum of the points every other participant gave it (a
  ballot never names its own evaluator);
- the candidates are the M participants with the greatest totals; ties go to the one
  with more first places, then to the lower id. They are listed in that order.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from fairbus.errors import SecclError


def candidate_count(share: float, participants: int) -> int:
    """M, how many candidates a round of ``participants`` elects: the nearest whole
    number to λ·N (halves up; IEEE arithmetic, the same on every machine), between 1
    and N."""
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise SecclError(f"λ (the candidate share) must be a number, not {share!r}")
    if not (math.isfinite(share) and 0.0 < share <= 1.0):
        raise SecclError(f"λ (the candidate share) must be in (0, 1], got {share!r}")
    if isinstance(participants, bool) or not isinstance(participants, int) or participants < 1:
        raise SecclError(f"an election among {participants!r} participants")
    return max(1, min(participants, math.floor(share * participants + 0.5)))


def ballot(values: Mapping[int, float], m: int) -> tuple[int, ...]:
    """The top ``m`` of one evaluator's values: highest value first, the lower id first
    among equal values."""
    return tuple(sorted(values, key=lambda user: (-values[user], user))[:m])


def points(position: int, m: int) -> int:
    """The Borda positional score of ``position`` (0 = first) in a top-``m`` ballot."""
    return m - position if 0 <= position < m else 0


@dataclass(frozen=True)
class Election:
    """The outcome: ``candidates`` in rank order, every target's Borda ``totals`` and
    ``first_places`` (how many ballots ranked it first)."""

    candidates: tuple[int, ...]
    totals: Mapping[int, int]
    first_places: Mapping[int, int]


def elect(
    evaluations: Mapping[int, Mapping[int, float]], targets: Collection[int], m: int
) -> Election:
    """The Borda election of ``m`` candidates among ``targets`` (the participants whose
    type (a) messages were recorded) from ``evaluations``: evaluator → (target → its
    evaluation value). Raises :class:`~fairbus.errors.SecclError` for an evaluation of
    oneself, of a participant outside ``targets``, or a value that is not finite."""
    pool = sorted(set(targets))
    if not pool:
        raise SecclError("an election needs at least one participant's upload")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise SecclError(f"an election of {m!r} candidates")
    m = min(m, len(pool))
    totals = dict.fromkeys(pool, 0)
    firsts = dict.fromkeys(pool, 0)
    for evaluator in sorted(evaluations):
        values = evaluations[evaluator]
        if evaluator in values:
            raise SecclError(f"participant {evaluator} evaluated itself")
        unknown = sorted(set(values) - set(pool))
        if unknown:
            raise SecclError(f"participant {evaluator} evaluated {unknown}, who uploaded nothing")
        for user, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SecclError(f"participant {evaluator}'s value for {user} is not a number")
            if not math.isfinite(value):
                raise SecclError(f"participant {evaluator}'s value for {user} is not finite")
        top = ballot(values, m)
        for position, user in enumerate(top):
            totals[user] += points(position, m)
        if top:
            firsts[top[0]] += 1
    order = sorted(pool, key=lambda user: (-totals[user], -firsts[user], user))
    return Election(tuple(order[:m]), totals, firsts)
