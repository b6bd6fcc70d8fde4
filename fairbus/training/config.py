"""Local training settings, without importing torch (the CLI reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """The paper's lr 0.01 and batch 64; 20 local epochs with momentum 0.9 (digits users
    hold ~150 images each, and plain SGD at lr 0.01 stays at chance for 10 rounds)."""

    lr: float = 0.01
    batch_size: int = 64
    local_epochs: int = 20
    momentum: float = 0.9


def trainer_seed(task_seed: int, user: int) -> int:
    """The seed of ``user``'s trainer (its batch order, dropout): one definition for the
    simulator and the networked user, so both train the same way."""
    return task_seed * 1000 + user


def round_seed(task_seed: int, round: int) -> int:
    """The seed an attack draws its noise from in ``round`` (one definition, as above)."""
    return task_seed * 7919 + round
