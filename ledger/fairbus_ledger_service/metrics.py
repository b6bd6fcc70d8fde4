"""Prometheus metrics of a ledger node, and the HTTP exporter every fairbus process uses.

Each process keeps its metrics in its own :class:`~prometheus_client.CollectorRegistry`
(never the global default one), so tests can run several in one process. The exporter
(:class:`Exporter`) serves ``/metrics`` only when a port is configured, on 127.0.0.1 unless
told otherwise; port 0 takes a free port (:attr:`Exporter.port` says which).

A ledger node's metrics (:class:`LedgerMetrics`), each labelled ``node``:

``fairbus_ledger_height``
    Height of the last block this node applied (-1: none yet).
``fairbus_ledger_writer``
    1 while this node is the writer (takes submissions), 0 while it follows.
``fairbus_ledger_alarm``
    1 once this node found an invalid block in the store (it stops applying).
``fairbus_connected``
    1 while this node is on the bus, 0 while it reconnects (label ``role="ledger"``).
``fairbus_ledger_commit_seconds``
    Histogram: from a submission's arrival at the writer to its commit (the receipt).
``fairbus_ledger_committed_total``
    Transactions this node committed as the writer.
``fairbus_ledger_refusals_total``
    Submissions refused, by ``reason`` (:class:`fairbus.ledger.state.RefusalReason`).
``fairbus_ledger_blobs_total``
    Model-sized payloads seen on the bus, by ``outcome``: ``kept`` (written to the blob
    store, or already there) or ``refused`` (nothing written).
``fairbus_ledger_queries_total``
    Queries answered, by ``kind`` (``head``, ``tx``, ``round``, ``blob``, ``height``) and
    ``outcome`` (``ok``, ``not_found``, ``refused``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("fairbus.metrics")

DEFAULT_ADDRESS = "127.0.0.1"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds, for commit latencies (a loopback commit takes milliseconds)."""


class Exporter:
    """``/metrics`` of ``registry`` over HTTP on ``address:port`` (0: a free port), in a
    daemon thread (prometheus_client's WSGI server)."""

    def __init__(self, registry: CollectorRegistry, port: int, address: str = DEFAULT_ADDRESS):
        self.server: WSGIServer
        self.thread: threading.Thread
        self.server, self.thread = start_http_server(port, address, registry=registry)
        self.address = address

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when configured as 0)."""
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, port: int | None, address: str, who: str) -> Exporter | None:
    """An :class:`Exporter` for ``registry`` if ``port`` is set (logged with its URL)."""
    if port is None:
        return None
    exporter = Exporter(registry, port, address)
    log.info("%s: metrics on %s", who, exporter.url)
    return exporter


class LedgerMetrics:
    """One ledger node's metrics (module docstring); the gauges read the node when
    scraped, the counters are fed by :class:`fairbus_ledger_service.service.LedgerService`."""

    def __init__(self, node_id: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.node_id = node_id
        r, node = self.registry, ["node"]
        self.height = Gauge("fairbus_ledger_height", "Height of the last block applied "
                            "(-1: none).", node, registry=r)  # fmt: skip
        self.writer = Gauge("fairbus_ledger_writer", "1 while this node is the writer.",
                            node, registry=r)  # fmt: skip
        self.alarm = Gauge("fairbus_ledger_alarm", "1 once this node found an invalid block.",
                           node, registry=r)  # fmt: skip
        self.connected = Gauge("fairbus_connected", "1 while on the bus, 0 while reconnecting.",
                               ["role", "participant"], registry=r)  # fmt: skip
        self.commit = Histogram("fairbus_ledger_commit_seconds", "From a submission's arrival "
                                "at the writer to its commit.", node, registry=r,
                                buckets=LATENCY_BUCKETS)  # fmt: skip
        self.committed = Counter("fairbus_ledger_committed", "Transactions committed as the "
                                 "writer.", node, registry=r)  # fmt: skip
        self.refusals = Counter("fairbus_ledger_refusals", "Submissions refused, by reason.",
                                [*node, "reason"], registry=r)  # fmt: skip
        self.blobs = Counter("fairbus_ledger_blobs", "Model-sized payloads seen on the bus, "
                             "by outcome.", [*node, "outcome"], registry=r)  # fmt: skip
        self.queries = Counter("fairbus_ledger_queries", "Queries answered, by kind and "
                               "outcome.", [*node, "kind", "outcome"], registry=r)  # fmt: skip
        self.exporter: Exporter | None = None

    def watch(
        self,
        *,
        height: Callable[[], float],
        writer: Callable[[], bool],
        alarm: Callable[[], bool],
        connected: Callable[[], bool],
    ) -> None:
        """Read these when scraped (cheap attribute reads of the running node)."""
        n = str(self.node_id)
        self.height.labels(n).set_function(height)
        self.writer.labels(n).set_function(lambda: float(writer()))
        self.alarm.labels(n).set_function(lambda: float(alarm()))
        self.connected.labels("ledger", n).set_function(lambda: float(connected()))

    def serve(self, port: int | None, address: str = DEFAULT_ADDRESS) -> None:
        self.exporter = serve(self.registry, port, address, f"ledger node {self.node_id}")

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    def committed_after(self, seconds: float) -> None:
        n = str(self.node_id)
        self.commit.labels(n).observe(seconds)
        self.committed.labels(n).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(str(self.node_id), reason).inc()

    def blob(self, kept: bool) -> None:
        self.blobs.labels(str(self.node_id), "kept" if kept else "refused").inc()

    def query(self, kind: str, outcome: str) -> None:
        self.queries.labels(str(self.node_id), kind, outcome).inc()
