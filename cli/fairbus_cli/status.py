"""``fairbus status --config FILE``: where a task stands (round, phase, who is online, who
is excluded, the ledger's height, the provider), asked of the ledger and read from the
presence topics as one of the roster's admins (:mod:`fairbus.runtime.status`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fairbus.errors import FairbusError
from fairbus_cli.errors import STOPPERS, stop

console = Console()
errors = Console(stderr=True)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) or "none"


def status(
    config: Path = typer.Option(
        ..., "--config", "-c", help="The task's configuration (TOML), as the provider reads it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    admin: int | None = typer.Option(
        None,
        "--as",
        help="The admin to log in as (default: the roster's admin whose keys are in the "
        "keys folder).",
    ),
    wait: float = typer.Option(1.0, min=0.0, help="Seconds to collect presences."),
) -> None:
    """Say where a task stands: the round and attempt, the phase (the type of the
    provider's last ledger transaction), uploads recorded for the attempt, key users and
    excluded users, the ledger's height, and who is online (provider and users).

    Logs in to the broker as one of the roster's admins (it needs that admin's key files
    in the task's keys folder): an admin may read the ledger's round records and the
    presence topics, and no running participant uses its login. A broker that cannot be
    reached, or no ledger node answering, is one line and exit status 2.
    """
    from fairbus.runtime.config import RuntimeConfig
    from fairbus.runtime.status import task_status

    try:
        settings = RuntimeConfig.load(config)
        result = asyncio.run(task_status(settings, admin=admin, wait=wait))
    except (FairbusError, *STOPPERS) as exc:
        stop(errors, exc, failed="status")
    if as_json:
        print(json.dumps(result.to_json(), sort_keys=True))
        return
    table = Table(title=f"task {result.task}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    attempt = "" if result.attempt is None else f", attempt {result.attempt}"
    table.add_row("round", f"{result.round}{attempt}")
    table.add_row("phase", f"{result.phase} ({result.last_transaction or 'no transaction'})")
    table.add_row("uploads recorded", f"{result.uploads} (groups: {result.groups})")
    table.add_row("ledger height", f"{result.ledger_height} (block {result.ledger_head[:16]})")
    online = "[green]online[/]" if result.provider_online else "[red]offline[/]"
    table.add_row("provider", f"{result.provider} {online}")
    table.add_row("users online", _ids(result.online))
    table.add_row("users offline", _ids(result.offline))
    if result.unseen:
        table.add_row("users never seen", _ids(result.unseen))
    table.add_row("key users", _ids(result.key_users))
    table.add_row("excluded", _ids(result.excluded))
    table.add_row("asked as", f"admin {result.observer}")
    console.print(table)
