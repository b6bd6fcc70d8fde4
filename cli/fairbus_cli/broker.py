"""``fairbus broker --config FILE [--embedded]``: write the broker configuration from the
roster and run the broker (Mosquitto, or amqtt in-process) until SIGTERM or Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fairbus.errors import FairbusError
from fairbus_broker.config import BrokerConfig
from fairbus_broker.mosquitto import run_mosquitto, write_mosquitto_files
from fairbus_cli.errors import STOPPERS, stop

console = Console(highlight=False)


def broker(
    config: Path = typer.Option(..., "--config", "-c", help="Broker configuration (TOML)."),
    embedded: bool = typer.Option(
        False,
        "--embedded",
        help="Run the amqtt broker in-process instead of Mosquitto (one machine, no install).",
    ),
) -> None:
    """Write the Mosquitto configuration (listener, password file or TLS client
    certificates, an ACL from the roster so each identity publishes only under its own
    topics) and run Mosquitto until SIGTERM or Ctrl-C. With --embedded, run the amqtt
    broker in-process with the same users and ACL instead."""
    try:
        cfg = BrokerConfig.load(config)
        code = _embedded(cfg) if embedded else _mosquitto(cfg)
    except (FairbusError, *STOPPERS) as exc:
        label = "cannot start the broker"
        stop(console, exc, failed=label, mistake=label)
    raise typer.Exit(code)


def _mosquitto(cfg: BrokerConfig) -> int:
    files = write_mosquitto_files(cfg)
    console.print(f"wrote [bold]{files.conf}[/] and [bold]{files.acl}[/]")
    if files.passwd is not None:
        console.print(f"wrote [bold]{files.passwd}[/] ({len(files.logins)} logins, hashes only)")
    else:
        console.print("logins by TLS client certificate (its CN is the username)")
    if files.without_login:
        console.print(f"[yellow]no broker password, no login:[/] {', '.join(files.without_login)}")
    account = f" as {files.run_as}" if files.run_as else ""
    console.print(
        f"running mosquitto{account} on {cfg.host}:{cfg.port} (stop with SIGTERM or Ctrl-C)"
    )
    return run_mosquitto(cfg, files=files)


def _embedded(cfg: BrokerConfig) -> int:
    from fairbus_broker.embedded import run_embedded  # amqtt is the optional [embedded] extra

    console.print(
        f"running the embedded amqtt broker on {cfg.host}:{cfg.port} with the roster's "
        "logins and ACL (nothing written to disk; stop with SIGTERM or Ctrl-C)"
    )
    return run_embedded(cfg)
