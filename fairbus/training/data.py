"""Data sets that work offline, and how users' shares of them are drawn.

* ``digits`` — scikit-learn's bundled handwritten digits (1,797 8x8 images): the default,
  needs nothing on disk.
* ``mnist`` — the IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``) in a
  directory; parsed strictly (magic numbers, dimensions, sizes).
* ``cifar10`` — the python batches (``data_batch_1``..``5``, ``test_batch``) in a
  directory, read with an unpickler that admits only what those files contain, so a
  hostile file cannot run code.
* Where torchvision imports, ``torchvision-mnist`` / ``torchvision-cifar10`` read its
  on-disk datasets (never downloading).

Partitions (IID and Dirichlet non-IID) use numpy's generator: data placement is not a
secret.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch

from fairbus.errors import OperatorError


class DatasetError(OperatorError):
    """A data set is missing, malformed, or asked for in a way that cannot work."""


@dataclass(frozen=True)
class Dataset:
    """Images (N, C, H, W) as float32 in [0, 1] and integer labels."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 10

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: npt.NDArray[np.int64]) -> Dataset:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return Dataset(self.x[idx], self.y[idx], self.num_classes)


# --- digits ---------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (
        Dataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        Dataset(torch.from_numpy(x_te), torch.from_numpy(y_te)),
    )


# --- MNIST IDX ------------------------------------------------------------------------------

_IDX_IMAGES = 0x00000803
_IDX_LABELS = 0x00000801
_MAX_IDX_BYTES = 512 * 1024 * 1024


def _read_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            if candidate.stat().st_size > _MAX_IDX_BYTES:
                raise DatasetError(f"{candidate} is larger than {_MAX_IDX_BYTES} bytes")
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:
                        raw = gz.read(_MAX_IDX_BYTES + 1)
                except (OSError, EOFError) as exc:
                    raise DatasetError(f"{candidate} is not valid gzip: {exc}") from None
            return raw
    raise DatasetError(f"{path} (or {path.name}.gz) does not exist")


def parse_idx_images(raw: bytes, where: str = "images") -> npt.NDArray[np.uint8]:
    if len(raw) < 16:
        raise DatasetError(f"{where}: {len(raw)} bytes is too short for an IDX image header")
    magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != _IDX_IMAGES:
        raise DatasetError(f"{where}: magic {magic:#010x}, expected {_IDX_IMAGES:#010x}")
    if len(raw) != 16 + count * rows * cols:
        raise DatasetError(
            f"{where}: header says {count}x{rows}x{cols} but the file holds {len(raw) - 16} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def parse_idx_labels(raw: bytes, where: str = "labels") -> npt.NDArray[np.uint8]:
    if len(raw) < 8:
        raise DatasetError(f"{where}: {len(raw)} bytes is too short for an IDX label header")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != _IDX_LABELS:
        raise DatasetError(f"{where}: magic {magic:#010x}, expected {_IDX_LABELS:#010x}")
    if len(raw) != 8 + count:
        raise DatasetError(f"{where}: header says {count} labels, file holds {len(raw) - 8}")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{where}: label {int(labels.max())} is not a digit")
    return labels


def _mnist_split(directory: Path, prefix: str) -> Dataset:
    images = parse_idx_images(
        _read_maybe_gz(directory / f"{prefix}-images-idx3-ubyte"), f"{prefix} images"
    )
    labels = parse_idx_labels(
        _read_maybe_gz(directory / f"{prefix}-labels-idx1-ubyte"), f"{prefix} labels"
    )
    if len(images) != len(labels):
        raise DatasetError(f"{prefix}: {len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_mnist(directory: Path) -> tuple[Dataset, Dataset]:
    return _mnist_split(directory, "train"), _mnist_split(directory, "t10k")


# --- CIFAR-10 python batches -----------------------------------------------------------------

_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the numpy reconstruction helpers a CIFAR-10 batch uses."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise DatasetError(f"CIFAR-10 batch refers to {module}.{name}, which it never should")


def parse_cifar_batch(
    raw: bytes, where: str = "batch"
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DatasetError:
        raise
    except Exception as exc:  # pickle raises many unrelated types on garbage
        raise DatasetError(f"{where}: not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a dict, found {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(f"{where}: 'data' must be a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{where}: rows of {data.shape[1]} values, expected 3072")
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        raise DatasetError(f"{where}: need one label per image")
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{where}: labels must be 0..9")
    return data.reshape(-1, 3, 32, 32), y


def load_cifar10(directory: Path) -> tuple[Dataset, Dataset]:
    def read(names: list[str]) -> Dataset:
        xs, ys = [], []
        for name in names:
            path = directory / name
            if not path.is_file():
                raise DatasetError(f"{path} does not exist")
            x, y = parse_cifar_batch(path.read_bytes(), str(path))
            xs.append(x)
            ys.append(y)
        x_all = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
        return Dataset(x_all, torch.from_numpy(np.concatenate(ys)))

    return read([f"data_batch_{k}" for k in range(1, 6)]), read(["test_batch"])


# --- torchvision, where it imports -------------------------------------------------------------


def torchvision_available() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # a CUDA build beside the CPU torch fails in odd ways
        return False
    return True


def load_torchvision(name: str, root: Path) -> tuple[Dataset, Dataset]:
    if not torchvision_available():
        raise DatasetError("torchvision does not import here; use 'mnist' or 'cifar10' files")
    datasets = importlib.import_module("torchvision.datasets")
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]

    def convert(ds: Any) -> Dataset:
        data = np.asarray(ds.data)
        x = torch.from_numpy(data.astype(np.float32) / 255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return Dataset(x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))

    return convert(cls(str(root), train=True, download=False)), convert(
        cls(str(root), train=False, download=False)
    )


DATASET_MODELS = {
    "digits": "digits_cnn",
    "mnist": "mnist_cnn",
    "cifar10": "cifar10_cnn",
    "torchvision-mnist": "mnist_cnn",
    "torchvision-cifar10": "cifar10_cnn",
}


def load_dataset(name: str, data_dir: Path | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) for ``name``; file-based sets read ``data_dir``."""
    if name == "digits":
        return load_digits(seed=seed)
    if name not in DATASET_MODELS:
        raise DatasetError(f"unknown data set {name!r}; choose one of {sorted(DATASET_MODELS)}")
    if data_dir is None:
        raise DatasetError(f"data set {name!r} needs a data directory")
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    return load_torchvision(name.removeprefix("torchvision-"), data_dir)


# --- partitions -------------------------------------------------------------------------------


def partition_iid(n_samples: int, n_users: int, seed: int) -> list[npt.NDArray[np.int64]]:
    """Shuffle and split into ``n_users`` near-equal parts."""
    if n_users < 1 or n_samples < n_users:
        raise DatasetError(f"cannot split {n_samples} samples among {n_users} users")
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, n_users)]


def partition_dirichlet(
    labels: npt.NDArray[np.int64], n_users: int, alpha: float, seed: int, min_size: int = 10
) -> list[npt.NDArray[np.int64]]:
    """Non-IID: each class is spread over users by proportions drawn from Dir(alpha).

    Redrawn (up to 100 times) until every user has at least ``min_size`` samples.
    """
    if alpha <= 0:
        raise DatasetError(f"alpha must be > 0, got {alpha}")
    if len(labels) < n_users * min_size:
        raise DatasetError(f"{len(labels)} samples cannot give {n_users} users {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_users)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_users)) * len(idx)).astype(int)[:-1]
            for user, chunk in enumerate(np.split(idx, cuts)):
                parts[user].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DatasetError(f"Dir({alpha}) left some user with fewer than {min_size} samples")


Partition = Literal["iid", "dirichlet", "classes", "quantity"]
"""How the training set is split among the users (:func:`partition`)."""

PARTITIONS: tuple[str, ...] = get_args(Partition)


def check_partition(kind: str) -> None:
    """Refuse a split :func:`partition` does not know, by name."""
    if kind not in PARTITIONS:
        raise DatasetError(f"partition must be one of {', '.join(PARTITIONS)}, got {kind!r}")


def uses_alpha(kind: str) -> bool:
    """Whether the split ``kind`` reads ``alpha`` (a Dirichlet concentration)."""
    return kind in ("dirichlet", "quantity")


def partition_classes(
    labels: npt.NDArray[np.int64], n_users: int, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Non-IID by label count (#C = k of Li et al., "Federated Learning on Non-IID Data
    Silos", ICDE 2022): user k of the sorted ids holds two classes where k is even and
    three where it is odd, dealt from seeded orders of the classes one after another (a
    class at most once per user), so that every class is held by someone wherever the
    users have room for them all (a class no one holds is left out); each class's
    samples are split equally among the users holding it."""
    classes = np.unique(labels)
    if n_users < 1 or len(classes) < 3:
        raise DatasetError(f"cannot give {n_users} users two or three of {len(classes)} classes")
    rng = np.random.default_rng(seed)
    deck: list[int] = []  # seeded orders of the classes, one after another
    held: list[list[int]] = []
    for user in range(n_users):
        mine: list[int] = []
        while len(mine) < 2 + user % 2:
            if all(c in mine for c in deck):
                deck += [int(c) for c in rng.permutation(classes)]
            cls = next(c for c in deck if c not in mine)  # a class once per user
            deck.remove(cls)
            mine.append(cls)
        held.append(mine)
    parts: list[list[int]] = [[] for _ in range(n_users)]
    for cls in classes:
        holders = [u for u in range(n_users) if int(cls) in held[u]]
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for user, chunk in zip(holders, np.array_split(idx, len(holders)), strict=False):
            parts[user].extend(chunk.tolist())
    if min(len(p) for p in parts) < 1:
        raise DatasetError(f"{len(labels)} samples leave some of {n_users} users without data")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_quantity(
    n_samples: int, n_users: int, alpha: float, seed: int, min_size: int = 10
) -> list[npt.NDArray[np.int64]]:
    """Quantity skew (Li et al., as above): IID labels, each user's share of the samples
    drawn from Dir(alpha) over the users, redrawn (up to 100 times) until every user has
    at least ``min_size``. At 0.5 among nine users of the 1,347 digits the smallest share
    was 10-38 samples in seeds 0-19."""
    if alpha <= 0:
        raise DatasetError(f"alpha must be > 0, got {alpha}")
    if n_samples < n_users * min_size:
        raise DatasetError(f"{n_samples} samples cannot give {n_users} users {min_size} each")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_samples)
    for _ in range(100):
        cuts = (np.cumsum(rng.dirichlet([alpha] * n_users)) * n_samples).astype(int)[:-1]
        parts = np.split(order, cuts)
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(p).astype(np.int64) for p in parts]
    raise DatasetError(f"Dir({alpha}) left some user with fewer than {min_size} samples")


def partition(
    train: Dataset, n_users: int, kind: str, alpha: float, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Each user's sample indices: ``kind`` is "iid", "dirichlet" (labels non-IID with
    ``alpha``), "classes" (two or three classes each) or "quantity" (IID labels, sizes
    from Dir(``alpha``)). The simulator and every networked user split the same way, so
    user k of the sorted user ids holds part k in both."""
    if kind == "iid":
        return partition_iid(len(train), n_users, seed)
    if kind == "dirichlet":
        return partition_dirichlet(train.y.numpy(), n_users, alpha, seed)
    if kind == "classes":
        return partition_classes(train.y.numpy(), n_users, seed)
    if kind == "quantity":
        return partition_quantity(len(train), n_users, alpha, seed)
    raise DatasetError(f"partition must be one of {', '.join(PARTITIONS)}, got {kind!r}")
