"""The simulated users' local training, in this process or spread over worker processes.

A simulation of hundreds of users spends most of a round training them one after the
other (issue 16, item 4). :class:`WorkerTraining` gives each of ``workers`` processes a
fixed share of the users (user k of the sorted ids to worker k mod workers); each worker
builds those users' :class:`~fairbus.training.local.Trainer` itself, from the same data
split and seeds the simulator uses, and keeps them for the whole run, so a user's trainer
(its seeded batch order) advances exactly as it does in :class:`InProcessTraining`. A
round's jobs go out at once and come back in job order; the models are those in-process
training gives, bit for bit (``tests/simulation/test_training_workers.py``).

Workers are started with ``spawn`` (not ``fork``: a forked child of a process that has
run OpenMP work may hang) and run one torch thread each.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fairbus.errors import FairbusError
from fairbus.training.attacks import Attack
from fairbus.training.config import TrainConfig, attack_seed, trainer_seed
from fairbus.training.data import Dataset, Partition, load_dataset, partition
from fairbus.training.local import Trainer

Params = npt.NDArray[np.float32]

JOIN_TIMEOUT_S = 10.0


class TrainingWorkerError(FairbusError):
    """A training worker failed or went away; the message carries its reason."""


@dataclass(frozen=True)
class TrainingJob:
    """Train ``user`` from ``global_params`` in ``round`` (what its attack uploads)."""

    user: int
    global_params: Params
    round: int


@dataclass(frozen=True)
class TrainingSpec:
    """What it takes to rebuild every simulated user's trainer anywhere: the data set
    and its split, the model, the resolved local training and each user's attack."""

    model_name: str
    dataset: str
    data_dir: Path | None
    partition: Partition
    alpha: float
    seed: int
    user_ids: tuple[int, ...]
    train: TrainConfig
    attacks: dict[int, Attack] = field(default_factory=dict)

    def trainers(self, owned: Iterable[int], train: Dataset | None = None) -> dict[int, Trainer]:
        """The trainers of the ``owned`` users, as the simulator builds them, from the
        training set ``train`` (loaded here when not given)."""
        if train is None:
            train, _ = load_dataset(self.dataset, self.data_dir, seed=self.seed)
        parts = dict(
            zip(
                self.user_ids,
                partition(train, len(self.user_ids), self.partition, self.alpha, self.seed),
                strict=True,
            )
        )
        return {
            u: Trainer(
                self.model_name, train.subset(parts[u]), self.train, seed=trainer_seed(self.seed, u)
            )
            for u in owned
        }

    def run(self, job: TrainingJob, trainer: Trainer) -> Params:
        """The model ``job.user`` uploads: honest training or its attack."""
        attack = self.attacks.get(job.user, Attack())
        return attack.local_model(
            job.global_params, trainer, seed=attack_seed(self.seed, job.user, job.round)
        )


class LocalTraining(Protocol):
    """Runs a batch of training jobs and returns the models in job order."""

    def train(self, jobs: Sequence[TrainingJob]) -> list[Params]: ...

    def close(self) -> None: ...


class InProcessTraining:
    """Every user's trainer in this process, trained one after the other."""

    def __init__(self, spec: TrainingSpec, trainers: dict[int, Trainer]) -> None:
        self.spec = spec
        self.trainers = trainers

    def train(self, jobs: Sequence[TrainingJob]) -> list[Params]:
        return [self.spec.run(job, self.trainers[job.user]) for job in jobs]

    def close(self) -> None:
        return None


class WorkerTraining:
    """The users' trainers spread over ``workers`` processes (see the module docstring).

    A context manager; :meth:`close` stops the workers (they are daemons, so they also
    end with this process)."""

    def __init__(self, spec: TrainingSpec, workers: int) -> None:
        if workers < 2:
            raise FairbusError(f"worker training needs at least 2 workers, got {workers}")
        self.spec = spec
        users = sorted(spec.user_ids)
        self._owner = {u: k % workers for k, u in enumerate(users)}
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for w in range(workers):
            mine, theirs = context.Pipe()
            owned = tuple(u for u in users if self._owner[u] == w)
            proc = context.Process(
                target=_serve, args=(theirs, spec, owned), name=f"fairbus-train-{w}", daemon=True
            )
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)

    def __enter__(self) -> WorkerTraining:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def train(self, jobs: Sequence[TrainingJob]) -> list[Params]:
        shares: list[list[int]] = [[] for _ in self._conns]
        for index, job in enumerate(jobs):
            shares[self._owner[job.user]].append(index)
        for conn, share in zip(self._conns, shares, strict=True):
            if share:
                self._send(conn, [jobs[i] for i in share])
        out: list[Params | None] = [None] * len(jobs)
        for conn, share in zip(self._conns, shares, strict=True):
            if share:
                for index, params in zip(share, self._receive(conn), strict=True):
                    out[index] = params
        return [params for params in out if params is not None]

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(None)
            conn.close()
        for proc in self._procs:
            proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
        self._conns, self._procs = [], []

    @staticmethod
    def _send(conn: Connection, jobs: list[TrainingJob]) -> None:
        try:
            conn.send(jobs)
        except OSError as exc:
            raise TrainingWorkerError(f"a training worker went away: {exc}") from None

    @staticmethod
    def _receive(conn: Connection) -> list[Params]:
        try:
            status, payload = conn.recv()
        except (EOFError, OSError) as exc:
            raise TrainingWorkerError(f"a training worker went away: {exc!r}") from None
        if status != "ok":
            raise TrainingWorkerError(f"a training worker failed: {payload}")
        return list(payload)


def _serve(conn: Connection, spec: TrainingSpec, owned: tuple[int, ...]) -> None:
    """A worker's loop: build the owned users' trainers, then train each batch sent."""
    import torch

    torch.set_num_threads(1)
    try:
        trainers = spec.trainers(owned)
    except Exception as exc:  # reported to the simulator, which raises it as its own error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        trainers = None
    while True:
        try:
            jobs = conn.recv()
        except EOFError:
            return
        if jobs is None:
            return
        if trainers is None:
            conn.send(("error", "the worker could not build its trainers"))
            continue
        try:
            conn.send(("ok", [spec.run(job, trainers[job.user]) for job in jobs]))
        except Exception as exc:  # as above
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
