"""Entry point of the ``fairbus`` console script."""

from __future__ import annotations

import logging

import typer

from fairbus_cli import (
    bench,
    broker,
    demo,
    init,
    keys,
    ledger,
    participants,
    roster,
    simulate,
    status,
    walkthrough,
)

app = typer.Typer(
    name="fairbus",
    help=(
        "Fair, privacy-preserving federated training. Users mask their models with keys "
        "negotiated in small groups (Shamir), the provider only ever sees group averages, "
        "and poisoners and free-riders are found from those averages and excluded; every "
        "upload is signed, hash-chained and recorded on a replicated ledger."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold keys
)
app.add_typer(keys.app, name="keys")
app.add_typer(roster.app, name="roster")
app.add_typer(bench.app, name="bench")
app.add_typer(ledger.app, name="ledger")
app.command("audit")(ledger.audit_command)
app.command("broker")(broker.broker)
app.command("provider")(participants.provider)
app.command("user")(participants.user)
app.command("demo")(demo.demo)
app.command("init")(init.init)
app.command("walkthrough")(walkthrough.walkthrough_command)
app.command("simulate")(simulate.simulate)
app.command("status")(status.status)


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run() -> None:
    app()
