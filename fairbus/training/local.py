"""Local SGD (the paper's settings: lr 0.01, batch 64) and evaluation."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fairbus.training.config import TrainConfig
from fairbus.training.data import Dataset
from fairbus.training.models import build_model, flatten_params, load_params


class Trainer:
    """Trains one user's copy of the model on its own data, starting from a global model."""

    def __init__(self, model_name: str, data: Dataset, config: TrainConfig, seed: int) -> None:
        self.model = build_model(model_name)
        self.data = data
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    def train(
        self, global_params: npt.NDArray[np.float32], *, flip_labels: bool = False
    ) -> npt.NDArray[np.float32]:
        """Run ``local_epochs`` of minibatch SGD; ``flip_labels`` trains on y → C−1−y."""
        load_params(self.model, global_params)
        self.model.train()
        opt = torch.optim.SGD(
            self.model.parameters(), lr=self.config.lr, momentum=self.config.momentum
        )
        x, y = self.data.x, self.data.y
        if flip_labels:
            y = (self.data.num_classes - 1) - y
        for _ in range(self.config.local_epochs):
            order = torch.randperm(len(y), generator=self.generator)
            for start in range(0, len(y), self.config.batch_size):
                batch = order[start : start + self.config.batch_size]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(self.model(x[batch]), y[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        return flatten_params(self.model)


class Evaluator:
    """Accuracy of flat parameter vectors on a held-out set (the provider's)."""

    def __init__(self, model_name: str, data: Dataset) -> None:
        self.model = build_model(model_name)
        self.data = data

    def accuracy(self, params: npt.NDArray[np.float32]) -> float:
        if not np.isfinite(params).all():
            return 0.0
        load_params(self.model, params.astype(np.float32, copy=False))
        self.model.eval()
        with torch.no_grad():
            predictions = self.model(self.data.x).argmax(1)
        return float((predictions == self.data.y).float().mean())


__all__ = ["Evaluator", "TrainConfig", "Trainer"]
