"""Prometheus metrics of the provider and the users (``[metrics]`` in the task's
configuration; the ledger nodes' are in :mod:`fairbus_ledger_service.metrics`).

Each runtime keeps its own :class:`~prometheus_client.CollectorRegistry` (not the global
default one) and serves ``/metrics`` over HTTP only when its role's port is configured.
The state machines (:mod:`fairbus.protocol`, :mod:`fairbus.ledger`) know nothing of this:
the drivers feed :class:`RuntimeMetrics` what they carry out. Every metric is labelled
``role`` (``provider`` or ``user``) and ``participant`` (the roster id):

``fairbus_rounds_total``
    Provider: rounds completed (one :class:`~fairbus.rounds.RoundRecord` written each).
    User: rounds it took part in (at least one upload recorded).
``fairbus_rounds_failed_total``
    Provider: rounds given up (too few users, no safe grouping) and tried again.
``fairbus_round``
    The last round completed (provider) or taken part in (user).
``fairbus_attempts_total``
    Provider: attempts of the completed rounds (a dropout starts another attempt).
``fairbus_exclusions_total``, ``fairbus_excluded_users``
    Provider: users newly excluded as violators (counter), and excluded now (gauge).
``fairbus_phase_seconds``
    Histogram by ``phase``: the provider's round timings (``announce``, ``aggregation``,
    ``evaluation``, ``detection``, ``global_evaluation``, ``ledger``, ``round``: those
    of :attr:`RoundRecord.timings_s` that ran), a user's ``training``.
``fairbus_sent_bytes_total``
    Bytes published on the bus, by ``kind`` (the topic's: a message type, ``submit``,
    ``query``, ``presence``, ``share``, ...).
``fairbus_ledger_height``
    Height of the block that holds this participant's last committed transaction.
``fairbus_commit_seconds``
    Histogram by ``kind``: from submitting a transaction to holding its ledger receipt.
``fairbus_refusals_total``
    By ``reason``: what this participant's machine refused (a ``Refused`` output, e.g.
    ``StaleUpload``), or what the ledger refused of its submissions (a
    :class:`~fairbus.ledger.state.RefusalReason`).
``fairbus_connected``
    1 while the bus connection is up, 0 while it reconnects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from fairbus.rounds import RoundRecord
from fairbus.runtime.config import MetricsSettings
from fairbus_ledger_service.metrics import LATENCY_BUCKETS, Exporter, serve

if TYPE_CHECKING:
    from fairbus.runtime.connection import BusConnection

PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds, for phase durations (a phase runs from milliseconds to the phase timeout)."""


class _SentBytes:
    """``fairbus_sent_bytes_total`` read from :attr:`BusConnection.sent_bytes` when
    scraped (the connection counts every publish already)."""

    def __init__(self, bus: BusConnection, labels: tuple[str, str]) -> None:
        self.bus = bus
        self.labels = labels

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "fairbus_sent_bytes", "Bytes published on the bus, by the topic's kind.",
            labels=["role", "participant", "kind"],
        )  # fmt: skip
        for kind, sent in sorted(list(self.bus.sent_bytes.items())):
            family.add_metric([*self.labels, kind], sent)
        yield family


class RuntimeMetrics:
    """The metrics of one provider or user process (module docstring)."""

    def __init__(self, role: str, pid: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.role, self.pid = role, pid
        self.labels = (role, str(pid))
        r, who = self.registry, ["role", "participant"]
        self.rounds = Counter("fairbus_rounds", "Rounds completed (provider) or taken part "
                              "in (user).", who, registry=r).labels(*self.labels)  # fmt: skip
        self.rounds_failed = Counter("fairbus_rounds_failed", "Rounds given up and tried "
                                     "again.", who, registry=r).labels(*self.labels)  # fmt: skip
        self.round = Gauge("fairbus_round", "The last round completed or taken part in.",
                           who, registry=r).labels(*self.labels)  # fmt: skip
        self.attempts = Counter("fairbus_attempts", "Attempts of the completed rounds.",
                                who, registry=r).labels(*self.labels)  # fmt: skip
        self.exclusions = Counter("fairbus_exclusions", "Users newly excluded as violators.",
                                  who, registry=r).labels(*self.labels)  # fmt: skip
        self.excluded = Gauge("fairbus_excluded_users", "Users excluded now.",
                              who, registry=r).labels(*self.labels)  # fmt: skip
        self.phases = Histogram("fairbus_phase_seconds", "Duration of a round's phase.",
                                [*who, "phase"], registry=r, buckets=PHASE_BUCKETS)  # fmt: skip
        self.height = Gauge("fairbus_ledger_height", "Height of the block holding this "
                            "participant's last transaction.", who,
                            registry=r).labels(*self.labels)  # fmt: skip
        self.commits = Histogram("fairbus_commit_seconds", "From submitting a transaction "
                                 "to holding its receipt.", [*who, "kind"], registry=r,
                                 buckets=LATENCY_BUCKETS)  # fmt: skip
        self.refusals = Counter("fairbus_refusals", "Refusals by reason.", [*who, "reason"],
                                registry=r)  # fmt: skip
        self.connected = Gauge("fairbus_connected", "1 while the bus connection is up.",
                               who, registry=r).labels(*self.labels)  # fmt: skip
        self.exporter: Exporter | None = None
        self._excluded: set[int] = set()
        self._last_round = 0

    @classmethod
    def start(
        cls, settings: MetricsSettings, role: str, pid: int, bus: BusConnection
    ) -> RuntimeMetrics:
        """Metrics watching ``bus``, served if ``settings`` give ``role`` a port."""
        metrics = cls(role, pid)
        metrics.watch(bus)
        metrics.serve(settings.port(role), settings.address)
        return metrics

    def watch(self, bus: BusConnection) -> None:
        """Connection state and bytes sent, read from ``bus`` when scraped."""
        self.connected.set_function(lambda: float(bus.connected.is_set()))
        self.registry.register(_SentBytes(bus, self.labels))

    def serve(self, port: int | None, address: str) -> None:
        self.exporter = serve(self.registry, port, address, f"{self.role} {self.pid}")

    def exposition(self) -> str:
        """What ``/metrics`` serves now (Prometheus text format)."""
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    # --- what the drivers report -------------------------------------------------------------

    def round_ended(self, record: RoundRecord) -> None:
        """The provider's round is over: completed (its record) or failed."""
        if record.failed is not None:
            self.rounds_failed.inc()
            return
        self.rounds.inc()
        self.round.set(record.round)
        self.attempts.inc(record.attempts)
        excluded = set(record.excluded)
        self.exclusions.inc(len(excluded - self._excluded))
        self._excluded |= excluded
        self.excluded.set(len(self._excluded))
        for phase, seconds in record.timings_s.items():
            if seconds > 0:  # 0.0: a phase this role does not run
                self.phase(phase, seconds)
        if record.ledger_height is not None:
            self.height.set(record.ledger_height)

    def took_part(self, round_: int) -> None:
        """A user's upload for ``round_`` is out (counted once per round)."""
        if round_ > self._last_round:
            self._last_round = round_
            self.rounds.inc()
            self.round.set(round_)

    def phase(self, name: str, seconds: float) -> None:
        self.phases.labels(*self.labels, name).observe(seconds)

    def committed(self, kind: str, seconds: float, height: int) -> None:
        """A ``kind`` transaction committed at ``height``, its receipt after ``seconds``."""
        self.commits.labels(*self.labels, kind).observe(seconds)
        self.height.set(height)

    def refused(self, reason: str) -> None:
        self.refusals.labels(*self.labels, reason).inc()
