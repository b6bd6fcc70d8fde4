"""``fairbus keys``: create and show participant identities."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fairbus.errors import FairbusError, IdentityError
from fairbus.identity import Identity, broker_password_path, new_broker_password
from fairbus.roster import Member, Role, Roster
from fairbus_cli.errors import say

app = typer.Typer(help="Create and inspect participant key files.", no_args_is_help=True)
console = Console()


@app.command("new")
def new(
    participant_id: int = typer.Option(..., "--id", help="The participant's roster id."),
    role: Role = typer.Option(Role.USER, help="Role to record when adding to a roster."),
    directory: Path = typer.Option(Path("keys"), "--dir", help="Where the key files go."),
    roster_path: Path | None = typer.Option(
        None, "--roster", help="Also add (or update) this participant in a roster TOML file."
    ),
    task: str = typer.Option("fairbus", help="Task name when --roster creates a new roster."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing key files."),
) -> None:
    """Write a fresh Ed25519 signing key, X25519 box key and broker password, each in a
    0600 file.

    Prints the public keys, the lines a roster needs for this participant. The broker
    password (``<id>.mqtt.key``) is the participant's MQTT login; `fairbus broker` gives
    the broker only its hash.
    """
    try:
        mqtt_path = broker_password_path(directory, participant_id)
        if mqtt_path.exists() and not force:  # checked first: write all three or none
            raise IdentityError(f"{mqtt_path} exists; refusing to overwrite a key file")
        identity = Identity.generate(participant_id)
        sign_path, box_path = identity.save(directory, overwrite=force)
        new_broker_password(directory, participant_id, overwrite=force)
        console.print(
            f"wrote [bold]{sign_path}[/], [bold]{box_path}[/] and the broker password "
            f"[bold]{mqtt_path}[/] (mode 0600)"
        )
        member = Member(identity.public, role)
        if roster_path is not None:
            existing = Roster.load(roster_path) if roster_path.exists() else Roster(task, [])
            others = [m for pid, m in existing.items() if pid != participant_id]
            updated = Roster(existing.task, [*others, member])
            roster_path.parent.mkdir(parents=True, exist_ok=True)
            roster_path.write_text(updated.to_toml(), encoding="utf-8")
            console.print(f"added participant {participant_id} ({role.value}) to {roster_path}")
        else:
            console.print(Roster("fairbus", [member]).to_toml().split("\n", 2)[2], markup=False)
    except FairbusError as exc:
        say(console, "error", exc)
        raise typer.Exit(2) from None


@app.command("show")
def show(
    participant_id: int = typer.Option(..., "--id"),
    directory: Path = typer.Option(Path("keys"), "--dir"),
) -> None:
    """Print a participant's public keys (never the secret ones)."""
    try:
        identity = Identity.load(directory, participant_id)
    except FairbusError as exc:
        say(console, "error", exc)
        raise typer.Exit(2) from None
    console.print(f"verify_key = {identity.public.verify_hex}")
    console.print(f"box_key    = {identity.public.box_hex}")
