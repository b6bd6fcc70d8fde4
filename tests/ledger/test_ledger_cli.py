"""The ledger's configuration file and the `fairbus ledger verify` / `fairbus audit` CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fairbus.ledger.records import Block, Transaction
from fairbus.ledger.state import LedgerState
from fairbus_cli.main import app
from fairbus_ledger_service.blobs import BlobStore
from fairbus_ledger_service.config import LedgerConfig, LedgerConfigError
from fairbus_ledger_service.node import LedgerNode
from fairbus_ledger_service.stores import SqliteStore
from tests.support_ledger import RecordedRun, record_run

REPO = Path(__file__).resolve().parents[2]


def test_the_example_config_loads() -> None:
    config = LedgerConfig.load(REPO / "configs" / "ledger.example.toml")
    assert config.store == "etcd" and len(config.etcd) == 3
    assert config.roster.name == "roster.example.toml"


def test_a_detection_table_is_refused_it_is_recorded_at_task_start(tmp_path: Path) -> None:
    path = tmp_path / "ledger.toml"
    path.write_text('roster = "r.toml"\n[detection]\nbound_score = 0.15\n')
    with pytest.raises(LedgerConfigError) as info:
        LedgerConfig.load(path)
    message = str(info.value)
    assert "[detection]" in message and "task's configuration" in message
    assert "recorded on the ledger at task start" in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('roster = "r.toml"\nstore = "mongo"\n', "'store'"),
        ('roster = "r.toml"\nstore = "etcd"\n', "'etcd'"),
        ('roster = "r.toml"\nbroker = "localhost"\n', "host:port"),
        ('roster = "r.toml"\nbroker = "h:99999"\n', "bad port"),
        ('roster = "r.toml"\nsurprise = 1\n', "unknown keys"),
        ('roster = "r.toml"\n[detection]\n', "task start"),
        ('roster = "r.toml"\nmax_block_txs = 0\n', "max_block_txs"),
        ("roster = 7\n", "'roster'"),
        ("roster = [", "r.toml"),
    ],
)
def test_a_bad_config_is_refused_by_name(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(LedgerConfigError) as info:
        LedgerConfig.load(path)
    assert complaint in str(info.value)


@pytest.fixture(scope="module")
def run() -> RecordedRun:
    return record_run(rounds=2)


def _ledger_files(run: RecordedRun, root: Path) -> Path:
    (root / "roster.toml").write_text(run.roster.to_toml())
    config = root / "ledger.toml"
    config.write_text('roster = "roster.toml"\nstore = "sqlite"\nsqlite = "l.sqlite"\n')
    return config


async def _commit_all(run: RecordedRun, root: Path) -> None:
    store = SqliteStore(root / "l.sqlite")
    node = LedgerNode(LedgerState(run.roster), store, BlobStore(root / "data/blobs"))
    node.is_writer = True
    writer = asyncio.create_task(node.write_loop())
    for data in run.envelopes:
        await node.submit(data)
    writer.cancel()
    await store.close()


def test_verify_and_audit_pass_then_name_a_tampered_block(run: RecordedRun, tmp_path: Path) -> None:
    config = _ledger_files(run, tmp_path)
    asyncio.run(_commit_all(run, tmp_path))
    runner = CliRunner()
    ok = runner.invoke(app, ["ledger", "verify", "--config", str(config)])
    assert ok.exit_code == 0, ok.output
    assert "verify: OK" in ok.output
    ok = runner.invoke(app, ["audit", "--config", str(config)])
    assert ok.exit_code == 0, ok.output
    assert "recorded at task start" in ok.output  # what the decisions were re-derived with
    # a decision in the store rewritten by hand, re-signed by nobody: names block and tx
    store = SqliteStore(tmp_path / "l.sqlite")
    raw = asyncio.run(store.read(0))
    height, k = next(
        (h, k)
        for h, data in enumerate(raw)
        for k, tx in enumerate(Block.from_bytes(data).txs)
        if tx.envelope.header.type == "decision"
    )
    block = Block.from_bytes(raw[height])
    txs = list(block.txs)
    txs[k] = Transaction(txs[k].header_bytes, bytes(64), txs[k].payload)
    forged = Block.build(block.height, block.prev_hash, block.timestamp, txs)
    store.overwrite(height, forged.to_bytes())
    for argv in (["ledger", "verify"], ["audit"]):
        bad = runner.invoke(app, [*argv, "--config", str(config)])
        assert bad.exit_code == 1, bad.output
        assert f"block {height}" in bad.output and f"transaction {k}" in bad.output
    export = tmp_path / "ledger.export"
    out = runner.invoke(app, ["ledger", "export", "--config", str(config), "--out", str(export)])
    assert out.exit_code == 0, out.output
    bad = runner.invoke(app, ["ledger", "verify", "--config", str(config), "--export", str(export)])
    assert bad.exit_code == 1 and f"block {height}" in bad.output
