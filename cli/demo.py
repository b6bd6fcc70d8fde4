"""``fairbus demo``: what ``make demo`` runs.

Until the networked runtime exists: a simulated training of 9 users on digits, one a
poisoner and one a free-rider, through the real protocol machines and crypto (what
``fairbus simulate --poisoners 2 --free-riders 5`` runs). The networked runtime
replaces it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cli.simulate import execute
from fairbus.training.attacks import Attack, Behaviour


def demo(
    rounds: int = typer.Option(10, help="Training rounds."),
    seed: int = typer.Option(0, help="Seed for data split, model init and grouping."),
    out: Path = typer.Option(Path("out/demo"), help="Where rounds.jsonl and the plots go."),
) -> None:
    """Train 9 users on digits; user 2 poisons, user 5 free-rides; plots in OUT."""
    from fairbus.simulator import SimulationConfig

    attacks = {2: Attack(Behaviour.POISONER), 5: Attack(Behaviour.FREE_RIDER)}
    execute(SimulationConfig(users=9, rounds=rounds, seed=seed, attacks=attacks), out)
