"""Local training settings, without importing torch (the CLI reads the defaults)."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from typing import TypedDict

from fairbus.errors import FairbusError

MAX_LOCAL_STEPS = 100_000
"""The most SGD steps a round's local training may take (``TrainConfig.local_steps``)."""

MAX_PROXIMAL_MU = 100.0
"""The largest FedProx μ a task may ask for (``TrainConfig.proximal_mu``): at lr 0.01 a μ
of 100 already pulls a weight all the way back to the global model in one step."""


class RecordedTraining(TypedDict):
    """:meth:`TrainConfig.recorded`."""

    local_steps: int | None
    absent_class_scale: float
    proximal_mu: float


@dataclass(frozen=True)
class TrainConfig:
    """The paper's lr 0.01 and batch 64; 20 local epochs with momentum 0.9 (digits users
    hold ~150 images each, and plain SGD at lr 0.01 stays at chance for 10 rounds)."""

    lr: float = 0.01
    batch_size: int = 64
    local_epochs: int = 20
    momentum: float = 0.9
    local_steps: int | None = None
    """None: a round trains ``local_epochs`` full passes over the user's data, so a user
    with more data takes more SGD steps. A number: every user takes exactly this many
    steps of ``min(batch_size, its data)`` samples, whatever its data size, drawn from
    fresh shuffled passes over its data (``local_epochs`` is then unused)."""
    equal_steps: bool = True
    """With ``local_steps`` None, :meth:`for_task` gives every user the same number of
    steps: the steps ``local_epochs`` passes take on an average user's data. False keeps
    ``local_epochs`` passes over each user's own data (more data, more steps). Issue 13:
    a user holding less data than the others took fewer steps, its update along the
    common direction was shorter, and the contribution test (Alg. 6, lines 9-15) read
    its groups as free-riders; equal steps remove that cause."""

    absent_class_scale: float = 0.5
    """Restricted softmax (FedRS: Li and Zhan, KDD 2021): while a user trains, the logits
    of the classes absent from its own data are multiplied by this (1 = plain softmax).
    Issue 13: a user holding two or three classes, or a few dozen samples that miss some
    classes, drove the absent classes' logits down for 60 steps; its model forgot them,
    the groups holding it read low on the provider's balanced test set and Alg. 6
    excluded an honest user. Scaling keeps those logits out of the softmax's way; a user
    holding every class trains as before."""

    proximal_mu: float = 0.0
    """FedProx's proximal term (Li et al., MLSys 2020): local training minimises the loss
    plus ``proximal_mu``/2 · ‖w − w_global‖², which keeps a user's model near the round's
    global model however far its own data pulls (0 = plain local SGD). Issue 13: over
    20 local epochs a user holding two or three classes drifts to a model of those
    classes alone (client drift)."""

    def __post_init__(self) -> None:
        _check_number("proximal_mu", self.proximal_mu, MAX_PROXIMAL_MU)
        _check_number("absent_class_scale", self.absent_class_scale, 1.0)
        steps = self.local_steps
        if steps is not None and (
            isinstance(steps, bool)
            or not isinstance(steps, int)
            or not 1 <= steps <= MAX_LOCAL_STEPS
        ):
            raise FairbusError(
                f"local_steps must be None or an integer from 1 to {MAX_LOCAL_STEPS}, got {steps!r}"
            )

    def for_task(self, train_samples: int, users: int) -> TrainConfig:
        """The configuration every user of a task trains with: ``local_steps`` resolved
        from the task's training-set size and user count when :attr:`equal_steps` asks
        for it (the provider records the result at task start)."""
        if self.local_steps is not None or not self.equal_steps:
            return self
        return replace(self, local_steps=equal_local_steps(self, train_samples, users))

    def recorded(self) -> RecordedTraining:
        """What a task start records of this training (the fields of the same names of
        :class:`fairbus.task.TaskParams` and the provider's config): every user is asked
        to train so, though the ledger cannot check private training."""
        return RecordedTraining(
            local_steps=self.local_steps,
            absent_class_scale=self.absent_class_scale,
            proximal_mu=self.proximal_mu,
        )

    def steps_per_round(self, samples: int) -> int:
        """The SGD steps one round of local training takes on ``samples`` samples."""
        if self.local_steps is not None:
            return self.local_steps if samples > 0 else 0
        return self.local_epochs * math.ceil(samples / self.batch_size)


def _check_number(name: str, value: object, high: float) -> None:
    """A setting that must be a number (not a bool) from 0 to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise FairbusError(f"{name} must be a number from 0 to {high:g}, got {value!r}")


def equal_local_steps(config: TrainConfig, train_samples: int, users: int) -> int:
    """``local_epochs`` passes in batches of ``batch_size`` over an average user's share
    of ``train_samples``: the same count for every user, whatever its own data."""
    if users < 1 or train_samples < 1:
        raise FairbusError(f"no local steps for {train_samples} samples among {users} users")
    per_user = math.ceil(train_samples / users)
    steps = config.local_epochs * math.ceil(per_user / config.batch_size)
    return min(steps, MAX_LOCAL_STEPS)


def trainer_seed(task_seed: int, user: int) -> int:
    """The seed of ``user``'s trainer (its batch order, dropout): one definition for the
    simulator and the networked user, so both train the same way."""
    return task_seed * 1000 + user


def attack_seed(task_seed: int, user: int, round: int) -> int:
    """The seed ``user``'s attack draws its noise from in ``round`` (one definition for
    the simulators and the networked user). Each user draws its own: two disguised
    free-riders seeded by the round alone uploaded the same noise, which no two real
    ones would, and their groups' noise then added up where it should average out
    (issue 13). SHA-256 mixes the three numbers into 64 bits."""
    digest = hashlib.sha256(f"fairbus-attack:{task_seed}:{user}:{round}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


AUTO_WORKERS_FROM = 50
"""From this many users on, a simulation trains its users on every core by default
(:func:`default_workers`): at 100 digits users a round's training took 6 s in one
process, and starting a worker (it imports torch) takes a few seconds once."""


def default_workers(users: int) -> int:
    """How many processes a simulation of ``users`` users trains them in by default."""
    return max(1, os.cpu_count() or 1) if users >= AUTO_WORKERS_FROM else 1
