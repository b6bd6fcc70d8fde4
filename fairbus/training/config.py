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
