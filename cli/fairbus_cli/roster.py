"""``fairbus roster``: check a roster file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fairbus.errors import FairbusError
from fairbus.roster import Roster
from fairbus_cli.errors import say

app = typer.Typer(help="Inspect roster files.", no_args_is_help=True)
console = Console()


@app.command("check")
def check(path: Path = typer.Argument(..., help="Roster TOML file.")) -> None:
    """Load a roster strictly and list its members, or say exactly what is wrong."""
    try:
        roster = Roster.load(path)
    except FairbusError as exc:
        say(console, "invalid roster", exc)
        raise typer.Exit(2) from None
    table = Table(title=f"roster of task {roster.task!r}")
    for column in ("id", "role", "name", "verify key"):
        table.add_column(column)
    for pid, member in roster.items():
        table.add_row(
            str(pid), member.role.value, member.name, member.identity.verify_hex[:16] + "…"
        )
    console.print(table)
