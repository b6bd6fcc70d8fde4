"""Global aggregation policies (Alg. 1, line 30), as small replaceable objects.

Modelled on Flower's strategies: one object, one job — turn the round's decrypted
group models into the next global model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fairbus.grouping import BASIC


@dataclass(frozen=True, eq=False)
class GroupModel:
    """A decrypted group model: the mean of its members' models (Alg. 5)."""

    gid: int
    kind: str
    members: tuple[int, ...]
    mean: npt.NDArray[np.float32]
    scored: bool = True
    """score_g of Alg. 6, line 11: whether the group beat τ (True when undefended)."""
    contribution: float | None = None
    """Its :func:`fairbus.detection.group_contributions` value, where known."""


class AggregationStrategy(Protocol):
    def aggregate(
        self,
        current: npt.NDArray[np.float32],
        groups: Sequence[GroupModel],
        violators: Iterable[int],
    ) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class CleanGroupAverage:
    """The average of the clean basic groups, weighted by size (DESIGN.md, step 7).

    A group is clean when no detected violator is in it, so no byte from a violator
    enters the global model. Focus and reference groups repeat users and are left out.
    Not in the paper: where some clean groups scored in Alg. 6 only those are averaged,
    so attackers not yet found do not hold the model back (with two poisoners among nine
    it otherwise stays near chance for rounds); where none scored, the clean basic group
    that contributed most (with three poisoners among nine, averaging all of them keeps
    the model at chance, and nothing can be detected while it is). With no clean group
    the current model is kept.
    """

    def aggregate(
        self,
        current: npt.NDArray[np.float32],
        groups: Sequence[GroupModel],
        violators: Iterable[int],
    ) -> npt.NDArray[np.float32]:
        bad = set(violators)
        clean = [g for g in groups if g.kind == BASIC and not bad.intersection(g.members)]
        scored = [g for g in clean if g.scored]
        if not scored and clean and all(g.contribution is not None for g in clean):
            scored = [max(clean, key=lambda g: (g.contribution or 0.0, -g.gid))]
        return _size_weighted_mean(current, scored or clean)


@dataclass(frozen=True)
class UndefendedFedAvg:
    """Plain FedAvg over every basic group: the baseline without detection."""

    def aggregate(
        self,
        current: npt.NDArray[np.float32],
        groups: Sequence[GroupModel],
        violators: Iterable[int],
    ) -> npt.NDArray[np.float32]:
        return _size_weighted_mean(current, [g for g in groups if g.kind == BASIC])


def _size_weighted_mean(
    current: npt.NDArray[np.float32], groups: Sequence[GroupModel]
) -> npt.NDArray[np.float32]:
    """The mean of the groups' models weighted by size; the current model if none."""
    if not groups:
        return current.copy()
    weights = np.array([len(g.members) for g in groups], dtype=np.float64)
    stacked = np.stack([g.mean.astype(np.float64) for g in groups])
    return np.asarray(weights @ stacked / weights.sum(), dtype=np.float32)
