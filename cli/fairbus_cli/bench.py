"""``fairbus bench``: benchmarks that print numbers (see README for the measured tables)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fairbus.bench import crypto
from fairbus.errors import FairbusError
from fairbus.protocol.provider import ProviderConfig
from fairbus.training.config import MAX_LOCAL_STEPS, TrainConfig
from fairbus.wire.messages import KEYINGS
from fairbus_cli import detection_options as options
from fairbus_cli import keying_option, training_options

if TYPE_CHECKING:
    from fairbus.bench.detection import RunResult, SuiteSummary
    from fairbus.bench.scale import SimRow
    from fairbus.rounds import RoundRecord
    from fairbus.training.attacks import Attack

DEFAULTS = ProviderConfig()

app = typer.Typer(help="Benchmarks that print measured numbers.", no_args_is_help=True)
console = Console()


@app.command("crypto")
def crypto_bench(
    params: int = typer.Option(
        crypto.PAPER_MNIST_PARAMS, help="Model size d (default: the paper's MNIST CNN)."
    ),
    group_size: int = typer.Option(3, help="Users per group, |I_g| (at least 3)."),
    threshold: int | None = typer.Option(None, help="Shamir threshold t (default |I_g|)."),
    repeats: int = typer.Option(20, help="Fresh groups to time (median and p90 reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Time Algorithms 3-5 for one group on one core, beside the paper's Table 1.

    Per user: share generation, sealing, summation, reconstruction, key derivation,
    masking, signing the upload. Per group: the provider's verification and unmasking.
    Beside them the compact pairwise keying, in units of one libsodium expansion of a
    model-size vector timed in the same run, and the bytes a user sends per group.
    """
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing groups", total=repeats)
        result = crypto.run(
            params,
            group_size,
            threshold,
            repeats,
            progress=lambda done: progress.update(task, completed=done),
        )
    timings = result.timings
    if as_json:
        out = {
            step: {"median_ms": timings.median(step), "p90_ms": timings.p90(step)}
            for step in timings.samples
        }
        out["user_total"] = {"median_ms": result.user_total_ms}
        out["pairwise_total"] = {"median_ms": result.pairwise_total_ms}
        summary = {
            "params": params,
            "exact": result.exact,
            "pairwise_exact": result.pairwise_exact,
            "pairwise_in_expansions": result.pairwise_in_expansions,
            "bytes_per_group": result.bytes_per_group,
            "steps": out,
        }
        console.print_json(json.dumps(summary))
        return
    table = Table(
        title=(
            f"Algorithms 3-5, d = {params:,}, |I_g| = {group_size}, t = {result.threshold}, "
            f"{repeats} groups, {result.cpu}"
        )
    )
    table.add_column("who")
    table.add_column("step")
    table.add_column("median ms", justify="right")
    table.add_column("p90 ms", justify="right")

    def row(who: str, step: str) -> None:
        table.add_row(who, step, f"{timings.median(step):.2f}", f"{timings.p90(step):.2f}")

    for step in crypto.USER_COMPUTE_STEPS:
        row("user", step)
    ok = result.user_total_ms <= crypto.USER_TARGET_MS
    table.add_row(
        "user",
        "[bold]per-group computation (Alg. 3 + 4)[/]",
        f"[bold]{result.user_total_ms:.2f}[/]",
        f"target ≤ {crypto.USER_TARGET_MS:.0f} {'✓' if ok else '✗'}",
    )
    for step in crypto.USER_IO_STEPS:
        row("user", step)
    for step in crypto.PROVIDER_STEPS:
        row("provider", step)
    ok = result.unmask_ms <= crypto.PROVIDER_TARGET_MS
    table.add_row(
        "provider", "", "", f"unmask target ≤ {crypto.PROVIDER_TARGET_MS:.0f} {'✓' if ok else '✗'}"
    )
    console.print(table)
    paper = Table(title="beside the paper's Table 1 (per encryption / decryption)")
    for column in ("", "fairbus", "paper (Shamir)", "BCP"):
        paper.add_column(column, justify="right")
    paper.add_row(
        "encryption (key negotiation + masking)",
        f"{result.user_total_ms:.1f} ms",
        f"{crypto.PAPER_ENCRYPT_MS:.0f} ms",
        f"{crypto.BCP_ENCRYPT_MS:,.0f} ms",
    )
    paper.add_row(
        "decryption (group unmask)",
        f"{result.unmask_ms:.1f} ms",
        "≈ 0 (plain averaging)",
        f"{crypto.BCP_DECRYPT_MS:,.0f} ms",
    )
    console.print(paper)
    keyings = Table(title="keyings per user and group (issue 16): Alg. 3 against pairwise keys")
    for column in ("", "Alg. 3 (shamir)", "pairwise", "target"):
        keyings.add_column(column, justify="right")
    expansion = timings.median("one expansion")
    ratio = result.pairwise_in_expansions
    ok = ratio <= crypto.PAIRWISE_TARGET_EXPANSIONS
    keyings.add_row(
        "computation (key + masking)",
        f"{result.user_total_ms:.2f} ms = {result.user_total_ms / expansion:.1f} expansions",
        f"{result.pairwise_total_ms:.2f} ms = {ratio:.1f} expansions",
        f"≤ {crypto.PAIRWISE_TARGET_EXPANSIONS:.0f} expansions {'✓' if ok else '✗'}",
    )
    keyings.add_row("one expansion of d values (libsodium)", f"{expansion:.2f} ms", "", "")
    sent = result.bytes_per_group
    keyings.add_row(
        "bytes sent (shares and upload)", f"{sent['shamir']:,}", f"{sent['pairwise']:,}", ""
    )
    console.print(keyings)
    for name, exact in (("Alg. 3", result.exact), ("pairwise", result.pairwise_exact)):
        verdict = "[green]exact[/]" if exact else "[red]NOT exact[/]"
        console.print(
            f"{name}: decrypted group sums equal the plaintext encodings' sums: {verdict}"
        )
    if not (result.exact and result.pairwise_exact):
        raise typer.Exit(1)


@app.command("evaluation")
def evaluation_bench(
    model: str = typer.Option(
        "mnist_cnn", help="mnist_cnn (the paper's), cifar10_cnn or digits_cnn."
    ),
    samples: int = typer.Option(1000, help="Test samples (MNIST's test set has 10,000)."),
    digits: bool = typer.Option(
        False, "--digits-test-set", help="digits_cnn on scikit-learn's digits test set (450)."
    ),
    groups: int = typer.Option(
        8, min=1, help="G, the group models evaluated together (8: a round at 9 users)."
    ),
    repeats: int = typer.Option(5, help="Evaluations to time (medians reported)."),
    threads: int = typer.Option(1, help="Torch threads."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """What the ledger's re-derivation of an evaluation costs (issue 13): per group, the
    sum of the masked uploads and the exact fixed-point evaluation on the committed test
    set, beside the float32 evaluation the provider ran before; G group models evaluated
    separately and in one batched pass (issue 16, item 3); per round with G groups, with
    the contributions. Exits 1 if a batched count differs from the separate one."""
    from fairbus.bench import evaluation

    if model not in evaluation.INPUT_SHAPES:
        raise typer.BadParameter(
            f"choose one of {sorted(evaluation.INPUT_SHAPES)}", param_hint="--model"
        )
    if digits and model != "digits_cnn":
        raise typer.BadParameter("only with --model digits_cnn", param_hint="--digits-test-set")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=repeats)
        result = evaluation.run(
            model, samples, repeats, threads,
            progress=lambda done: progress.update(task, completed=done),
            groups=groups, digits=digits,
        )  # fmt: skip
    g = result.groups
    rows = {
        "float32 evaluation (before), s": result.float_s,
        "exact evaluation, s": result.exact_s,
        "exact / float32": result.exact_s / result.float_s,
        "sum of 3 masked uploads, s": result.aggregate_s,
        "per group (sum + exact evaluation), s": result.group_s,
        f"{g} exact evaluations, one-model pass before issue 16, s": result.unbatched_s,
        f"{g} exact evaluations, one call each, s": result.separate_s,
        f"one batched exact evaluation of {g}, s": result.batched_s,
        "before issue 16 / batched": result.unbatched_s / result.batched_s,
        "one call each / batched": result.separate_s / result.batched_s,
        f"contributions of {g} groups, s": result.contributions_s,
        f"per round, {g} groups (sums + batched evaluation + contributions), s": result.round_s,
    }
    test_set = "the digits test set" if digits else "synthetic"
    if as_json:
        console.print_json(json.dumps({"model": model, "samples": result.samples,
                                       "test_set": test_set, "threads": threads, "groups": g,
                                       "batched_equal": result.batched_equal, **rows}))  # fmt: skip
    else:
        table = Table(title=f"Re-deriving an evaluation: {model}, {result.samples:,} test "
                      f"samples ({test_set}), {threads} thread(s), G = {g}")  # fmt: skip
        table.add_column("what")
        table.add_column("value", justify="right")
        for name, value in rows.items():
            table.add_row(name, f"{value:.3f}")
        console.print(table)
        verdict = "[green]equal[/]" if result.batched_equal else "[red]NOT equal[/]"
        console.print(f"batched counts and the separate ones, model by model: {verdict}")
    if not result.batched_equal:
        raise typer.Exit(1)


class Suite(StrEnum):
    """The scenario lists of ``fairbus bench detection`` (``detection.SUITES``)."""

    PAPER = "paper"
    FAIRNESS = "fairness"


@app.command("detection")
def detection_bench(
    seeds: int = typer.Option(
        20, help="Seeds per scenario (fairness suite: those with 15/30 users or 50 rounds take 5)."
    ),
    rounds: int = typer.Option(
        10, help="Rounds per run (fairness suite: but the 50-round scenario's)."
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
    key_repeats: int = typer.Option(
        DEFAULTS.key_repeats, help="Most focus groups per key user (KIN)."
    ),
    basic_groupings: int = typer.Option(2, help="Basic groupings per round."),
    local_steps: int | None = typer.Option(
        None,
        min=1,
        max=MAX_LOCAL_STEPS,
        help="SGD steps per round for every user, whatever its data size (default: the "
        f"steps {TrainConfig.local_epochs} passes take on an average user's data).",
    ),
    equal_steps: bool = typer.Option(
        TrainConfig.equal_steps,
        help="Every user takes the same number of SGD steps a round; --no-equal-steps: "
        f"{TrainConfig.local_epochs} passes over each user's own data.",
    ),
    absent_class_scale: float | None = training_options.ABSENT_CLASS_SCALE,
    proximal_mu: float = training_options.PROXIMAL_MU,
    workers: int = typer.Option(len(os.sched_getaffinity(0)), help="Parallel simulations."),
    suite: Suite = typer.Option(
        Suite.PAPER,
        help="paper: 0+0 to 3+3 poisoners + free-riders among 9 users; fairness: issue 13's "
        "scenarios (non-IID data, disguised free-riders, poisoner step sizes, label-flippers, "
        "15 and 30 users, 50 rounds) with its targets.",
    ),
    scenario: list[str] = typer.Option(
        [], "--scenario", help="Only the suite's scenarios of this name (repeat)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    runs_out: Path | None = typer.Option(
        None,
        "--runs-out",
        dir_okay=False,
        help="Also append every run to this file as it finishes, one JSON line each "
        "(scenario, seed, defended, attackers, the round each excluded user went, final "
        "accuracy, mean scores): a long suite stopped early keeps what it ran.",
    ),
    trace: int | None = typer.Option(
        None,
        min=0,
        help="Run only this seed of the one --scenario chosen (defended) and print every "
        "round: each group's members (attackers marked P poisoner, F free-rider, D "
        "disguised, L label-flipper), accuracy, contribution over the clean level and "
        "score; τ, the level, key users and violators.",
    ),
) -> None:
    """Detection among 9 users: 0, 1+1, 2+2 and 3+3 attackers (poisoners + free-riders);
    with --suite fairness, issue 13's scenarios.

    Per scenario and seed one defended run and (with attackers) one undefended FedAvg run;
    prints detection rate, false exclusions, rounds to detection and final accuracy.
    """
    params = options.detection_params(
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
    )
    from fairbus.bench import detection

    try:
        chosen = detection.select(detection.SUITES[suite.value], scenario)
    except FairbusError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scenario") from None
    train = training_options.with_remedies(
        TrainConfig(local_steps=local_steps, equal_steps=equal_steps),
        absent_class_scale,
        proximal_mu,
    )
    specs = detection.build_suite_specs(chosen, seeds, rounds, params, key_repeats,
                                        basic_groupings, train)  # fmt: skip
    if trace is not None:
        if len(chosen) != 1:
            raise typer.BadParameter(
                f"--trace needs one --scenario, got {len(chosen)}", param_hint="--scenario"
            )
        first = next(s for s in specs if s.defended)
        with console.status(f"simulating {chosen[0].name}, seed {trace}"):
            attacks, records = detection.trace_one(dataclasses.replace(first, seed=trace))
        _print_trace(chosen[0].name, trace, attacks, records)
        return
    with Progress(console=console, transient=True) as progress, _runs_file(runs_out) as out:
        task = progress.add_task("simulating", total=len(specs))
        results = detection.run_all(
            specs,
            workers,
            progress=lambda done: progress.update(task, completed=done),
            on_result=None if out is None else lambda r: _write_run(out, r),
        )
    policy = (
        f"bound_score {bound_score}, bound_conf {bound_conf}, tolerance {tolerance}, "
        f"contribution tolerance {params.contribution_tolerance}, key score "
        f"{params.key_score}, KIN {key_repeats}, "
        + (
            f"{local_steps} local steps"
            if local_steps is not None
            else f"local steps of {train.local_epochs} epochs on an average user's data"
            if equal_steps
            else f"{train.local_epochs} local epochs over each user's data"
        )
    )
    if suite is Suite.FAIRNESS:
        _fairness_table(detection.summarize_suite(results, chosen), policy, as_json)
        return
    summaries = detection.summarize(results, rounds)
    if as_json:
        console.print_json(json.dumps([vars(s) for s in summaries]))
        return
    table = Table(title=f"Alg. 6 on 9 users, digits, {seeds} seeds x {rounds} rounds; {policy}")
    for column in (
        "attackers (P+F)",
        "detected",
        "false excl. (seeds)",
        "all out by round " + str(rounds),
        "rounds to detect (mean / max)",
        "final acc",
        "no attack",
        "undefended",
        "score honest / attackers",
        "target",
    ):
        table.add_column(column, justify="right")
    for s in summaries:
        table.add_row(
            f"{s.poisoners}+{s.free_riders}",
            "–" if s.detection_rate is None else f"{s.detection_rate:.0%}",
            f"{s.false_exclusions} ({s.seeds_with_false_exclusion})",
            "–" if s.detection_rate is None else f"{s.seeds_all_caught_in_time}/{s.seeds}",
            "–"
            if s.rounds_to_detection_mean is None
            else f"{s.rounds_to_detection_mean:.1f} / {s.rounds_to_detection_max}",
            f"{s.accuracy_defended:.3f}",
            f"{s.accuracy_no_attack:.3f}",
            "–" if s.accuracy_undefended is None else f"{s.accuracy_undefended:.3f}",
            " / ".join(
                "–" if v is None else f"{v:.2f}" for v in (s.score_honest, s.score_attackers)
            ),
            "✓" if s.meets_target else "✗",
        )
    console.print(table)
    _print_stalls(
        (f"{s.poisoners}+{s.free_riders}", s.seeds_with_failed_round, s.seeds) for s in summaries
    )


_MARKS = {"poisoner": "P", "free_rider": "F", "disguised_free_rider": "D", "label_flipper": "L"}


@contextlib.contextmanager
def _runs_file(path: Path | None) -> Iterator[TextIO | None]:
    """``--runs-out``'s file, opened to append (None: no file)."""
    if path is None:
        yield None
        return
    try:
        out = path.open("a", encoding="utf-8")
    except OSError as exc:
        message = f"cannot write {path}: {exc.strerror}"
        raise typer.BadParameter(message, param_hint="--runs-out") from None
    with out:
        yield out


def _write_run(out: TextIO, result: RunResult) -> None:
    out.write(json.dumps(result.to_json()) + "\n")
    out.flush()


def _print_trace(
    name: str, seed: int, attacks: dict[int, Attack], records: list[RoundRecord]
) -> None:
    """Every round of one run, group by group: what Alg. 6 saw and decided."""
    marks = {u: _MARKS.get(a.behaviour.value, "?") for u, a in attacks.items()}
    who = ", ".join(f"{u}{m}" for u, m in sorted(marks.items())) or "none"
    console.print(f"[bold]{name}, seed {seed}[/] — attackers: {who}")
    for r in records:
        if r.failed is not None:
            console.print(f"round {r.round}: failed: {r.failed}")
            continue
        level = r.level
        title = (
            f"round {r.round}: τ {'–' if r.tau is None else f'{r.tau:.3f}'}, level "
            f"{'–' if level is None else f'{level:.4g}'}, accuracy {r.global_accuracy:.3f}"
        )
        table = Table(title=title, title_justify="left")
        for column in ("group", "kind", "members", "accuracy", "contribution / level", "scored"):
            table.add_column(column, justify="right")
        for g in r.groups:
            members = " ".join(f"{u}{marks.get(u, '')}" for u in g["members"])
            focus = f" on {g['focus']}" if g["focus"] is not None else ""
            c = g.get("contribution")
            ratio = "–" if c is None or not level else f"{c / level:.2f}"
            scored = g.get("scored")
            table.add_row(str(g["gid"]), g["kind"] + focus, members, f"{g['accuracy']:.3f}",
                          ratio, "–" if scored is None else "✓" if scored else "✗")  # fmt: skip
        console.print(table)
        scores = ", ".join(
            f"{u}{marks.get(u, '')} {s['score']:.2f}"
            for u, s in sorted(r.scores.items())
            if s["score"] is not None
        )
        console.print(f"  scores: {scores}", soft_wrap=True)
        if r.weights:
            weights = ", ".join(
                f"{u}{marks.get(u, '')} {w:.2f}" for u, w in sorted(r.weights.items())
            )
            console.print(f"  fitted θ: {weights}", soft_wrap=True)
        console.print(
            f"  key users: {r.key_users or '–'}; violators: {r.violators or '–'}; "
            f"excluded: {r.excluded or '–'}"
        )


def _print_stalls(rows: Iterable[tuple[str, int, int]]) -> None:
    """A line for each scenario (name, seeds stalled, seeds) where a defended run had a
    round that failed: its table row says nothing of it, and such a task learns no more."""
    for name, stalled, seeds in rows:
        if stalled:
            console.print(
                f"[yellow]{name}: {stalled}/{seeds} seeds had a round that failed "
                "(no grouping passed the exposure check)[/]"
            )


def _fairness_table(rows: list[SuiteSummary], policy: str, as_json: bool) -> None:
    """Print the fairness suite's rows, with issue 13's targets."""
    from dataclasses import asdict

    from fairbus.bench.detection import FEW_SEEDS

    if as_json:
        console.print_json(
            json.dumps([{**asdict(r), "meets_target": r.meets_target} for r in rows])
        )
        return
    table = Table(title=f"Alg. 6, issue 13's scenarios, digits; {policy}")
    for column in (
        "scenario",
        "users",
        "attackers",
        "seeds × rounds",
        "detected",
        "false excl. (seeds)",
        "all out by round 10",
        "rounds to detect (mean / max)",
        "final acc",
        "no attack",
        "undefended",
        "score honest / attackers",
        "target",
    ):
        table.add_column(column, justify="right")

    def number(value: float | None, form: str = ".3f") -> str:
        return "–" if value is None else format(value, form)

    for r in rows:
        t = r.tally
        data = {
            "dirichlet": f", non-IID α {r.alpha or 0:g}",
            "quantity": f", sizes Dir({r.alpha or 0:g})",
            "classes": ", 2-3 classes each",
        }.get(r.partition, "")
        wanted = ["0 false"]
        if r.all_out_target is not None:
            wanted.append(f"all out ≥ {r.all_out_target:.0%}")
        if r.detected_target is not None:
            wanted.append(f"detected ≥ {r.detected_target:.0%}")
        verdict = "✓" if r.meets_target else "✗ " + "; ".join(r.misses)
        table.add_row(
            r.name,
            f"{r.users}{data}",
            r.attacks,
            f"{t.seeds} × {r.rounds}",
            number(t.detection_rate, ".0%"),
            f"{t.false_exclusions} ({t.seeds_with_false_exclusion})",
            "–" if not r.attackers else f"{t.seeds_all_caught_in_time}/{t.seeds}",
            "–"
            if t.rounds_to_detection_mean is None
            else f"{t.rounds_to_detection_mean:.1f} / {t.rounds_to_detection_max}",
            number(t.accuracy_defended),
            number(r.accuracy_no_attack),
            number(t.accuracy_undefended),
            f"{number(t.score_honest, '.2f')} / {number(t.score_attackers, '.2f')}",
            f"{', '.join(wanted)}: {verdict}",
        )
    console.print(table)
    _print_stalls((r.name, r.tally.seeds_with_failed_round, r.tally.seeds) for r in rows)
    console.print(
        "Seeds: --seeds for the 9-user scenarios over --rounds, "
        f"{FEW_SEEDS} (at most --seeds) for 15 and 30 users and for 50 rounds. 'all out': "
        "seeds with every attacker excluded by round 10 (or the last round). 'no attack': "
        "the defended no-attack runs of the same users, data split and rounds. Targets "
        "(issue 13): no honest user excluded anywhere; every attacker out by round 10 in "
        "≥ 95% of seeds where attackers are at most a third of the users; 3+3 of 9: ≥ 80% "
        "detected."
    )


@app.command("ledger")
def ledger_bench(
    rate: float = typer.Option(500, help="Open-loop rate for the latency and failover runs."),
    seconds: float = typer.Option(10, help="Length of each run."),
    senders: int = typer.Option(48, help="Participants submitting, each its own chain."),
    window: int = typer.Option(16, help="Transactions each sender keeps in flight."),
    workdir: Path = typer.Option(Path("out/bench-ledger"), help="Files of the local cluster."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The replicated ledger through its MQTT front: Mosquitto, 3 etcd members, 3 ledger
    nodes on this machine, ~1 KB transactions. Prints committed tx/s, submit→receipt
    p50/p99, the writer-failover gap, and lost or duplicated transactions."""
    import asyncio
    import shutil

    from fairbus_ledger_service import bench as ledger_bench_module

    shutil.rmtree(workdir, ignore_errors=True)
    result = asyncio.run(
        ledger_bench_module.run(
            workdir,
            rate=rate,
            seconds=seconds,
            senders=senders,
            window=window,
            progress=lambda line: console.print(f"[dim]{line}[/]"),
        )
    )
    if as_json:
        console.print_json(json.dumps(vars(result)))
        return
    table = Table(title="fairbus ledger: Mosquitto + 3 etcd members + 3 ledger nodes, ~1 KB tx")
    for column in ("measure", "value", "target"):
        table.add_column(column)
    r = result
    table.add_row("committed tx/s (windowed)", f"{r.throughput_tx_s:,.0f}", ">= 3,000")
    table.add_row(
        "  submit→receipt p50 / p99 at that load",
        f"{r.throughput_p50_ms:.1f} / {r.throughput_p99_ms:.1f} ms",
        "",
    )
    table.add_row(
        f"submit→receipt p50 / p99 at {r.latency_rate:.0f} tx/s",
        f"{r.p50_ms:.1f} / {r.p99_ms:.1f} ms ({r.latency_acked}/{r.latency_sent} acked)",
        "p99 <= 50 ms",
    )
    table.add_row("  without a receipt 2 s after the run", f"{r.throughput_unanswered}", "0")
    table.add_row("writer failover gap", f"{r.failover_gap_s:.2f} s", "<= 3 s")
    table.add_row(
        "lost / duplicated",
        f"{r.failover_lost} of {r.failover_sent} / {r.duplicates}",
        "0 / 0",
    )
    table.add_row("blocks / transactions", f"{r.blocks:,} / {r.transactions:,}", "")
    console.print(table)


@app.command("round")
def round_bench(
    rounds: int = typer.Option(3, help="Rounds per run; the first is left out as warm-up."),
    per_user: int = typer.Option(6_667, help="Training images per user (paper: 60,000 / 9)."),
    broker: str = typer.Option("mosquitto", help="'mosquitto' or 'embedded'."),
    ledger: str = typer.Option("sqlite", help="'sqlite' or 'etcd'."),
    workdir: Path = typer.Option(Path("out/bench-round"), help="Files of the deployments."),
    keying: list[str] = typer.Option(
        list(KEYINGS),
        help="Keyings of the secure runs, one deployment each (repeat).",
        callback=keying_option.known_keyings,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """One secure round of 9 user processes training the paper's MNIST CNN (582,026
    parameters) over the network, by phase, with bytes per user and per upload, once per
    keying (Alg. 3's shares, or pairwise keys); and the same training as plain FedAvg
    over the same broker. Prints secure/plain for each."""
    from fairbus.bench import round as round_module

    runs, plain = round_module.bench(workdir, rounds=rounds, per_user=per_user, broker=broker,
                                     store=ledger, keyings=tuple(keying))  # fmt: skip
    ratios = {k: run.round_s / plain.round_s for k, run in runs.items()}
    byte_ratios = {k: run.bytes_per_user / plain.bytes_per_user for k, run in runs.items()}
    if as_json:
        console.print_json(json.dumps({"secure": {k: vars(r) for k, r in runs.items()},
                                       "plain": vars(plain), "ratio": ratios,
                                       "bytes_ratio": byte_ratios}))  # fmt: skip
        return
    table = Table(title=f"one round, 9 users, MNIST CNN, {broker} broker, {ledger} ledger")
    table.add_column("measure")
    for k in runs:
        table.add_column(f"secure, {k}")
    table.add_column("plain FedAvg")
    table.add_column("target")

    def row(what: str, cell: Callable[[round_module.RoundRun], str], target: str = "") -> None:
        table.add_row(what, *(cell(r) for r in runs.values()), cell(plain), target)

    row("round wall time", lambda r: f"{r.round_s:.2f} s")
    table.add_row("  secure / plain", *(f"{ratios[k]:.3f}" for k in runs), "",
                  "≤ 1.05 with pairwise keys")  # fmt: skip
    for phase in runs[next(iter(runs))].phases_s:
        row(f"  {phase}", lambda r, p=phase: f"{r.phases_s.get(p, 0.0):.3f} s")  # type: ignore[misc]
    size = round_module.MODEL_FLOAT32_BYTES
    row("bytes sent per user", lambda r: f"{r.bytes_per_user:,.0f}")
    table.add_row("  secure / plain", *(f"{byte_ratios[k]:.2f}" for k in runs), "",
                  "≤ 1.05 with pairwise keys")  # fmt: skip
    row("bytes per upload", lambda r: f"{r.bytes_per_upload:,.0f}",
        f"{size:,} ± 5%")  # fmt: skip
    row("global accuracy (last round)", lambda r: f"{r.accuracy:.3f}")
    console.print(table)


@app.command("flower")
def flower_bench(
    flwr_python: Path = typer.Option(
        Path(".venv-flower/bin/python"),
        envvar="FAIRBUS_FLWR_PYTHON",
        help="Python (or bin folder) of the separate venv where flwr 1.42.0 is installed "
        "(env FAIRBUS_FLWR_PYTHON).",
    ),
    rounds: int = typer.Option(3, min=2, help="Rounds per run; the first is left out as warm-up."),
    clients: int = typer.Option(9, min=3, help="SuperNodes / fairbus users."),
    per_user: int = typer.Option(6_667, help="Training images per client (paper: 60,000 / 9)."),
    broker: str = typer.Option("mosquitto", help="fairbus: 'mosquitto' or 'embedded'."),
    ledger: str = typer.Option("sqlite", help="fairbus: 'sqlite' or 'etcd'."),
    keying: list[str] = typer.Option(
        list(KEYINGS),
        help="Keyings of fairbus's secure runs, one deployment each (repeat).",
        callback=keying_option.known_keyings,
    ),
    num_shares: int = typer.Option(3, help="SecAgg+ shares per client's secrets."),
    reconstruction_threshold: int = typer.Option(2, help="SecAgg+ reconstruction threshold."),
    run_fairbus: bool = typer.Option(True, "--fairbus/--no-fairbus", help="Run fairbus's side."),
    run_flower: bool = typer.Option(True, "--flower/--no-flower", help="Run Flower's side."),
    workdir: Path = typer.Option(Path("out/bench-flower"), help="Files of the deployments."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """fairbus beside Flower (deployment engine: a SuperLink and one SuperNode per client
    on loopback, no Ray): fairbus secure against Flower's SecAgg+, plain against plain
    FedAvg, on the paper's MNIST CNN with the same data, local training and threads as
    `fairbus bench round`, in one run. Prints round wall time and bytes sent per client
    and round of each, and their ratios. Flower lives in its own venv (--flwr-python)."""
    from fairbus.bench import flower

    tools = flower.FlowerTools.find(flwr_python) if run_flower else flower.FlowerTools(Path())
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def note(text: str) -> None:
            bar.update(task, description=text)
            bar.console.log(text)

        result = flower.bench(
            tools, workdir, rounds=rounds, clients=clients, per_user=per_user, broker=broker,
            store=ledger, keyings=tuple(keying), num_shares=num_shares,
            reconstruction_threshold=reconstruction_threshold, run_fairbus=run_fairbus,
            run_flower=run_flower, progress=note,
        )  # fmt: skip
    rows = flower.comparison_rows(*result.sides())
    summary = json.dumps(
        {
            "flwr": result.flwr_version,
            "clients": clients,
            "rounds": rounds,
            "local_steps": result.local_steps,
            "flower_plain": result.flower_plain and vars(result.flower_plain),
            "flower_secaggplus": result.flower_secure and vars(result.flower_secure),
            "fairbus_plain": result.fairbus_plain and vars(result.fairbus_plain),
            "fairbus_secure": {k: vars(r) for k, r in result.fairbus_secure.items()},
            "ratios": [dict(zip(("measure", "fairbus", "flower", "ratio"), row, strict=True))
                       for row in rows],
        }
    )  # fmt: skip
    (workdir / "result.json").write_text(summary)
    if as_json:
        console.print_json(summary)
        return
    title = (
        f"{clients} clients, MNIST CNN, {result.local_steps} SGD steps a round, "
        f"means over rounds 2-{rounds}; Flower {result.flwr_version} deployment engine"
    )
    table = Table(title=title)
    for column in ("per round", "wall time", "bytes sent per client", "received per client",
                   "accuracy (last)"):  # fmt: skip
        table.add_column(column, justify="left" if column == "per round" else "right")
    for k, r in result.fairbus_secure.items():
        table.add_row(f"fairbus secure ({k})", f"{r.round_s:.2f} s",
                      f"{r.bytes_per_user:,.0f}", "–", f"{r.accuracy:.3f}")  # fmt: skip
    if (p := result.fairbus_plain) is not None:
        table.add_row("fairbus plain FedAvg", f"{p.round_s:.2f} s", f"{p.bytes_per_user:,.0f}",
                      "–", f"{p.accuracy:.3f}")  # fmt: skip
    for label, f in (("Flower SecAgg+", result.flower_secure),
                     ("Flower plain FedAvg", result.flower_plain)):  # fmt: skip
        if f is not None:
            table.add_row(label, f"{f.round_s:.2f} s", f"{f.bytes_up_per_client:,.0f}",
                          f"{f.bytes_down_per_client:,.0f}", f"{f.accuracy:.3f}")  # fmt: skip
    console.print(table)
    console.print(
        "fairbus: message payload bytes a user publishes (MQTT framing not counted); "
        "Flower: every byte a SuperNode sends to the SuperLink's Fleet API on the wire "
        "(HTTP headers and bodies) between the round's start and end."
    )
    if rows:
        ratios = Table(title="fairbus / Flower")
        for column in ("measure", "fairbus", "Flower", "fairbus / Flower"):
            ratios.add_column(column, justify="left" if column == "measure" else "right")
        for row in rows:
            ratios.add_row(*row)
        console.print(ratios)


@app.command("privacy")
def privacy_bench(
    users: list[int] = typer.Option(
        [9, 15, 30, 60, 100], "--users", help="User counts (repeat the option)."
    ),
    key_share: list[float] = typer.Option(
        [0.0, 0.2, 0.4], "--key-share", help="Shares of key users (repeat the option)."
    ),
    bound: list[int] = typer.Option([1, 2], "--c", help="Collusion bounds c (repeat)."),
    samples: int = typer.Option(1_000, help="Groupings per setting and c at most."),
    budget: float = typer.Option(
        540.0, help="Total seconds; settings split what is left, so slow ones stop early."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """How many of the provider's groupings expose someone when c models are known
    (issue 12): exposing groupings (target 0), focus groups per key user, basic
    groupings, the exact check's time and make_grouping's own time."""
    from dataclasses import asdict

    from fairbus.bench import privacy

    params = privacy.GroupingParams(
        DEFAULTS.basic_groupings, DEFAULTS.key_repeats, DEFAULTS.reference_groups
    )
    total = len(users) * len(key_share)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("drawing groupings", total=total)
        seen: set[privacy.Setting] = set()

        def tick(setting: privacy.Setting, done: int, slice_s: float) -> None:
            if setting not in seen:
                seen.add(setting)
                progress.update(task, completed=len(seen) - 1)
            progress.update(
                task,
                description=(
                    f"{setting.users} users, {setting.key_users} key: {done}/{samples} "
                    f"groupings (≤ {slice_s:.0f} s)"
                ),
            )

        report = privacy.run(users, key_share, bound, samples, budget, params, tick)
        progress.update(task, completed=total)
    if as_json:
        console.print_json(json.dumps(asdict(report)))
        return

    def ms(median: float | None, p99: float | None) -> str:
        return "–" if median is None or p99 is None else f"{median:.2f} / {p99:.2f}"

    table = Table(
        title=(
            f"Exposure under c known models, groupings from make_grouping under that c "
            f"(basic ≤ {params.basic_groupings}, KIN {params.key_repeats}, {params.references} "
            f"reference groups; up to {samples} per setting, {budget:.0f} s in all)"
        )
    )
    for column in (
        "users",
        "key",
        "c",
        "samples",
        "exposing (target 0)",
        "users exposed",
        "focus / key user",
        "basic",
        "groups",
        "check ms med / p99",
        "is_safe ms med / p99",
        "make_grouping s med / max",
    ):
        table.add_column(column, justify="right")
    for r in report.rows:
        stopped = "" if r.stopped == "done" else f" (cap {r.slice_s:.0f} s)"
        focus = (
            "–"
            if r.focus_per_key_mean is None
            else f"{r.focus_per_key_mean:.2f} ({r.focus_per_key_min:.0f}–{r.focus_per_key_max:.0f})"
        )
        table.add_row(
            str(r.users),
            str(r.key_users),
            str(r.c),
            f"{r.samples}{stopped}",
            "–" if not r.samples else f"{r.exposing} ({r.exposing / r.samples:.0%})",
            "–" if r.exposed_share_mean is None else f"{r.exposed_share_mean:.0%}",
            focus,
            "–" if r.basic_groupings_mean is None else f"{r.basic_groupings_mean:.2f}",
            "–" if r.groups_mean is None else f"{r.groups_mean:.1f}",
            ms(r.check_ms_median, r.check_ms_p99),
            ms(r.safe_ms_median, r.safe_ms_p99),
            "–" if r.make_s_median is None else f"{r.make_s_median:.2f} / {r.make_s_max:.2f}",
        )
    console.print(table)
    console.print(
        f"{report.elapsed_s:.0f} s. Samples: up to {samples} per setting and c; '(cap N s)': "
        "the setting's share of the budget ran out first. Groups have max(3, c + 2) "
        "members; 'basic' is the mean number of basic groupings that fit."
    )


@app.command("scale")
def scale_bench(
    users: list[int] = typer.Option(
        [9, 30, 100, 300, 1_000], "--users", help="User counts (repeat the option)."
    ),
    key_share: list[float] = typer.Option(
        [0.0, 0.2], "--key-share", help="Shares of key users (repeat the option)."
    ),
    bound: list[int] = typer.Option([1, 2], "--c", help="Collusion bounds c (repeat)."),
    repeats: int = typer.Option(5, min=1, help="Groupings per setting (median and max)."),
    block: int | None = typer.Option(
        None, min=1, help="Users per block of make_grouping (default fairbus.grouping.BLOCK)."
    ),
    simulate: bool = typer.Option(
        True,
        help="Also simulate rounds at each user count, in both keyings (digits, its small "
        "model, honest users; about 15 minutes for the default counts on 2 cores).",
    ),
    sim_rounds: int = typer.Option(2, min=1, help="Rounds per simulation."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The provider's grouping and the exact exposure check at scale (issue 16): the time
    of make_grouping plus check_grouping (median and max over REPEATS groupings), groups
    per round, focus groups per key user, basic groupings and the connected components
    the check runs on. Targets (c = 1, key users up to 20%): ≤ 0.5 s at 100 users, ≤ 10 s
    at 1,000. Exits 1 if a targeted setting misses its target.

    Then (--simulate) whole simulated rounds at each user count under Alg. 3's shares and
    pairwise keys: groups per round, seconds per round by phase (grouping, training on
    every core, evaluation, detection, the ledger's admission with its re-derivation),
    and bytes each user sends per round against plain FedAvg's one float32 model."""
    from dataclasses import asdict, replace

    from fairbus.bench import scale

    params = scale.GroupingParams(
        DEFAULTS.basic_groupings, DEFAULTS.key_repeats, DEFAULTS.reference_groups
    )
    if block is not None:
        params = replace(params, block=block)
    total = len(users) * len(key_share) * len(bound) * repeats
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("grouping", total=total)

        started = [0]

        def tick(n: int, keys: int, c: int, done: int) -> None:
            progress.update(
                task,
                completed=started[0],
                description=f"{n} users, {keys} key, c = {c}: grouping {done + 1}/{repeats}",
            )
            started[0] += 1

        report = scale.run(users, key_share, bound, repeats, params, tick)
    simulated: list[scale.SimRow] = []
    if simulate:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("simulating", total=len(scale.KEYINGS_SIMULATED) * len(users))
            begun = [0]

            def step(n: int, keying: str) -> None:
                progress.update(
                    task,
                    completed=begun[0],
                    description=f"simulating {n} users, {keying} keys, {sim_rounds} rounds",
                )
                begun[0] += 1

            simulated = scale.run_simulations(users, rounds=sim_rounds, progress=step)
    missed = [r for r in report.rows if r.meets_target is False]
    if as_json:
        rows = [{**asdict(r), "meets_target": r.meets_target} for r in report.rows]
        sims = [{**asdict(r), "bytes_ratio": r.bytes_ratio} for r in simulated]
        console.print_json(json.dumps({**asdict(report), "rows": rows, "simulated": sims}))
    else:
        table = Table(
            title=(
                f"make_grouping + check_grouping (exact), {repeats} groupings per setting "
                f"(basic ≤ {params.basic_groupings}, KIN {params.key_repeats}, "
                f"{params.references} reference groups, blocks of {params.block})"
            )
        )
        for column in (
            "users", "key", "c", "s median / max", "target", "check s median", "groups",
            "focus / key user", "basic", "components", "largest",
        ):  # fmt: skip
            table.add_column(column, justify="right")
        for r in report.rows:
            target = "" if r.target_s is None else f"≤ {r.target_s:g} s"
            if r.meets_target is not None:
                target += " ok" if r.meets_target else " MISSED"
            table.add_row(
                str(r.users), str(r.key_users), str(r.c),
                f"{r.total_s_median:.3f} / {r.total_s_max:.3f}", target,
                f"{r.check_s_median:.4f}", f"{r.groups_mean:.1f}",
                "–" if r.focus_per_key_mean is None else f"{r.focus_per_key_mean:.2f}",
                f"{r.basic_groupings_mean:.2f}", f"{r.components_mean:.1f}",
                str(r.largest_component),
            )  # fmt: skip
        console.print(table)
        console.print(
            f"{report.elapsed_s:.0f} s. Groups of max(3, c + 2); 'components': connected "
            "components of the grouping (the check runs on each), 'largest': users in the "
            "largest; every grouping passed the exact check."
        )
        if simulated:
            print_simulated(simulated)
    if missed:
        raise typer.Exit(1)


def print_simulated(rows: list[SimRow]) -> None:
    """The table of ``fairbus bench scale --simulate``."""
    table = Table(
        title=f"simulated rounds (digits, honest users, means over {rows[0].rounds} rounds; "
        "seconds per round)"
    )
    for column in (
        "users", "keying", "workers", "groups", "grouping", "training", "evaluation",
        "detection", "ledger", "round", "bytes / user", "× plain", "accuracy",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r.users), r.keying, str(r.workers), f"{r.groups:.1f}", f"{r.grouping_s:.2f}",
            f"{r.training_s:.2f}", f"{r.evaluation_s:.2f}", f"{r.detection_s:.2f}",
            f"{r.ledger_s:.2f}", f"{r.round_s:.2f}", f"{r.bytes_per_user:,.0f}",
            f"{r.bytes_ratio:.2f}",
            f"{r.accuracy:.3f}" + (f" ({r.failed} failed)" if r.failed else ""),
        )  # fmt: skip
    console.print(table)
    console.print(
        "'ledger': the in-process ledger admitting every transaction (it re-derives each "
        "evaluation and decision); 'round' also holds the users' message handling, which "
        "a deployment spreads over their devices. Bytes: what users send (uploads, and "
        "Alg. 3's sealed shares) per user; plain FedAvg sends one float32 model."
    )


@app.command("failover")
def failover_bench(
    kills: int = typer.Option(5, help="kill -9 of the active provider, this many times."),
    restart_delay: float = typer.Option(1.0, help="Seconds before the restart (RestartSec)."),
    workdir: Path = typer.Option(Path("out/bench-failover"), help="Files of both deployments."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """How long training pauses when the provider dies: with a hot standby (etcd
    election) and by a restart after RESTART_DELAY seconds, over KILLS kills each; from
    the kill to the next provider having rebuilt its state from the ledger."""
    import shutil

    from fairbus.bench import failover

    shutil.rmtree(workdir, ignore_errors=True)
    results = [
        failover.measure(workdir, mode, kills=kills, restart_delay=restart_delay,
                         progress=lambda line: console.print(f"[dim]{line}[/]"))
        for mode in ("standby", "restart")
    ]  # fmt: skip
    if as_json:
        console.print_json(json.dumps([{**vars(r), "median_s": r.median_s} for r in results]))
        return
    table = Table(title=f"provider failover, 9 users, {kills} kills each")
    for column in ("mode", "median pause", "worst pause", "pauses", "target"):
        table.add_column(column)
    targets = {"standby": "≤ 5 s", "restart": f"≤ {restart_delay:g} + 10 s"}
    for r in results:
        table.add_row(r.mode, f"{r.median_s:.2f} s", f"{r.worst_s:.2f} s",
                      ", ".join(f"{p:.1f}" for p in r.pauses_s), targets[r.mode])  # fmt: skip
    console.print(table)


@app.command("seccl")
def seccl_bench(
    figure: str = typer.Option("all", help="4 | 5 | all: SecCL's Fig. 4, Fig. 5, or both."),
    rounds: int = typer.Option(10, min=1, help="Rounds per run."),
    dataset: str = typer.Option("digits", help="digits | mnist | … (as `fairbus simulate`)."),
    data_dir: Path | None = typer.Option(None, help="Directory of MNIST IDX files."),
    seed: int = typer.Option(0, help="Seed for the data split and the initial model."),
    theta: float = typer.Option(0.1, help="θ, the fraction of changes shared (paper: 0.1)."),
    local_epochs: int = typer.Option(
        TrainConfig.local_epochs, help="Local epochs per round (the paper names none)."
    ),
    baseline_epochs: int = typer.Option(
        20, min=1, help="Epochs of the all-data baseline (the dashed line)."
    ),
    workers: int = typer.Option(1, min=1, help="Runs in parallel (processes)."),
    out: Path = typer.Option(Path("out/seccl"), help="Where fig4.png, fig5.png and JSON go."),
) -> None:
    """SecCL's experiments: Fig. 4 (20 and 30 participants, λ 0.2 and 0.4, no attackers,
    against training on all the data) and Fig. 5 (20 participants, λ 0.2, ε 0.1–0.3
    colluding label-flippers from round 5). Writes OUT/fig4.png, OUT/fig5.png and the
    curves as JSON; every run is a whole `fairbus simulate --mode seccl` (ledger
    included)."""
    from dataclasses import replace

    from fairbus.bench import seccl
    from fairbus.seccl_simulation import PAPER_TRAINING

    if figure not in ("4", "5", "all"):
        raise typer.BadParameter(f"--figure must be 4, 5 or all, not {figure!r}")
    train = replace(PAPER_TRAINING, local_epochs=local_epochs)
    base = replace(
        seccl.DEFAULT_BASE,
        rounds=rounds,
        dataset=dataset,
        data_dir=data_dir,
        seed=seed,
        theta=theta,
        train=train,
    )

    def done(run: seccl.Run, curve: list[float]) -> None:
        console.print(f"{run.label}: " + " ".join(f"{a:.3f}" for a in curve))

    try:
        if figure in ("4", "all"):
            reference = seccl.baseline(base, baseline_epochs)
            console.print(f"all data, {baseline_epochs} epochs: {reference:.4f}")
            curves = seccl.run_figure(seccl.figure4_runs(base), workers=workers, on_done=done)
            for n in seccl.FIG4_USERS:
                mine = [(label, c) for label, c in curves if label.startswith(f"N = {n},")]
                title = f"SecCL Fig. 4: {n} participants, {dataset}"
                path = seccl.write_figure(f"fig4_n{n}", title, mine, out, reference)
                console.print(f"wrote {path}")
        if figure in ("5", "all"):
            curves = seccl.run_figure(seccl.figure5_runs(base), workers=workers, on_done=done)
            title = (
                f"SecCL Fig. 5: 20 participants, λ = 0.2, label-flippers from round 5, {dataset}"
            )
            path = seccl.write_figure("fig5", title, curves, out, None)
            console.print(f"wrote {path}")
    except FairbusError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
