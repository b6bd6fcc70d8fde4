"""Prometheus metrics (:mod:`fairbus.runtime.metrics`, :mod:`fairbus_ledger_service.metrics`):
what a round record, a commit and a refusal do to them, each process's own registry, the
HTTP exporter on a free port scraped with urllib, the ``[metrics]`` and ``metrics_port``
options, and the ledger's ``height`` query."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fairbus.rounds import RoundRecord
from fairbus.runtime.config import RuntimeConfig, RuntimeConfigError
from fairbus.runtime.connection import BusConnection
from fairbus.runtime.metrics import RuntimeMetrics
from fairbus.wire.messages import Query
from fairbus_ledger_service.client import encode_height
from fairbus_ledger_service.config import LedgerConfig, LedgerConfigError
from fairbus_ledger_service.metrics import Exporter, LedgerMetrics


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) → value of a Prometheus text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
        return str(answer.read().decode())


def record(round_: int, *, excluded: list[int], attempts: int = 1) -> RoundRecord:
    r = RoundRecord.empty(round_, attempts)
    r.excluded = excluded
    r.timings_s.update(announce=0.02, evaluation=0.5, round=1.5)
    r.ledger_height = 10 * round_
    return r


def bus() -> BusConnection:
    return BusConnection("127.0.0.1", 1, task="t", role="provider", pid=0, password=None,
                         subscriptions=[], on_message=lambda topic, data: None)  # fmt: skip


async def test_a_round_record_updates_the_provider_metrics() -> None:
    metrics = RuntimeMetrics("provider", 0)
    connection = bus()
    metrics.watch(connection)
    metrics.round_ended(record(1, excluded=[], attempts=2))
    metrics.round_ended(record(2, excluded=[7]))
    metrics.round_ended(record(3, excluded=[7, 2]))
    failed = RoundRecord.empty(4)
    failed.failed = "too few users"
    metrics.round_ended(failed)
    metrics.committed("announce", 0.004, 33)
    metrics.refused("StaleUpload")
    metrics.refused("StaleUpload")
    connection.sent_bytes.update(announce=1200, submit=5000)
    text = metrics.exposition()
    me = {"role": "provider", "participant": "0"}
    assert value(text, "fairbus_rounds_total", **me) == 3
    assert value(text, "fairbus_rounds_failed_total", **me) == 1
    assert value(text, "fairbus_round", **me) == 3
    assert value(text, "fairbus_attempts_total", **me) == 4
    assert value(text, "fairbus_exclusions_total", **me) == 2
    assert value(text, "fairbus_excluded_users", **me) == 2
    assert value(text, "fairbus_phase_seconds_count", **me, phase="evaluation") == 3
    assert value(text, "fairbus_phase_seconds_sum", **me, phase="round") == pytest.approx(4.5)
    # phases the provider does not run (0.0 in its record) are not observed
    assert ("fairbus_phase_seconds_count", frozenset({**me, "phase": "training"}.items())) not in (
        samples(text)
    )
    assert value(text, "fairbus_ledger_height", **me) == 33  # the last commit's block
    assert value(text, "fairbus_commit_seconds_count", **me, kind="announce") == 1
    assert value(text, "fairbus_refusals_total", **me, reason="StaleUpload") == 2
    assert value(text, "fairbus_sent_bytes_total", **me, kind="announce") == 1200
    assert value(text, "fairbus_sent_bytes_total", **me, kind="submit") == 5000
    assert value(text, "fairbus_connected", **me) == 0
    connection.connected.set()
    assert value(metrics.exposition(), "fairbus_connected", **me) == 1


def test_a_user_counts_each_round_it_took_part_in_once() -> None:
    metrics = RuntimeMetrics("user", 4)
    for round_ in (1, 1, 2, 2, 2, 5):
        metrics.took_part(round_)
    metrics.phase("training", 1.25)
    text = metrics.exposition()
    me = {"role": "user", "participant": "4"}
    assert value(text, "fairbus_rounds_total", **me) == 3
    assert value(text, "fairbus_round", **me) == 5
    assert value(text, "fairbus_phase_seconds_sum", **me, phase="training") == 1.25


def test_each_process_object_has_its_own_registry() -> None:
    """Two runtimes in one process (as in tests) do not collide or share counts."""
    one, two = RuntimeMetrics("user", 1), RuntimeMetrics("user", 1)
    one.took_part(1)
    assert value(one.exposition(), "fairbus_rounds_total", role="user", participant="1") == 1
    assert value(two.exposition(), "fairbus_rounds_total", role="user", participant="1") == 0


def test_the_exporter_serves_metrics_over_http_on_a_free_port() -> None:
    metrics = RuntimeMetrics("provider", 0)
    metrics.serve(0, "127.0.0.1")
    ledger = LedgerMetrics(101)
    ledger.watch(height=lambda: 41, writer=lambda: True, alarm=lambda: False,
                 connected=lambda: True)  # fmt: skip
    ledger.serve(0)
    try:
        assert metrics.exporter is not None and ledger.exporter is not None
        assert metrics.exporter.port > 0 and metrics.exporter.port != ledger.exporter.port
        metrics.round_ended(record(1, excluded=[]))
        text = scrape(metrics.exporter.url)
        assert value(text, "fairbus_rounds_total", role="provider", participant="0") == 1
        ledger.committed_after(0.003)
        ledger.refused("stale_prev")
        ledger.blob(kept=True)
        ledger.query("height", "ok")
        text = scrape(f"http://127.0.0.1:{ledger.exporter.port}/metrics")
        assert value(text, "fairbus_ledger_height", node="101") == 41
        assert value(text, "fairbus_ledger_writer", node="101") == 1
        assert value(text, "fairbus_ledger_alarm", node="101") == 0
        assert value(text, "fairbus_connected", role="ledger", participant="101") == 1
        assert value(text, "fairbus_ledger_commit_seconds_count", node="101") == 1
        assert value(text, "fairbus_ledger_committed_total", node="101") == 1
        assert value(text, "fairbus_ledger_refusals_total", node="101", reason="stale_prev") == 1
        assert value(text, "fairbus_ledger_blobs_total", node="101", outcome="kept") == 1
        assert value(text, "fairbus_ledger_queries_total", node="101", kind="height",
                     outcome="ok") == 1  # fmt: skip
    finally:
        metrics.close()
        ledger.close()


def test_no_port_no_exporter() -> None:
    metrics = RuntimeMetrics("user", 3)
    metrics.serve(None, "127.0.0.1")
    assert metrics.exporter is None


def test_exporter_reports_the_port_it_bound() -> None:
    exporter = Exporter(RuntimeMetrics("user", 2).registry, 0)
    try:
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        assert "fairbus_connected" in scrape(exporter.url)
    finally:
        exporter.close()


def _task_config(tmp_path: Path, metrics: str) -> RuntimeConfig:
    path = tmp_path / "task.toml"
    path.write_text('roster = "roster.toml"\n' + metrics)
    return RuntimeConfig.load(path)


def test_the_metrics_table_of_the_task_configuration(tmp_path: Path) -> None:
    config = _task_config(tmp_path, "[metrics]\nprovider_port = 9400\nuser_port = 0\n")
    assert config.metrics.port("provider") == 9400 and config.metrics.port("user") == 0
    assert config.metrics.address == "127.0.0.1"
    assert _task_config(tmp_path, "").metrics.port("provider") is None
    for bad, what in [
        ("provider_port = 70000", "'provider_port' must be a port"),
        ('user_port = "9410"', "'user_port' must be int"),
        ("port = 1", "unknown keys ['port']"),
    ]:
        with pytest.raises(RuntimeConfigError, match=re.escape(f"[metrics]: {what}")):
            _task_config(tmp_path, f"[metrics]\n{bad}\n")


def test_the_metrics_port_of_a_ledger_node(tmp_path: Path) -> None:
    base = {"roster": "r.toml", "store": "sqlite"}
    config = LedgerConfig.from_dict({**base, "metrics_port": 0}, base=tmp_path, source="l.toml")
    assert config.metrics_port == 0 and config.metrics_address == "127.0.0.1"
    assert LedgerConfig.from_dict(base, base=tmp_path, source="l.toml").metrics_port is None
    for bad in (-1, 65536, True, "9401"):
        with pytest.raises(LedgerConfigError, match="'metrics_port' must be a port"):
            LedgerConfig.from_dict({**base, "metrics_port": bad}, base=tmp_path, source="l.toml")


def test_a_height_query_sets_no_key() -> None:
    assert Query(1, "height", None, None, None).kind == "height"
    with pytest.raises(Exception, match="sets no key"):
        Query(1, "height", None, 3, None)
    assert int.from_bytes(encode_height(-1), "big", signed=True) == -1
    assert int.from_bytes(encode_height(12345), "big", signed=True) == 12345
