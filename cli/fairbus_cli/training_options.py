"""The local-training options shared by ``fairbus simulate`` and ``fairbus bench detection``."""

from __future__ import annotations

import dataclasses

import typer

from fairbus.training.config import MAX_PROXIMAL_MU, TrainConfig

ABSENT_CLASS_SCALE = typer.Option(
    None,
    min=0.0,
    max=1.0,
    show_default=False,
    help="Restricted softmax (FedRS): while a user trains, the logits of the classes its "
    "data lacks are scaled by this, so it does not forget them (1 = plain softmax; "
    f"recorded at task start). Default: {TrainConfig.absent_class_scale} (SecCL mode: 1, "
    "as its paper trains).",
)
PROXIMAL_MU = typer.Option(
    TrainConfig.proximal_mu,
    min=0.0,
    max=MAX_PROXIMAL_MU,
    help="FedProx: local training adds μ/2 ‖w − w_global‖² to the loss (0 = off; recorded "
    "at task start).",
)


def with_remedies(
    train: TrainConfig, absent_class_scale: float | None, proximal_mu: float
) -> TrainConfig:
    """``train`` with the options' remedies; ``--absent-class-scale`` unset keeps
    ``train``'s own (the mode's default)."""
    scale = train.absent_class_scale if absent_class_scale is None else absent_class_scale
    return dataclasses.replace(train, absent_class_scale=scale, proximal_mu=proximal_mu)
