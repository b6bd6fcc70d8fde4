"""The paper's CNNs (Sec. 5.2) and a small CNN for scikit-learn's 8x8 digits.

* MNIST: 2 convolutional, 2 pooling and 2 fully connected layers. With 5x5 kernels,
  32 and 64 channels and a 512-unit hidden layer it has exactly 582,026 parameters,
  the size the paper's Table 2 implies (2.3 MB as float32).
* CIFAR-10: 8 convolutional, 4 pooling and 3 fully connected layers.
* digits: 2 conv, 2 pool, 2 fc for 8x8 inputs; the offline default.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fairbus.errors import FairbusError


class MnistCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )


def _conv_pair(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


class Cifar10CNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            *_conv_pair(3, 32),
            *_conv_pair(32, 64),
            *_conv_pair(64, 128),
            *_conv_pair(128, 256),
            nn.Flatten(),
            nn.Linear(256 * 2 * 2, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )


class DigitsCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mnist_cnn": MnistCNN,
    "cifar10_cnn": Cifar10CNN,
    "digits_cnn": DigitsCNN,
}


def build_model(name: str) -> nn.Module:
    try:
        return MODELS[name]()
    except KeyError:
        raise FairbusError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flatten_params(model: nn.Module) -> npt.NDArray[np.float32]:
    """All parameters as one float32 vector, in ``model.parameters()`` order."""
    with torch.no_grad():
        return torch.cat([p.reshape(-1) for p in model.parameters()]).numpy().astype(np.float32)


def load_params(model: nn.Module, flat: npt.NDArray[np.float32]) -> None:
    """Copy a flat vector (as from :func:`flatten_params`) into ``model``."""
    expected = count_parameters(model)
    if flat.shape != (expected,):
        raise FairbusError(f"model needs {expected} parameters, got shape {flat.shape}")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(torch.from_numpy(flat[offset : offset + n]).reshape(p.shape))
            offset += n


def initial_params(name: str, seed: int) -> npt.NDArray[np.float32]:
    """The provider's initial global model, reproducible from ``seed``."""
    torch.manual_seed(seed)
    return flatten_params(build_model(name))
