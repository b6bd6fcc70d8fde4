"""Seeded, reproducible draws for test data (models, groupings, key users): a small
numpy-shaped face on a seeded ``torch.Generator``. Nothing drawn here is a secret; the
library's secrets come from :mod:`fairbus.csprng` only."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar, overload

import numpy as np
import numpy.typing as npt
import torch

T = TypeVar("T")


class SeededDraws:
    """Draws from a generator seeded with ``seed`` (an int, or a tuple of ints hashed)."""

    def __init__(self, seed: int | Sequence[int]) -> None:
        if not isinstance(seed, int):
            digest = hashlib.sha256(repr(tuple(seed)).encode()).digest()
            seed = int.from_bytes(digest[:8], "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] = 1
    ) -> npt.NDArray[np.float64]:
        shape = (size,) if isinstance(size, int) else size
        draws = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        return (draws * scale + loc).numpy()

    @overload
    def random(self, size: None = None) -> float: ...
    @overload
    def random(self, size: int | tuple[int, ...]) -> npt.NDArray[np.float64]: ...
    def random(self, size: int | tuple[int, ...] | None = None) -> npt.NDArray[np.float64] | float:
        if size is None:
            return float(torch.rand((), generator=self.generator, dtype=torch.float64))
        shape = (size,) if isinstance(size, int) else size
        return torch.rand(shape, generator=self.generator, dtype=torch.float64).numpy()

    @overload
    def integers(self, low: int, high: int, size: None = None) -> int: ...
    @overload
    def integers(self, low: int, high: int, size: int) -> npt.NDArray[np.int64]: ...
    def integers(self, low: int, high: int, size: int | None = None) -> npt.NDArray[np.int64] | int:
        """Like numpy's: from ``low`` up to ``high`` − 1."""
        if size is None:
            return int(torch.randint(low, high, (), generator=self.generator))
        return torch.randint(low, high, (size,), generator=self.generator).numpy()

    def permutation(self, items: Sequence[T]) -> list[T]:
        order = torch.randperm(len(items), generator=self.generator)
        return [items[int(i)] for i in order]

    def choice(self, items: Sequence[T], size: int) -> list[T]:
        """``size`` distinct items (numpy's ``replace=False``)."""
        return self.permutation(items)[:size]
