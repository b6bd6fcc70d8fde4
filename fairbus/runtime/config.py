"""The configuration file ``fairbus provider`` and ``fairbus user`` read (one file for a
whole task; see ``configs/fairbus.example.toml``).

Strict: an unknown key, a wrong type or a value out of range is a
:class:`RuntimeConfigError` naming the table and key. Relative paths are taken from the
file's folder.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from fairbus.detection import DetectionParams
from fairbus.errors import FairbusError, OperatorError
from fairbus.exposure import DEFAULT_COLLUSION
from fairbus.protocol.provider import ProviderConfig
from fairbus.seccl import DEFAULT_CANDIDATE_SHARE, DEFAULT_THETA
from fairbus.task import PHASE_TIMEOUT, detection_table
from fairbus.training.config import MAX_LOCAL_STEPS, MAX_PROXIMAL_MU, TrainConfig
from fairbus.training.data import DATASET_MODELS, PARTITIONS, Partition
from fairbus.wire.messages import (
    DEFAULT_KEYING,
    DEFAULT_MODE,
    KEYINGS,
    MAX_COLLUSION,
    MODES,
    SECCL,
)

T = TypeVar("T")


class RuntimeConfigError(OperatorError):
    """The task's configuration is unreadable or wrong; the message names the file and
    the table (``t.toml [provider]: 'rounds' must be int``)."""


@dataclass(frozen=True)
class TrainingSettings:
    """What every participant must agree on: the data set, its split and the model."""

    dataset: str = "digits"
    data_dir: Path | None = None
    model: str | None = None
    partition: Partition = "iid"
    alpha: float = 0.5
    seed: int = 0
    threads: int = 0
    """torch threads for training and evaluation; 0 leaves torch's default (all cores).
    Several participants on one machine want 1 each."""
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def model_name(self) -> str:
        return self.model or DATASET_MODELS[self.dataset]


@dataclass(frozen=True)
class ProviderSettings:
    rounds: int = 10
    min_users: int | None = None
    """Users online before round 1 starts; None: every user of the roster."""
    join_timeout: float = 120.0
    """Start with whoever is online (at least 3) after this long."""
    phase_timeout: float = PHASE_TIMEOUT
    """A user that has not uploaded this long after an announcement counts as dropped."""
    presence_grace: float = 10.0
    """Seconds a user's ``offline`` presence (a Last Will, or a retained one replayed
    during a broker restart) must last before the provider counts it as dropped; the
    phase deadline catches a user that hangs while connected."""
    basic_groupings: int = ProviderConfig.basic_groupings
    key_repeats: int = ProviderConfig.key_repeats
    reference_groups: int = ProviderConfig.reference_groups
    regroup_every_round: bool = ProviderConfig.regroup_every_round
    defended: bool = True
    secure: bool = True
    """False: plain FedAvg over the same bus (the benchmark's baseline), no masking."""
    etcd: tuple[tuple[str, int], ...] = ()
    """etcd members (``"host:port"``) through which providers elect the active one (a
    hot standby, ``fairbus provider --standby``); empty: a single provider."""
    lease_ttl: int = 2
    """Seconds the active provider's etcd lease outlives it: the standby's takeover."""


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: Prometheus ``/metrics`` over HTTP (:mod:`fairbus.runtime.metrics`).
    A role whose port is not set serves none; 0 takes a free port (logged)."""

    address: str = "127.0.0.1"
    """Where the metrics ports listen: loopback unless told otherwise."""
    provider_port: int | None = None
    user_port: int | None = None
    """Every user serves on this port (one user per machine); 0 when several share one."""

    def port(self, role: str) -> int | None:
        return self.provider_port if role == "provider" else self.user_port


@dataclass(frozen=True)
class RuntimeConfig:
    roster: Path
    keys: Path
    state: Path
    broker: tuple[str, int]
    training: TrainingSettings
    provider: ProviderSettings
    detection: DetectionParams
    ledger_timeout: float = 5.0
    collusion: int = DEFAULT_COLLUSION
    """The task's collusion bound c (recorded at task start; :mod:`fairbus.exposure`):
    the provider groups under it, and a user refuses an announcement with a smaller c."""
    keying: str = DEFAULT_KEYING
    """How group members make their keys (recorded at task start): ``shamir`` (Alg. 3)
    or ``pairwise`` (:mod:`fairbus.pairwise`)."""
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    mode: str = DEFAULT_MODE
    """The protocol the task runs (recorded at task start): ``fairness`` (the provider
    and user machines of the fairness paper) or ``seccl`` (SecCL's server and
    participants, :mod:`fairbus.runtime.seccl_provider`, :mod:`fairbus.runtime.seccl_user`)."""
    theta: float | None = None
    """SecCL's θ, the fraction of parameter changes a participant shares ("Experimental
    Evaluation": 0.1); set exactly when the mode is ``seccl``."""
    candidate_share: float | None = None
    """SecCL's λ, the fraction of participants elected as candidates (the paper's
    Fig. 5: 0.2); set exactly when the mode is ``seccl``."""

    @property
    def seccl(self) -> bool:
        return self.mode == SECCL

    def provider_config(self) -> ProviderConfig:
        p = self.provider
        return ProviderConfig(
            basic_groupings=p.basic_groupings,
            key_repeats=p.key_repeats,
            reference_groups=p.reference_groups,
            regroup_every_round=p.regroup_every_round,
            detection=self.detection,
            defended=p.defended,
            phase_timeout=p.phase_timeout,
            seed=self.training.seed,
            collusion=self.collusion,
            keying=self.keying,
        )

    @classmethod
    def load(cls, path: Path) -> RuntimeConfig:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise RuntimeConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RuntimeConfigError(f"{path}: {exc}") from None
        return cls.from_dict(raw, base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base: Path, source: str) -> RuntimeConfig:
        top = _Table(raw, source, base)
        training = _Table(top.table("training"), f"{source} [training]", base)
        provider = _Table(top.table("provider"), f"{source} [provider]", base)
        try:
            detection = detection_table(top.take("detection", dict, {}))
        except FairbusError as exc:
            raise RuntimeConfigError(f"{source}: {exc}") from None
        t, p, tc = TrainingSettings(), ProviderSettings(), TrainConfig()
        dataset = training.take("dataset", str, t.dataset)
        if dataset not in DATASET_MODELS:
            raise RuntimeConfigError(
                f"{source} [training]: unknown dataset {dataset!r}; one of {sorted(DATASET_MODELS)}"
            )
        partition = training.take("partition", str, t.partition)
        if partition not in PARTITIONS:
            raise RuntimeConfigError(
                f"{source} [training]: partition is one of {', '.join(PARTITIONS)}"
            )
        settings = TrainingSettings(
            dataset=dataset,
            data_dir=training.path("data_dir") if "data_dir" in training.raw else None,
            model=training.take("model", str, None),
            partition=cast(Partition, partition),
            alpha=training.number("alpha", t.alpha, low=1e-6),
            seed=training.integer("seed", t.seed, low=0),
            threads=training.integer("threads", t.threads, low=0),
            train=TrainConfig(
                lr=training.number("lr", tc.lr, low=1e-9),
                batch_size=training.integer("batch_size", tc.batch_size, low=1),
                local_epochs=training.integer("local_epochs", tc.local_epochs, low=1),
                momentum=training.number("momentum", tc.momentum, low=0.0),
                local_steps=training.optional_integer("local_steps", low=1, high=MAX_LOCAL_STEPS),
                equal_steps=training.take("equal_steps", bool, tc.equal_steps),
                absent_class_scale=training.number(
                    "absent_class_scale", tc.absent_class_scale, low=0.0, high=1.0
                ),
                proximal_mu=training.number(
                    "proximal_mu", tc.proximal_mu, low=0.0, high=MAX_PROXIMAL_MU
                ),
            ),
        )
        training.done()
        min_users = provider.take("min_users", int, None)
        if min_users is not None and min_users < 3:
            raise RuntimeConfigError(f"{source} [provider]: 'min_users' must be at least 3")
        etcd: list[object] = provider.take("etcd", list, [])
        provider_settings = ProviderSettings(
            rounds=provider.integer("rounds", p.rounds, low=1),
            min_users=min_users,
            join_timeout=provider.number("join_timeout", p.join_timeout, low=0.0),
            presence_grace=provider.number("presence_grace", p.presence_grace, low=0.0),
            phase_timeout=provider.number("phase_timeout", p.phase_timeout, low=0.1),
            basic_groupings=provider.integer("basic_groupings", p.basic_groupings, low=1),
            key_repeats=provider.integer("key_repeats", p.key_repeats, low=0),
            reference_groups=provider.integer("reference_groups", p.reference_groups, low=0),
            regroup_every_round=provider.take("regroup_every_round", bool, p.regroup_every_round),
            defended=provider.take("defended", bool, p.defended),
            secure=provider.take("secure", bool, p.secure),
            etcd=tuple(_endpoint(e, f"{source} [provider]") for e in etcd),
            lease_ttl=provider.integer("lease_ttl", p.lease_ttl, low=1),
        )
        provider.done()
        metrics = _Table(top.table("metrics"), f"{source} [metrics]", base)
        metrics_settings = MetricsSettings(
            address=metrics.take("address", str, MetricsSettings.address),
            provider_port=metrics.port("provider_port"),
            user_port=metrics.port("user_port"),
        )
        metrics.done()
        config = cls(
            roster=top.path("roster"),
            keys=top.path("keys", "keys"),
            state=top.path("state", "state"),
            broker=top.endpoint("broker", "127.0.0.1:1883"),
            training=settings,
            provider=provider_settings,
            detection=detection,
            ledger_timeout=top.number("ledger_timeout", 5.0, low=0.1),
            collusion=top.integer("collusion", DEFAULT_COLLUSION, low=0),
            keying=top.take("keying", str, DEFAULT_KEYING),
            metrics=metrics_settings,
            **_mode(top, source),
        )
        top.done()
        if config.collusion > MAX_COLLUSION:
            raise RuntimeConfigError(f"{source}: 'collusion' must be at most {MAX_COLLUSION}")
        if config.keying not in KEYINGS:
            raise RuntimeConfigError(
                f"{source}: 'keying' must be one of {', '.join(KEYINGS)}, not {config.keying!r}"
            )
        return config


def _mode(top: _Table, source: str) -> dict[str, Any]:
    """``mode`` and, for a ``seccl`` task, ``theta`` and ``candidate_share`` (SecCL's
    defaults where absent); θ and λ in any other task are refused."""
    mode = top.take("mode", str, DEFAULT_MODE)
    if mode not in MODES:
        raise RuntimeConfigError(f"{source}: 'mode' must be one of {', '.join(MODES)}, "
                                 f"not {mode!r}")  # fmt: skip
    if mode != SECCL:
        given = sorted(k for k in ("theta", "candidate_share") if k in top.raw)
        if given:
            raise RuntimeConfigError(f"{source}: {given} belong to a task whose mode is "
                                     f"'seccl', not {mode!r}")  # fmt: skip
        return {"mode": mode}
    theta = top.number("theta", DEFAULT_THETA, low=0.0)
    share = top.number("candidate_share", DEFAULT_CANDIDATE_SHARE, low=0.0)
    for key, value in (("theta", theta), ("candidate_share", share)):
        if not 0.0 < value <= 1.0:
            raise RuntimeConfigError(f"{source}: {key!r} must be in (0, 1], got {value}")
    return {"mode": mode, "theta": theta, "candidate_share": share}


def _endpoint(value: object, source: str) -> tuple[str, int]:
    """``"host:port"`` as (host, port)."""
    host, _, port = str(value).rpartition(":")
    if not isinstance(value, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RuntimeConfigError(f"{source}: 'etcd' entries are 'host:port', got {value!r}")
    return host, int(port)


class _Table:
    """Reads one TOML table, checking each key's type; :meth:`done` refuses leftovers."""

    def __init__(self, raw: object, source: str, base: Path) -> None:
        if not isinstance(raw, dict):
            raise RuntimeConfigError(f"{source} must be a table")
        self.raw: dict[str, Any] = raw
        self.source = source
        self.base = base
        self.seen: set[str] = set()

    def take(self, key: str, kind: type[T], default: T) -> T:
        self.seen.add(key)
        value = self.raw.get(key, default)
        if value is default:
            return value
        # bool is an int in Python; a flag must not pass as a count, nor a count as a flag
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise RuntimeConfigError(
                f"{self.source}: {key!r} must be {kind.__name__}, got {value!r}"
            )
        return value

    def table(self, key: str) -> dict[str, Any]:
        return self.take(key, dict, {})

    def integer(self, key: str, default: int, *, low: int) -> int:
        value = self.take(key, int, default)
        if value < low:
            raise RuntimeConfigError(f"{self.source}: {key!r} must be at least {low}")
        return value

    def optional_integer(self, key: str, *, low: int, high: int) -> int | None:
        """An integer from ``low`` to ``high``, or None when the key is absent."""
        value = self.take(key, int, None)
        if value is not None and not low <= value <= high:
            raise RuntimeConfigError(f"{self.source}: {key!r} must be from {low} to {high}")
        return value

    def number(self, key: str, default: float, *, low: float, high: float | None = None) -> float:
        self.seen.add(key)
        value = self.raw.get(key, default)
        top = math.inf if high is None else high
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= top:
            within = f">= {low}" if high is None else f"from {low} to {high}"
            raise RuntimeConfigError(f"{self.source}: {key!r} must be a number {within}")
        return float(value)

    def path(self, key: str, default: str | None = None) -> Path:
        value = self.take(key, str, default)
        if value is None:
            raise RuntimeConfigError(f"{self.source}: {key!r} (a path) is required")
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def port(self, key: str) -> int | None:
        """An optional TCP port to listen on; 0 asks for a free one."""
        value = self.take(key, int, None)
        if value is not None and not 0 <= value < 65536:
            raise RuntimeConfigError(f"{self.source}: {key!r} must be a port (0 to 65535)")
        return value

    def endpoint(self, key: str, default: str) -> tuple[str, int]:
        value = self.take(key, str, default)
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RuntimeConfigError(f"{self.source}: {key!r} is 'host:port', got {value!r}")
        return host, int(port)

    def done(self) -> None:
        unknown = set(self.raw) - self.seen
        if unknown:
            raise RuntimeConfigError(f"{self.source}: unknown keys {sorted(unknown)}")
