"""``fairbus simulate``: N users, a provider and the ledger in one process, with the real
protocol; the run's ledger is kept (SQLite store and blob store) and audited at the end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fairbus.errors import FairbusError
from fairbus.protocol.provider import ProviderConfig
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.config import AUTO_WORKERS_FROM, MAX_LOCAL_STEPS, TrainConfig, default_workers
from fairbus.wire.messages import DEFAULT_KEYING, FAIRNESS, MODES, SECCL
from fairbus_cli import detection_options as options
from fairbus_cli import keying_option, training_options
from fairbus_cli.errors import say

if TYPE_CHECKING:  # torch comes with these: imported only when a command runs
    from fairbus.ledger.records import Block
    from fairbus.roster import Roster
    from fairbus.rounds import RoundRecord
    from fairbus.seccl_simulation import SecclSimulationConfig
    from fairbus.simulator import DropoutPlan, SimulationConfig

console = Console()
DEFAULTS = ProviderConfig()


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _dropout(text: str) -> DropoutPlan:
    from fairbus.simulator import DropoutPlan

    try:
        round_, user, phase = text.split(":")
        if phase not in ("negotiation", "upload"):
            raise ValueError(phase)
        return DropoutPlan(int(round_), int(user), phase)  # type: ignore[arg-type]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected ROUND:USER:PHASE with PHASE negotiation or upload"
        ) from None


def simulate(
    mode: str = typer.Option(
        FAIRNESS,
        help="fairness (grouping, masking, Alg. 6) | seccl (top-θ changes, peer F-scores, "
        "the Borda election; SecCL).",
    ),
    users: int = typer.Option(9, help="Number of users."),
    rounds: int = typer.Option(10, help="Training rounds."),
    seed: int = typer.Option(0, help="Seed for data split, model init and grouping."),
    dataset: str = typer.Option(
        "digits", help="digits | mnist | cifar10 | torchvision-mnist | torchvision-cifar10"
    ),
    data_dir: Path | None = typer.Option(
        None, help="Directory of MNIST IDX or CIFAR-10 batch files."
    ),
    partition: str = typer.Option(
        "iid",
        help="How the training set is split: iid | dirichlet (each class over the users by "
        "Dir(alpha)) | classes (two or three classes per user) | quantity (IID labels, "
        "sizes by Dir(alpha)).",
    ),
    alpha: float = typer.Option(
        0.5, help="Dirichlet concentration of the dirichlet and quantity partitions."
    ),
    poisoners: str = typer.Option("", help="Comma-separated ids of poisoning users."),
    free_riders: str = typer.Option("", help="Comma-separated ids of free-riders."),
    disguised_free_riders: str = typer.Option("", help="Free-riders that add small noise."),
    label_flippers: str = typer.Option("", help="Users that train on flipped labels."),
    poison_scale: float = typer.Option(1.0, help="How far poisoners move against the gradient."),
    noise_std: float = typer.Option(1e-3, help="Noise of disguised free-riders."),
    dropout: list[str] = typer.Option(
        [], help="ROUND:USER:PHASE, PHASE = negotiation | upload (repeatable)."
    ),
    collusion: int = typer.Option(
        1,
        min=0,
        max=16,
        help="Collusion bound c: no model may follow from the group sums and any c models "
        "(groups of max(3, c + 2)).",
    ),
    keying: str = typer.Option(
        DEFAULT_KEYING, help=keying_option.HELP, callback=keying_option.known_keyings
    ),
    basic_groupings: int = typer.Option(2, help="Basic groupings per round (Alg. 2)."),
    key_repeats: int = typer.Option(
        DEFAULTS.key_repeats, help="Most focus groups per key user, KIN (Alg. 2)."
    ),
    bound_score: float = options.BOUND_SCORE,
    bound_conf: float = options.BOUND_CONF,
    tolerance: float = options.TOLERANCE,
    contribution_tolerance: float = options.CONTRIBUTION_TOLERANCE,
    key_score: float = options.KEY_SCORE,
    min_evidence: int = options.MIN_EVIDENCE,
    carry_evidence: bool = options.CARRY_EVIDENCE,
    evidence_window: int = options.EVIDENCE_WINDOW,
    level_rounds: int = options.LEVEL_ROUNDS,
    relative_tolerance: float = options.RELATIVE_TOLERANCE,
    weight_floor: float = options.WEIGHT_FLOOR,
    noise_widening: float = options.NOISE_WIDENING,
    key_evidence_only: bool = options.KEY_EVIDENCE_ONLY,
    contribution_direction: options.Direction = options.CONTRIBUTION_DIRECTION,
    contribution_layers: options.Layers = options.CONTRIBUTION_LAYERS,
    noise_ceiling: float = options.NOISE_CEILING,
    suspect_weight: float = options.SUSPECT_WEIGHT,
    weight_veto: float = options.WEIGHT_VETO,
    plateau_gain: float = options.PLATEAU_GAIN,
    rank_below: float = options.RANK_BELOW,
    convict_below: float = options.CONVICT_BELOW,
    veto_without_departed: bool = options.VETO_WITHOUT_DEPARTED,
    believed_noise: float = options.BELIEVED_NOISE,
    trusted_weight: float = options.TRUSTED_WEIGHT,
    class_lead: float = options.CLASS_LEAD,
    widening_cap: float = options.WIDENING_CAP,
    undefended: bool = typer.Option(False, help="Plain FedAvg: no detection, no exclusion."),
    local_epochs: int = typer.Option(TrainConfig.local_epochs, help="Local epochs per round."),
    local_steps: int | None = typer.Option(
        None,
        min=1,
        max=MAX_LOCAL_STEPS,
        help="SGD steps per round for every user, whatever its data size (default: the "
        "steps --local-epochs passes take on an average user's data).",
    ),
    equal_steps: bool = typer.Option(
        TrainConfig.equal_steps,
        help="Every user takes the same number of SGD steps a round; --no-equal-steps: "
        "--local-epochs passes over each user's own data (more data, more steps).",
    ),
    absent_class_scale: float | None = training_options.ABSENT_CLASS_SCALE,
    proximal_mu: float = training_options.PROXIMAL_MU,
    lr: float | None = typer.Option(
        None,
        help=f"Local SGD learning rate (default: the paper's, {TrainConfig.lr}; seccl: 0.02).",
    ),
    batch_size: int | None = typer.Option(
        None, help=f"Local batch size (default: the paper's, {TrainConfig.batch_size}; seccl: 32)."
    ),
    theta: float = typer.Option(
        0.1, help="seccl: θ, the fraction of parameter changes each participant shares."
    ),
    candidate_share: float = typer.Option(
        0.2, help="seccl: λ, the fraction of participants elected as candidates each round."
    ),
    validation_share: float = typer.Option(
        0.2, help="seccl: the share of its own data each participant keeps for validation."
    ),
    attack_from: int = typer.Option(
        1, min=1, help="seccl: the first round in which the attackers attack (and collude)."
    ),
    collude: bool = typer.Option(
        True, help="seccl: attackers give each other the top of their ballots."
    ),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="Processes that train the users (default: one per core from "
        f"{AUTO_WORKERS_FROM} users on, else 1); the models are the same either way. "
        "Fairness mode.",
    ),
    out: Path = typer.Option(Path("out/simulate"), help="Where rounds.jsonl and the plots go."),
) -> None:
    """Run N users for R rounds in one process with the real protocol and real training.

    Writes OUT/rounds.jsonl (one JSON line per round: group and global accuracy, scores,
    intervals, key users, violators, timings, bytes per message type) and the plots
    OUT/accuracy.png and OUT/scores.png. With --mode seccl: SecCL's protocol (the task
    start records the mode; the ledger re-derives every election and new global model);
    each line holds the candidates and Borda totals, the plots are OUT/accuracy.png and
    OUT/candidates.png.
    """
    attacks: dict[int, Attack] = {}
    for ids, behaviour in (
        (poisoners, Behaviour.POISONER),
        (free_riders, Behaviour.FREE_RIDER),
        (disguised_free_riders, Behaviour.DISGUISED_FREE_RIDER),
        (label_flippers, Behaviour.LABEL_FLIPPER),
    ):
        for user in _ids(ids):
            attacks[user] = Attack(behaviour, poison_scale, noise_std)
    if mode not in MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")

    def train_with(defaults: TrainConfig) -> TrainConfig:
        return _train_config(defaults, lr, batch_size, local_epochs, local_steps, equal_steps,
                             absent_class_scale, proximal_mu)  # fmt: skip

    if mode == SECCL:
        from fairbus.seccl_simulation import PAPER_TRAINING, SecclSimulationConfig

        if dropout or undefended:
            raise typer.BadParameter("--dropout and --undefended are not SecCL options")

        seccl = SecclSimulationConfig(
            users=users,
            rounds=rounds,
            seed=seed,
            dataset=dataset,
            data_dir=data_dir,
            partition=partition,  # type: ignore[arg-type]
            alpha=alpha,
            train=train_with(PAPER_TRAINING),
            theta=theta,
            candidate_share=candidate_share,
            validation_share=validation_share,
            attacks=attacks,
            attack_from=attack_from,
            collude=collude,
        )
        execute_seccl(seccl, out)
        return
    from fairbus.simulator import SimulationConfig

    config = SimulationConfig(
        users=users,
        rounds=rounds,
        seed=seed,
        dataset=dataset,
        data_dir=data_dir,
        partition=partition,  # type: ignore[arg-type]
        alpha=alpha,
        train=train_with(TrainConfig()),
        attacks=attacks,
        provider=ProviderConfig(
            basic_groupings=basic_groupings,
            key_repeats=key_repeats,
            detection=options.detection_params(
                bound_score,
                bound_conf,
                tolerance,
                contribution_tolerance,
                key_score,
                min_evidence,
                carry_evidence,
                evidence_window,
                level_rounds,
                relative_tolerance,
                weight_floor,
                noise_widening,
                key_evidence_only,
                contribution_direction,
                noise_ceiling,
                suspect_weight,
                weight_veto,
                plateau_gain,
                widening_cap,
                rank_below,
                convict_below,
                veto_without_departed,
                believed_noise,
                trusted_weight,
                contribution_layers,
                class_lead,
            ),
            defended=not undefended,
            seed=seed,
            collusion=collusion,
            keying=keying,
        ),
        dropouts=tuple(_dropout(d) for d in dropout),
        workers=default_workers(users) if workers is None else workers,
    )
    execute(config, out)


def _train_config(
    defaults: TrainConfig,
    lr: float | None,
    batch_size: int | None,
    local_epochs: int,
    local_steps: int | None,
    equal_steps: bool,
    absent_class_scale: float | None,
    proximal_mu: float,
) -> TrainConfig:
    """The local training the options give: ``--lr``, ``--batch-size`` and
    ``--absent-class-scale`` when given, else the mode's ``defaults`` (SecCL's paper
    trains otherwise than the fairness one)."""
    given = TrainConfig(
        lr=defaults.lr if lr is None else lr,
        batch_size=defaults.batch_size if batch_size is None else batch_size,
        local_epochs=local_epochs,
        local_steps=local_steps,
        equal_steps=equal_steps,
        absent_class_scale=defaults.absent_class_scale,
    )
    return training_options.with_remedies(given, absent_class_scale, proximal_mu)


def execute(config: SimulationConfig, out: Path) -> list[RoundRecord]:
    """Run ``config`` with a progress bar, write the log, plots and ledger, print a
    summary, then audit the ledger (``fairbus audit --config out/ledger/ledger.toml``)."""
    from fairbus_cli.ledger import print_report
    from fairbus_ledger_service import audit as auditing

    try:
        records, ledger = run_with_progress(config, out)
    except FairbusError as exc:
        say(console, "error", exc)
        raise typer.Exit(2) from None
    print_summary(records, config.attacks)
    print_timings(records)
    console.print(f"wrote {out / 'rounds.jsonl'}, {out / 'accuracy.png'}, {out / 'scores.png'}")
    console.print(f"ledger: {ledger.config} (`fairbus audit --config {ledger.config}`)")
    assert ledger.roster is not None
    print_report("audit", auditing.audit(ledger.raw_blocks(), ledger.roster, ledger.blobs))
    return records


class SimulationLedger:
    """Where a simulation's ledger is kept: ``<out>/ledger/`` holds the roster, a ledger
    configuration (SQLite store, blob store) that ``fairbus audit`` and ``fairbus ledger
    verify`` read, the store and the blobs. A new run starts it afresh."""

    def __init__(self, root: Path) -> None:
        import shutil

        from fairbus_ledger_service.blobs import BlobStore
        from fairbus_ledger_service.stores import SqliteStore

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.root = root
        self.config = root / "ledger.toml"
        self.config.write_text(
            "# The ledger of a `fairbus simulate` run (read by `fairbus audit`).\n"
            'roster = "roster.toml"\nstore = "sqlite"\nsqlite = "ledger.sqlite"\n'
            'blobs = "blobs"\n'
        )
        self.store = SqliteStore(root / "ledger.sqlite")
        self.blobs = BlobStore(root / "blobs")
        self.roster: Roster | None = None

    def keep(self, blocks: list[Block], roster: Roster) -> None:
        self.roster = roster
        (self.root / "roster.toml").write_text(roster.to_toml())

        async def append() -> None:
            for block in blocks:
                if not await self.store.append(block):
                    raise FairbusError(f"block {block.height} does not follow the store's head")

        asyncio.run(append())

    def raw_blocks(self) -> list[bytes]:
        return asyncio.run(self.store.read(0))


def rounds_progress() -> Progress:
    """The bar of a training run: rounds done, the global model's accuracy, time."""
    return Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds · global accuracy {task.fields[acc]}"),
        TimeElapsedColumn(),
        console=console,
    )


def run_with_progress(
    config: SimulationConfig, out: Path
) -> tuple[list[RoundRecord], SimulationLedger]:
    from fairbus.plots import plot_accuracy, plot_scores
    from fairbus.simulator import Simulation

    out.mkdir(parents=True, exist_ok=True)
    ledger = SimulationLedger(out / "ledger")
    log = out / "rounds.jsonl"
    with (
        log.open("w", encoding="utf-8") as sink,
        rounds_progress() as progress,
    ):
        task = progress.add_task("rounds", total=config.rounds, acc="–")

        def on_round(record: RoundRecord) -> None:
            sink.write(json.dumps(record.to_json()) + "\n")
            sink.flush()
            progress.update(task, advance=1, acc=f"{record.global_accuracy:.3f}")
            for user in record.violators:
                progress.console.log(f"round {record.round}: user {user} excluded as a violator")

        with console.status("loading data and keys…"):
            simulation = Simulation(config, on_blob=ledger.blobs.put)
        try:
            records = simulation.run(on_round)
        finally:
            ledger.keep(simulation.ledger.blocks, simulation.roster)
    attackers = set(config.attacks)
    plot_accuracy(records, out / "accuracy.png")
    plot_scores(records, out / "scores.png", attackers)
    return records, ledger


def print_summary(records: list[RoundRecord], attacks: dict[int, Attack]) -> None:
    table = Table(title="rounds")
    for column in ("round", "attempts", "global acc", "τ", "key users", "excluded now", "bytes"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            str(r.round),
            str(r.attempts),
            f"{r.global_accuracy:.3f}",
            "–" if r.tau is None else f"{r.tau:.3f}",
            ",".join(map(str, r.key_users)) or "–",
            ",".join(map(str, r.violators)) or "–",
            f"{sum(r.bytes.values()):,}",
        )
    console.print(table)
    excluded = {u for r in records for u in r.violators}
    attackers = set(attacks)
    console.print(
        f"attackers {sorted(attackers) or '–'}; excluded {sorted(excluded) or '–'}; "
        f"honest users excluded: {sorted(excluded - attackers) or 'none'}"
    )


def print_timings(records: list[RoundRecord]) -> None:
    """Seconds per round by phase (the simulator's ``timings_s``), and their means."""
    from fairbus.rounds import TIMING_PHASES

    phases = [p for p in (*TIMING_PHASES, "round") if any(p in r.timings_s for r in records)]
    table = Table(title="seconds per round, by phase")
    for column in ("round", *phases):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(str(r.round), *(f"{r.timings_s.get(p, 0.0):.2f}" for p in phases))
    if len(records) > 1:
        table.add_row(
            "mean",
            *(
                f"{sum(r.timings_s.get(p, 0.0) for r in records) / len(records):.2f}"
                for p in phases
            ),
            style="bold",
        )
    console.print(table)


def execute_seccl(config: SecclSimulationConfig, out: Path) -> list[RoundRecord]:
    """Run a SecCL simulation with a progress bar; write rounds.jsonl, accuracy.png and
    candidates.png and the ledger; print a summary; audit the ledger."""
    from fairbus.plots import plot_accuracy, plot_candidates
    from fairbus.seccl_simulation import SecclSimulation
    from fairbus_cli.ledger import print_report
    from fairbus_ledger_service import audit as auditing

    out.mkdir(parents=True, exist_ok=True)
    ledger = SimulationLedger(out / "ledger")
    try:
        with (
            (out / "rounds.jsonl").open("w", encoding="utf-8") as sink,
            rounds_progress() as progress,
        ):
            task = progress.add_task("rounds", total=config.rounds, acc="–")

            def on_round(record: RoundRecord) -> None:
                sink.write(json.dumps(record.to_json()) + "\n")
                sink.flush()
                progress.update(task, advance=1, acc=f"{record.global_accuracy:.3f}")

            with console.status("loading data and keys…"):
                simulation = SecclSimulation(config, on_blob=ledger.blobs.put)
            try:
                records = simulation.run(on_round)
            finally:
                ledger.keep(simulation.ledger.blocks, simulation.roster)
    except FairbusError as exc:
        say(console, "error", exc)
        raise typer.Exit(2) from None
    attackers = set(config.attacks)
    title = f"SecCL: {config.users} participants, λ = {config.candidate_share}, θ = {config.theta}"
    plot_accuracy(records, out / "accuracy.png", title)
    plot_candidates(records, out / "candidates.png", attackers)
    table = Table(title="SecCL rounds")
    for column in ("round", "global acc", "candidates", "attackers elected", "bytes"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            str(r.round),
            f"{r.global_accuracy:.3f}" + (" (failed)" if r.failed else ""),
            ",".join(map(str, r.candidates)) or "–",
            ",".join(
                str(u) for u in r.candidates if u in attackers and r.round >= config.attack_from
            )
            or "–",
            f"{sum(r.bytes.values()):,}",
        )
    console.print(table)
    console.print(f"wrote {out / 'rounds.jsonl'}, {out / 'accuracy.png'}, {out / 'candidates.png'}")
    console.print(f"ledger: {ledger.config} (`fairbus audit --config {ledger.config}`)")
    if ledger.roster is None:
        raise typer.Exit(2)
    print_report("audit", auditing.audit(ledger.raw_blocks(), ledger.roster, ledger.blobs))
    return records
