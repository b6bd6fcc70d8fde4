"""``fairbus walkthrough``: one group of three users, step by step (Algorithms 3-5).

The real user and provider machines, driven through the ledger's validation state machine
(:mod:`fairbus.walkthrough`); this module only renders what it reports."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def walkthrough_command(
    seed: int = typer.Option(0, help="Seed for the data split and model init."),
) -> None:
    """Walk one group of three users through key negotiation, masking and unmasking: the
    real user and provider machines, every ledger transaction committed and receipted."""
    from fairbus import walkthrough

    console.rule("[bold]fairbus walkthrough: one group of three users")
    with console.status("training three users and negotiating keys…"):
        report = walkthrough.run(seed, say=lambda text: console.log(text))
    table = Table(title="what the provider learned, and what it could not")
    table.add_column("check")
    table.add_column("result", justify="right")
    for uid, acc in report.user_accuracy.items():
        table.add_row(
            f"user {uid}'s own model, test accuracy (never seen by the provider)", f"{acc:.3f}"
        )
    table.add_row(
        "[bold]group mean recovered by the provider, test accuracy[/]",
        f"[bold]{report.mean_accuracy:.3f}[/]",
    )
    table.add_row(
        "decrypted field sum == Σ plaintext encodings (bit for bit)", _yes(report.exact_field_sum)
    )
    table.add_row("max |recovered mean − true mean|", f"{report.max_mean_error:.2e}")
    table.add_row("Σ_i sk_gi ≡ 0 (mod p)", _yes(report.keys_sum_to_zero))
    table.add_row(
        "one masked upload decoded as a model, test accuracy (chance: 0.1)",
        f"{report.single_upload_accuracy:.3f}",
    )
    table.add_row("sealed share bytes sent (all users)", f"{report.bytes_sealed:,}")
    table.add_row("upload bytes (3 signed envelopes with receipts)", f"{report.bytes_uploaded:,}")
    table.add_row("ledger blocks (one transaction each)", f"{report.ledger_blocks}")
    table.add_row("ledger replays from genesis (as an audit does)", _yes(report.ledger_replays))
    table.add_row("float32 model size × 3", f"{report.params * 4 * 3:,}")
    for name, seconds in report.seconds.items():
        table.add_row(f"time: {name}", f"{seconds * 1000:.1f} ms")
    console.print(table)
    if not (report.exact_field_sum and report.keys_sum_to_zero and report.ledger_replays):
        raise typer.Exit(1)


def _yes(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]NO[/]"
