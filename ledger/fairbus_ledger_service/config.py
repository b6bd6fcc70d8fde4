"""The ledger node's configuration file (see ``configs/ledger.example.toml``).

Strict: unknown keys, wrong types and missing files are a :class:`LedgerConfigError`
naming the key. A node configures no consensus-critical parameter: the task's (Algorithm
6's policy) are recorded on the ledger at task start (:mod:`fairbus.task`), so every node
and auditor takes the same ones from the blocks.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairbus.errors import FairbusError


class LedgerConfigError(FairbusError):
    pass


MOVED = (
    "a ledger node takes no [detection] table: the Alg. 6 policy moved to the task's "
    "configuration (fairbus.toml) and is recorded on the ledger at task start"
)


@dataclass(frozen=True)
class LedgerConfig:
    roster: Path
    keys: Path
    store: str
    sqlite: Path
    etcd: tuple[tuple[str, int], ...]
    blobs: Path
    broker: tuple[str, int]
    max_block_txs: int = 2048
    linger_ms: float = 5.0
    lease_ttl: int = 2
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (0: a free one); None: no exporter."""
    metrics_address: str = "127.0.0.1"

    @classmethod
    def load(cls, path: Path) -> LedgerConfig:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LedgerConfigError(f"{path}: {exc}") from None
        return cls.from_dict(raw, base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base: Path, source: str) -> LedgerConfig:
        known = {"roster", "keys", "store", "sqlite", "etcd", "blobs", "broker",
                 "max_block_txs", "linger_ms", "lease_ttl", "metrics_port",
                 "metrics_address"}  # fmt: skip
        if "detection" in raw:
            raise LedgerConfigError(f"{source}: {MOVED}")
        unknown = set(raw) - known
        if unknown:
            raise LedgerConfigError(f"{source}: unknown keys {sorted(unknown)}")

        def path_of(key: str, default: str | None = None) -> Path:
            value = raw.get(key, default)
            if not isinstance(value, str):
                raise LedgerConfigError(f"{source}: {key!r} must be a path string")
            p = Path(value)
            return p if p.is_absolute() else base / p

        def endpoint(value: Any, key: str) -> tuple[str, int]:
            if not isinstance(value, str) or ":" not in value:
                raise LedgerConfigError(f"{source}: {key!r} entries are 'host:port', got {value!r}")
            host, _, port = value.rpartition(":")
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise LedgerConfigError(f"{source}: bad port in {key!r}: {value!r}")
            return host, int(port)

        store = raw.get("store", "sqlite")
        if store not in ("sqlite", "etcd"):
            raise LedgerConfigError(f"{source}: 'store' is 'sqlite' or 'etcd', got {store!r}")
        etcd = raw.get("etcd", [])
        if not isinstance(etcd, list) or (store == "etcd" and not etcd):
            raise LedgerConfigError(f"{source}: 'etcd' must list the members as 'host:port'")
        ints = {k: raw.get(k, getattr(cls, k)) for k in ("max_block_txs", "lease_ttl")}
        for k, v in ints.items():
            if not isinstance(v, int) or v < 1:
                raise LedgerConfigError(f"{source}: {k!r} must be a positive integer")
        linger = raw.get("linger_ms", cls.linger_ms)
        if not isinstance(linger, int | float) or linger < 0:
            raise LedgerConfigError(f"{source}: 'linger_ms' must be >= 0")
        metrics_port = raw.get("metrics_port")
        if metrics_port is not None and (
            isinstance(metrics_port, bool)
            or not isinstance(metrics_port, int)
            or not 0 <= metrics_port < 65536
        ):
            raise LedgerConfigError(f"{source}: 'metrics_port' must be a port (0 to 65535)")
        metrics_address = raw.get("metrics_address", cls.metrics_address)
        if not isinstance(metrics_address, str) or not metrics_address:
            raise LedgerConfigError(f"{source}: 'metrics_address' must be a host address")
        return cls(
            roster=path_of("roster"),
            keys=path_of("keys", "keys"),
            store=store,
            sqlite=path_of("sqlite", "data/ledger.sqlite"),
            etcd=tuple(endpoint(e, "etcd") for e in etcd),
            blobs=path_of("blobs", "data/blobs"),
            broker=endpoint(raw.get("broker", "127.0.0.1:1883"), "broker"),
            max_block_txs=ints["max_block_txs"],
            linger_ms=float(linger),
            lease_ttl=ints["lease_ttl"],
            metrics_port=metrics_port,
            metrics_address=metrics_address,
        )
