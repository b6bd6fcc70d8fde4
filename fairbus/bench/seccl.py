"""SecCL's experiments (SecCL, "Experimental Evaluation"), behind ``fairbus bench seccl``.

- Fig. 4, "Feasibility verification": 20 and 30 participants, λ ∈ {0.2, 0.4}, no
  adversaries, the data split equally at random; the global model's accuracy per
  round against training on all the data with the same settings (the paper's
  baseline, 0.9908 on MNIST).
- Fig. 5, "Throttling adversaries": 20 participants, λ = 0.2, a fraction ε ∈ {0.1, 0.2,
  0.25, 0.3} of label-flippers who collude from round 5 (they also give each other the
  top of their ballots: :mod:`fairbus.seccl_simulation`).

Every run is a :class:`~fairbus.seccl_simulation.SecclSimulation` (the machines, the
ledger and its contract); θ = 0.1, mini-batch 32, learning rate 0.02 as in the paper.
The attackers are the highest ids (ε·N of them, rounded to the nearest).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from fairbus.plots import plot_accuracy_curves
from fairbus.seccl_simulation import PAPER_TRAINING, SecclSimulation, SecclSimulationConfig
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.config import TrainConfig
from fairbus.training.data import DATASET_MODELS, load_dataset
from fairbus.training.local import Evaluator, Trainer
from fairbus.training.models import initial_params

FIG4_USERS = (20, 30)
FIG4_SHARES = (0.2, 0.4)
FIG5_USERS = 20
FIG5_SHARE = 0.2
FIG5_EPSILONS = (0.1, 0.2, 0.25, 0.3)
FIG5_ATTACK_FROM = 5


@dataclass(frozen=True)
class Run:
    """One curve of a figure."""

    label: str
    config: SecclSimulationConfig


def flippers(users: int, epsilon: float) -> dict[int, Attack]:
    """ε·N colluding label-flippers (nearest whole number), the highest ids."""
    count = int(epsilon * users + 0.5)
    return {u: Attack(Behaviour.LABEL_FLIPPER) for u in range(users - count + 1, users + 1)}


def figure4_runs(base: SecclSimulationConfig) -> list[Run]:
    return [
        Run(f"N = {n}, λ = {share}", replace(base, users=n, candidate_share=share, attacks={}))
        for n in FIG4_USERS
        for share in FIG4_SHARES
    ]


def figure5_runs(base: SecclSimulationConfig) -> list[Run]:
    return [
        Run(
            f"ε = {eps}",
            replace(
                base,
                users=FIG5_USERS,
                candidate_share=FIG5_SHARE,
                attacks=flippers(FIG5_USERS, eps),
                attack_from=FIG5_ATTACK_FROM,
                collude=True,
            ),
        )
        for eps in FIG5_EPSILONS
    ]


def accuracies(config: SecclSimulationConfig) -> list[float]:
    """The global model's test accuracy after each round of one run."""
    import torch

    torch.set_num_threads(1)
    return [r.global_accuracy for r in SecclSimulation(config).run()]


def baseline(config: SecclSimulationConfig, epochs: int) -> float:
    """Training on all the data with the same settings (lr, batch size), ``epochs``
    passes from the same initial model: the paper's dashed line."""
    import torch

    torch.set_num_threads(1)
    train, test = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    model = config.model or DATASET_MODELS[config.dataset]
    settings = TrainConfig(
        lr=config.train.lr,
        batch_size=config.train.batch_size,
        momentum=config.train.momentum,
        local_epochs=epochs,
        equal_steps=False,
    )
    trained = Trainer(model, train, settings, seed=config.seed).train(
        initial_params(model, config.seed)
    )
    return Evaluator(model, test).accuracy(trained)


def run_figure(
    runs: Sequence[Run],
    *,
    workers: int = 1,
    on_done: Callable[[Run, list[float]], None] | None = None,
) -> list[tuple[str, list[float]]]:
    """Every run's accuracy curve (``workers`` processes in parallel)."""
    curves: list[tuple[str, list[float]]] = []
    if workers <= 1:
        for run in runs:
            curve = accuracies(run.config)
            curves.append((run.label, curve))
            if on_done is not None:
                on_done(run, curve)
        return curves
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(accuracies, [run.config for run in runs]))
    for run, curve in zip(runs, results, strict=True):
        curves.append((run.label, curve))
        if on_done is not None:
            on_done(run, curve)
    return curves


def write_figure(
    name: str,
    title: str,
    curves: list[tuple[str, list[float]]],
    out: Path,
    reference: float | None,
) -> Path:
    """``out/<name>.png`` and ``out/<name>.json`` (the curves and the baseline)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"title": title, "baseline": reference, "curves": dict(curves)}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return plot_accuracy_curves(curves, out / f"{name}.png", title, reference)


DEFAULT_BASE = SecclSimulationConfig(train=PAPER_TRAINING)
