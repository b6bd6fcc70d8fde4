"""``fairbus demo``: what ``make demo`` runs — a whole networked training on this machine.

A broker (the embedded one by default), a ledger (SQLite by default), the provider and 9
user processes, one a poisoner (user 2) and one a free-rider (user 5), train on digits
for 10 rounds over MQTT with the real crypto and the real ledger; then a table, the
plots and an audit of the ledger. ``--mode seccl``: SecCL instead (the second paper), 20
honest participants over the same broker and ledger, each round's candidates elected
by the consensus contract (:mod:`fairbus.runtime.seccl_provider`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import typer
from rich.table import Table

from fairbus.errors import FairbusError
from fairbus.training.attacks import Behaviour
from fairbus_cli.errors import say
from fairbus_cli.simulate import console, rounds_progress

ATTACKS = {2: Behaviour.POISONER, 5: Behaviour.FREE_RIDER}


def demo(
    rounds: int = typer.Option(10, help="Training rounds."),
    broker: str = typer.Option(
        "embedded", help="'embedded' (amqtt, in the package) or 'mosquitto' (installed)."
    ),
    ledger: str = typer.Option(
        "sqlite", help="'sqlite' (one node) or 'etcd' (3 etcd members, 3 ledger nodes)."
    ),
    epochs: int = typer.Option(20, help="Local epochs per round."),
    out: Path = typer.Option(Path("out/demo"), help="Where the task's files, logs and plots go."),
    mode: str = typer.Option(
        "fairness", help="'fairness' (9 users, two attackers) or 'seccl' (20 SecCL participants)."
    ),
) -> None:
    """Train 9 user processes on digits over MQTT; user 2 poisons, user 5 free-rides
    (``--mode seccl``: 20 SecCL participants)."""
    from fairbus.runtime.local import LocalTask

    if broker not in ("embedded", "mosquitto") or ledger not in ("sqlite", "etcd"):
        console.print("[red]error:[/] --broker is embedded|mosquitto, --ledger sqlite|etcd")
        raise typer.Exit(2)
    if mode not in ("fairness", "seccl"):
        console.print("[red]error:[/] --mode is fairness|seccl")
        raise typer.Exit(2)
    if mode == "seccl":
        _seccl_demo(rounds, broker, ledger, epochs, out)
        return
    shutil.rmtree(out, ignore_errors=True)
    root = out / "task"
    start = time.monotonic()
    try:
        with (
            console.status(
                f"starting the {broker} broker, the {ledger} ledger, the provider and 9 users…"
            ),  # fmt: skip
            LocalTask(root, 9, rounds, ATTACKS, ledger, broker, {"local_epochs": epochs}) as task,
        ):
            _follow(task, rounds)
            audit = _audit(root)  # while the ledger (etcd) still runs
        console.print(f"all processes stopped; {time.monotonic() - start:.0f} s in all")
    except FairbusError as exc:
        say(console, "demo failed", exc)
        raise typer.Exit(1) from None
    _report(root, out)
    console.print(audit)
    console.print(f"wrote {out / 'accuracy.png'}, {out / 'scores.png'}; logs in {root}")


SECCL_USERS = 20


def _seccl_demo(rounds: int, broker: str, ledger: str, epochs: int, out: Path) -> None:
    """SecCL over the networked runtime: 20 participants, the paper's θ = 0.1 and
    λ = 0.2; a table of each round's candidates, then an audit of the ledger."""
    from fairbus.runtime.local import LocalTask
    from fairbus.seccl import DEFAULT_CANDIDATE_SHARE, DEFAULT_THETA
    from fairbus.seccl_simulation import PAPER_TRAINING

    shutil.rmtree(out, ignore_errors=True)
    root = out / "task"
    start = time.monotonic()
    top = {"mode": "seccl", "theta": DEFAULT_THETA, "candidate_share": DEFAULT_CANDIDATE_SHARE}
    # SecCL's local training, as `fairbus simulate --mode seccl` trains.
    paper = PAPER_TRAINING
    training: dict[str, object] = {
        "local_epochs": epochs,
        "lr": paper.lr,
        "batch_size": paper.batch_size,
    }
    try:
        with (
            console.status(
                f"starting the {broker} broker, the {ledger} ledger, the SecCL "
                f"server and {SECCL_USERS} participants…"
            ),  # fmt: skip
            LocalTask(
                root, SECCL_USERS, rounds, {}, ledger, broker, training, top=top
            ) as task,  # fmt: skip
        ):
            _follow(task, rounds)
            audit = _audit(root)
        console.print(f"all processes stopped; {time.monotonic() - start:.0f} s in all")
    except FairbusError as exc:
        say(console, "demo failed", exc)
        raise typer.Exit(1) from None
    lines = (root / "state" / "provider" / "rounds.jsonl").read_text().splitlines()
    table = Table(title=f"fairbus demo --mode seccl: {SECCL_USERS} participants over MQTT")
    for column in ("round", "accuracy", "candidates", "top Borda total", "ledger", "s"):
        table.add_column(column, justify="right")
    for line in lines:
        r = json.loads(line)
        seconds = r["timings_s"].get("round", 0.0)
        table.add_row(str(r["round"]), f"{r['global_accuracy']:.3f}",
                      ",".join(map(str, r["candidates"])), str(max(r["borda"].values())),
                      str(r["ledger_height"]), f"{seconds:.1f}")  # fmt: skip
    console.print(table)
    console.print(audit)
    console.print(f"logs in {root}")


def _audit(root: Path) -> str:
    from fairbus.runtime.local import CLI

    audit = subprocess.run(
        [*CLI, "audit", "--config", str(root / "ledger-101.toml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return audit.stdout.strip() or audit.stderr.strip()


def _follow(task: object, rounds: int) -> None:
    from fairbus.runtime.local import LocalTask

    assert isinstance(task, LocalTask)
    with rounds_progress() as progress:
        bar = progress.add_task("rounds", total=rounds, acc="–")
        seen = 0
        while seen < rounds:
            done = task.wait_for_round(seen + 1, timeout=600)
            for record in done[seen:]:
                progress.update(bar, advance=1, acc=f"{record['global_accuracy']:.3f}")
                for user in record["violators"]:  # type: ignore[attr-defined]
                    progress.console.log(f"round {record['round']}: user {user} excluded")
            seen = len(done)


def _report(root: Path, out: Path) -> None:
    from fairbus.plots import plot_accuracy, plot_scores
    from fairbus.rounds import RoundRecord

    lines = (root / "state" / "provider" / "rounds.jsonl").read_text().splitlines()
    records = [RoundRecord.from_json(json.loads(line)) for line in lines if line.strip()]
    table = Table(title="fairbus demo: 9 users over MQTT (user 2 poisons, user 5 free-rides)")
    for column in ("round", "tries", "accuracy", "key users", "excluded", "ledger",
                   "bytes out", "s"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(str(r.round), str(r.attempts), f"{r.global_accuracy:.3f}",
                      ",".join(map(str, r.key_users)) or "–",
                      ",".join(map(str, r.violators)) or "–",
                      str(r.ledger_height), f"{sum(r.bytes.values()):,}",
                      f"{r.timings_s.get('round', 0.0):.1f}")  # fmt: skip
    console.print(table)
    console.print("tries: attempts of the round; ledger: block height after the round; "
                  "bytes out: the provider's broadcasts")  # fmt: skip
    sent = {}
    for stats in sorted((root / "state").glob("user-*/stats.json")):
        sent[stats.parent.name] = sum(json.loads(stats.read_text())["bytes"].values())
    console.print(f"bytes sent by the users: {sum(sent.values()):,} "
                  f"(per user {min(sent.values()):,}–{max(sent.values()):,})")  # fmt: skip
    excluded = {u for r in records for u in r.violators}
    console.print(f"attackers {sorted(ATTACKS)}; excluded {sorted(excluded) or '–'}; honest "
                  f"users excluded: {sorted(excluded - set(ATTACKS)) or 'none'}")  # fmt: skip
    plot_accuracy(records, out / "accuracy.png", "fairbus demo over MQTT")
    plot_scores(records, out / "scores.png", set(ATTACKS))
