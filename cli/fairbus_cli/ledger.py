"""``fairbus ledger``: run a ledger node, verify or export a ledger, start etcd members;
``fairbus audit``: verify plus every decision re-derived."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from fairbus.errors import FairbusError
from fairbus.roster import Roster
from fairbus_cli.errors import OPERATOR_EXIT, STOPPERS, one_line, say, stop
from fairbus_ledger_service import audit as auditing
from fairbus_ledger_service.blobs import BlobStore
from fairbus_ledger_service.config import LedgerConfig
from fairbus_ledger_service.etcd_cluster import EtcdCluster
from fairbus_ledger_service.stores import EtcdStore, SqliteStore

console = Console()
app = typer.Typer(
    help="The replicated ledger: run a node (`fairbus ledger --node N --config FILE`), "
    "verify or export a ledger, start etcd members on loopback.",
    invoke_without_command=True,
)

CONFIG = typer.Option(..., "--config", "-c", help="Ledger configuration (TOML).")


@app.callback()
def ledger(
    ctx: typer.Context,
    node: int | None = typer.Option(None, help="This node's roster id (a ledger member)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Ledger configuration."),
) -> None:
    """Run ledger node N until stopped (SIGTERM or Ctrl-C)."""
    if ctx.invoked_subcommand is not None:
        return
    if node is None or config is None:
        console.print(ctx.get_help())
        raise typer.Exit(2)
    from fairbus_ledger_service.service import LedgerService

    try:
        service = LedgerService(LedgerConfig.load(config), node)
    except (FairbusError, *STOPPERS) as exc:
        # everything it reads at start is the operator's: configuration, roster, keys
        say(console, f"cannot start ledger node {node}", exc)
        raise typer.Exit(OPERATOR_EXIT) from None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        await service.run()

    try:
        with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
            asyncio.run(main())
    except (FairbusError, *STOPPERS) as exc:
        label = f"ledger node {node} stopped"
        stop(console, exc, failed=label, mistake=label)


async def _read_store(config: LedgerConfig) -> list[bytes]:
    store = (
        SqliteStore(config.sqlite)
        if config.store == "sqlite"
        else await EtcdStore.connect(list(config.etcd), Roster.load(config.roster).task)
    )
    try:
        return await store.read(0)
    finally:
        await store.close()


def _blocks(config: LedgerConfig, export: Path | None) -> list[bytes]:
    if export is not None:
        return list(auditing.read_export(export))
    return asyncio.run(_read_store(config))


def print_report(what: str, report: auditing.Report) -> None:
    if report.ok:
        console.print(
            f"[green]{what}: OK[/] — {report.blocks} blocks, {report.transactions} transactions"
        )
        if report.task is not None and report.task.mode == "seccl":
            task = report.task
            console.print(
                f"  SecCL task: θ {task.theta}, λ {task.candidate_share}; every election and "
                "new global model re-derived by the consensus contract"
            )
        elif report.task is not None:
            policy = ", ".join(f"{k} {v}" for k, v in vars(report.task.detection).items())
            console.print(f"  Alg. 6 policy recorded at task start: {policy}")
            task = report.task
            console.print(f"  collusion bound c {task.collusion}, keying {task.keying}")
        for note in report.notes:
            console.print(f"  note: {escape(note)}")
        return
    problem = escape(one_line(report.problem))
    console.print(
        f"[red]{what}: FAILED[/] after {report.blocks} good blocks: {problem}", soft_wrap=True
    )
    raise typer.Exit(1)


@app.command("verify")
def verify(
    config: Path = CONFIG,
    export: Path | None = typer.Option(None, help="Verify this export instead of the store."),
) -> None:
    """Re-check every block's hash and link, Merkle root, signature and chain link."""
    try:
        cfg = LedgerConfig.load(config)
        print_report("verify", auditing.verify(_blocks(cfg, export), Roster.load(cfg.roster)))
    except FairbusError as exc:
        say(console, "verify", exc)
        raise typer.Exit(1) from None


@app.command("export")
def export(
    config: Path = CONFIG,
    out: Path = typer.Option(..., help="File to write the blocks to."),
) -> None:
    """Write every block to a file (`verify --export` and `audit --export` read it)."""
    cfg = LedgerConfig.load(config)
    count = auditing.write_export(out, _blocks(cfg, None))
    console.print(f"wrote {count} blocks to {out}")


@app.command("etcd-cluster")
def etcd_cluster(
    data_dir: Path = typer.Option(Path("data/etcd"), help="One sub-directory per member."),
    members: int = typer.Option(3, help="How many members."),
) -> None:
    """Start etcd members on loopback (free ports) and print their endpoints for the
    ledger config; stops them on Ctrl-C or SIGTERM."""
    with EtcdCluster(data_dir, members) as cluster:
        endpoints = ", ".join(f'"{h}:{p}"' for h, p in cluster.endpoints)
        console.print(f"etcd = [{endpoints}]")
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while all(m.alive for m in cluster.members):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops ``etcd-cluster`` as Ctrl-C does (its members are stopped on exit)."""
    raise KeyboardInterrupt


def audit_command(
    config: Path = CONFIG,
    export: Path | None = typer.Option(None, help="Audit this export instead of the store."),
    blobs: bool = typer.Option(True, help="Also check every model-sized payload's blob."),
) -> None:
    """Verify the ledger, replay every rule, re-derive every detection decision
    (Algorithm 6, with the parameters recorded at task start) and check the blobs; names
    the first bad record."""
    try:
        cfg = LedgerConfig.load(config)
        report = auditing.audit(
            _blocks(cfg, export),
            Roster.load(cfg.roster),
            BlobStore(cfg.blobs) if blobs else None,
        )
    except FairbusError as exc:
        say(console, "audit", exc)
        raise typer.Exit(1) from None
    print_report("audit", report)
