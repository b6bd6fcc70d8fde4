"""``fairbus bench round``: one secure round over the network, by phase, against a plain
FedAvg round over the same broker with the same training.

Secure runs go once per keying (Alg. 3's Shamir shares, or pairwise keys: issue 16).
The plain run is the same runtime with ``[provider] secure = false``, the
:class:`~fairbus.aggregation.PlainFedAvg` policy: the global model out and every user's
float32 model back in the clear, unsigned and unrecorded, their mean.

Both runs are whole local deployments (:class:`fairbus.runtime.local.LocalTask`): a
broker, a ledger, the provider and 9 user processes training the paper's MNIST CNN
(582,026 parameters, 2.3 MB as float32). No MNIST can be downloaded here, so the data
set is written in MNIST's IDX format from scikit-learn's digits, scaled to 28 × 28 and
replicated with one-pixel shifts to the paper's size per user (60,000 / 9): what is
measured is time and bytes, not accuracy.
"""

from __future__ import annotations

import gzip
import json
import shutil
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fairbus.runtime.local import LocalTask
from fairbus.training.models import build_model, count_parameters
from fairbus.wire.messages import KEYINGS, SHAMIR

MODEL_FLOAT32_BYTES = 582_026 * 4


def write_mnist_like(directory: Path, train_size: int, test_size: int, seed: int = 0) -> None:
    """IDX files (``train-*``, ``t10k-*``) of 28 × 28 digits, shifted copies included."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3)))  # 8 × 8 → 24 × 24
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # → 28 × 28
    images = (images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    shifts = np.random.default_rng(seed)  # data augmentation only; nothing secret
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train_size), ("t10k", test_size)):
        pick = shifts.integers(0, len(images), n)
        rolled = np.stack(
            [np.roll(images[k], tuple(shifts.integers(-1, 2, 2)), axis=(0, 1)) for k in pick]
        )
        with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + rolled.tobytes())
        with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels[pick].tobytes())


@dataclass(frozen=True)
class RoundRun:
    """Per-round means over the measured rounds (the first is left out as warm-up)."""

    secure: bool
    round_s: float
    phases_s: dict[str, float]
    bytes_per_user: float
    bytes_per_upload: float
    accuracy: float


def run(
    workdir: Path,
    *,
    secure: bool,
    rounds: int,
    broker: str,
    store: str,
    keying: str = SHAMIR,
    users: int = 9,
) -> RoundRun:
    """One deployment of ``users`` user processes (``workdir``/mnist written already)."""
    root = workdir / (f"secure-{keying}" if secure else "plain")
    shutil.rmtree(root, ignore_errors=True)
    data = str((workdir / "mnist").resolve())
    training: dict[str, object] = {"dataset": "mnist", "data_dir": data, "local_epochs": 1}
    provider: dict[str, object] = {"secure": secure, "phase_timeout": 600}
    with LocalTask(root, users, rounds, {}, store, broker, training, provider,
                   top={"keying": keying}) as task:  # fmt: skip
        records = task.wait_for_round(rounds, timeout=600 * rounds)
    measured = records[1:] if len(records) > 1 else records
    # evaluation: every group model (secure); global evaluation: the new global model (both)
    provider_phases = ("ledger", "aggregation", "evaluation", "detection", "global_evaluation")
    phases = {
        p.replace("_", " "): statistics.mean(float(r["timings_s"].get(p, 0.0)) for r in measured)  # type: ignore[attr-defined]
        for p in provider_phases
    }
    stats = [json.loads(p.read_text()) for p in sorted((root / "state").glob("user-*/stats.json"))]
    for name in ("training_s", "ledger_s", "upload_s"):
        values = [float(s["timings"].get(name, 0.0)) for s in stats]
        phases[f"user {name.removesuffix('_s')}"] = statistics.mean(values) if values else 0.0
    # Keys are negotiated while the model trains: what shows is the wait beyond training.
    waits = [
        max(0.0, s["timings"].get("negotiation_s", 0.0) - s["timings"].get("training_s", 0.0))
        for s in stats
    ]
    phases["user key wait after training"] = statistics.mean(waits) if waits else 0.0
    sent = [sum(s["round_bytes"].values()) for s in stats]
    uploads = [s["round_bytes"].get("upload", 0) / max(1, s["timings"].get("uploads", 1))
               for s in stats]  # fmt: skip
    return RoundRun(
        secure,
        statistics.mean(float(r["timings_s"]["round"]) for r in measured),  # type: ignore[index]
        phases,
        statistics.mean(sent),
        statistics.mean(uploads),
        float(records[-1]["global_accuracy"]),  # type: ignore[arg-type]
    )


def bench(
    workdir: Path,
    *,
    rounds: int = 3,
    per_user: int = 6_667,
    broker: str,
    store: str,
    keyings: tuple[str, ...] = KEYINGS,
) -> tuple[dict[str, RoundRun], RoundRun]:
    """Plain FedAvg, then a secure run per keying: ({keying: secure run}, plain run)."""
    assert count_parameters(build_model("mnist_cnn")) * 4 == MODEL_FLOAT32_BYTES
    write_mnist_like(workdir / "mnist", per_user * 9, 1_000)
    plain = run(workdir, secure=False, rounds=rounds, broker=broker, store=store)
    secure = {
        k: run(workdir, secure=True, rounds=rounds, broker=broker, store=store, keying=k)
        for k in keyings
    }
    return secure, plain
