"""What a user uploads: honest training, or one of the attacks the papers defend against.

* poisoner — the fairness paper's data-poisoning attacker (PAC): it trains, then uploads
  the model moved *against* its gradient, global − scale · (trained − global);
* free-rider — the paper's FAC: uploads the global model it received, contributing
  nothing; the disguised variant adds small Gaussian noise so it is not an exact copy;
* label-flipper — SecCL's attacker that feeds fake labels: trains on y → C − 1 − y.

Those that train do so with the user's own :class:`~fairbus.training.local.Trainer`, so
they take as many SGD steps as an honest user with the same data (``local_epochs``
passes, or ``local_steps`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fairbus.errors import FairbusError

if TYPE_CHECKING:
    from fairbus.training.local import Trainer


class Behaviour(StrEnum):
    HONEST = "honest"
    POISONER = "poisoner"
    FREE_RIDER = "free_rider"
    DISGUISED_FREE_RIDER = "disguised_free_rider"
    LABEL_FLIPPER = "label_flipper"


@dataclass(frozen=True)
class Attack:
    behaviour: Behaviour = Behaviour.HONEST
    poison_scale: float = 1.0
    noise_std: float = 1e-3

    def __post_init__(self) -> None:
        if self.poison_scale <= 0 or self.noise_std < 0:
            raise FairbusError("poison_scale must be > 0 and noise_std >= 0")

    @property
    def malicious(self) -> bool:
        return self.behaviour is not Behaviour.HONEST

    def local_model(
        self, global_params: npt.NDArray[np.float32], trainer: Trainer, seed: int
    ) -> npt.NDArray[np.float32]:
        """The model this user uploads for the round."""
        b = self.behaviour
        if b is Behaviour.HONEST:
            return trainer.train(global_params)
        if b is Behaviour.LABEL_FLIPPER:
            return trainer.train(global_params, flip_labels=True)
        if b is Behaviour.POISONER:
            trained = trainer.train(global_params)
            return (global_params - self.poison_scale * (trained - global_params)).astype(
                np.float32
            )
        if b is Behaviour.FREE_RIDER:
            return global_params.copy()
        # disguised free-rider: the noise only hides the copy; it is not a secret
        noise = np.random.default_rng(seed).normal(0.0, self.noise_std, global_params.shape)
        return (global_params + noise).astype(np.float32)
