"""Local SGD (the paper's settings: lr 0.01, batch 64) and evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fairbus.training.config import TrainConfig
from fairbus.training.data import Dataset
from fairbus.training.models import build_model, flatten_params, load_params
from fairbus.training.sgd import MomentumSGD


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
        """One round of minibatch SGD (``local_epochs`` passes, or exactly ``local_steps``
        steps: :meth:`batches`), the logits of the classes absent from the labels it
        trains on scaled by ``absent_class_scale`` (:meth:`logit_scale`) and, with
        ``proximal_mu``, FedProx's pull towards ``global_params``; ``flip_labels`` trains
        on y → C−1−y."""
        load_params(self.model, global_params)
        self.model.train()
        opt = MomentumSGD(self.model.parameters(), lr=self.config.lr, momentum=self.config.momentum)
        x, y = self.data.x, self.data.y
        if flip_labels:
            y = (self.data.num_classes - 1) - y
        scale = self.logit_scale(y)
        mu = self.config.proximal_mu
        anchor = [p.detach().clone() for p in self.model.parameters()] if mu else []
        for batch in self.batches():
            opt.zero_grad()
            logits = self.model(x[batch])
            if scale is not None:
                logits = logits * scale
            loss = nn.functional.cross_entropy(logits, y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            if anchor:
                self._pull_towards(anchor, mu)
            opt.step()
        return flatten_params(self.model)

    @torch.no_grad()
    def _pull_towards(self, anchor: list[torch.Tensor], mu: float) -> None:
        """FedProx: add the gradient of μ/2 ‖w − w_global‖² to each parameter's."""
        for param, start in zip(self.model.parameters(), anchor, strict=True):
            if param.grad is not None:
                param.grad.add_(param - start, alpha=mu)

    def logit_scale(self, labels: torch.Tensor) -> torch.Tensor | None:
        """FedRS's restricted softmax: per class, 1 where ``labels`` hold it and
        ``absent_class_scale`` where they do not; None where nothing is scaled."""
        scale = self.config.absent_class_scale
        if scale == 1 or len(labels) == 0:
            return None
        present = torch.bincount(labels, minlength=self.data.num_classes) > 0
        if bool(present.all()):
            return None
        return torch.where(present, 1.0, float(scale))

    def batches(self) -> Iterator[torch.Tensor]:
        """The sample indices of each SGD step of one round, drawn from the trainer's
        seeded generator (not a secret: it only orders the user's own data).

        ``local_steps`` None: ``local_epochs`` shuffled passes, each cut into batches of
        ``batch_size`` (the last one of a pass shorter). Otherwise exactly
        ``local_steps`` batches of ``min(batch_size, n)`` samples taken in turn from a
        stream of fresh shuffled passes (a batch may span two passes), so every sample is
        used equally often however many steps that takes."""
        n, size = len(self.data.y), self.config.batch_size
        steps = self.config.local_steps
        if n == 0:
            return
        if steps is None:
            for _ in range(self.config.local_epochs):
                order = torch.randperm(n, generator=self.generator)
                for start in range(0, n, size):
                    yield order[start : start + size]
            return
        size = min(size, n)
        pending = torch.empty(0, dtype=torch.int64)
        for _ in range(steps):
            if len(pending) < size:
                pending = torch.cat((pending, torch.randperm(n, generator=self.generator)))
            yield pending[:size]
            pending = pending[size:]


class Evaluator:
    """Accuracy of flat parameter vectors on a held-out set (the provider's)."""

    def __init__(self, model_name: str, data: Dataset) -> None:
        self.model = build_model(model_name)
        self.data = data

    def accuracy(self, params: npt.NDArray[np.float32]) -> float:
        if not np.isfinite(params).all():
            return 0.0
        predictions = torch.from_numpy(self.predict(params))
        return float((predictions == self.data.y).float().mean())

    def predict(self, params: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """The predicted class of every sample (a SecCL participant's F-score of another's
        upload, :func:`fairbus.seccl.macro_f_score`, is taken on these)."""
        load_params(self.model, params.astype(np.float32, copy=False))
        self.model.eval()
        with torch.no_grad():
            predictions = self.model(self.data.x).argmax(1)
        out: npt.NDArray[np.int64] = predictions.numpy().astype(np.int64)
        return out

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        labels: npt.NDArray[np.int64] = self.data.y.numpy().astype(np.int64)
        return labels


__all__ = ["Evaluator", "TrainConfig", "Trainer"]
