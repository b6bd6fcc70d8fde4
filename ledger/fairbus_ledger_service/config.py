"""The ledger node's configuration file (see ``configs/ledger.example.toml``).

Strict: unknown keys, wrong types and missing files are a :class:`LedgerConfigError`
naming the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fairbus.detection import DetectionParams
from fairbus.errors import FairbusError
from fairbus.protocol.provider import ProviderConfig


class LedgerConfigError(FairbusError):
    pass


def detection_table(table: object) -> DetectionParams:
    """A ``[detection]`` table (the task's Alg. 6 policy; the provider's and every ledger
    node's must be equal) over the provider's defaults. ``level_rounds = 0`` and
    ``evidence_window = 0`` turn those extensions off (TOML has no null)."""
    defaults = ProviderConfig().detection
    names = {f.name for f in fields(DetectionParams)}
    if not isinstance(table, dict) or set(table) - names:
        raise FairbusError(f"[detection] takes only {sorted(names)} (the task's Alg. 6 policy)")
    for key, value in table.items():
        flag = isinstance(getattr(defaults, key), bool)
        if flag != isinstance(value, bool) or not isinstance(value, int | float):
            kind = "true or false" if flag else "a number"
            raise FairbusError(f"[detection]: {key!r} must be {kind}, got {value!r}")
    off = {k: None for k in ("level_rounds", "evidence_window") if table.get(k) == 0}
    try:
        return DetectionParams(**{**vars(defaults), **table, **off})
    except (FairbusError, TypeError) as exc:
        raise FairbusError(f"[detection]: {exc}") from None


@dataclass(frozen=True)
class LedgerConfig:
    roster: Path
    keys: Path
    store: str
    sqlite: Path
    etcd: tuple[tuple[str, int], ...]
    blobs: Path
    broker: tuple[str, int]
    detection: DetectionParams
    max_block_txs: int = 2048
    linger_ms: float = 5.0
    lease_ttl: int = 2

    @classmethod
    def load(cls, path: Path) -> LedgerConfig:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LedgerConfigError(f"{path}: {exc}") from None
        return cls.from_dict(raw, base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base: Path, source: str) -> LedgerConfig:
        known = {"roster", "keys", "store", "sqlite", "etcd", "blobs", "broker", "detection",
                 "max_block_txs", "linger_ms", "lease_ttl"}  # fmt: skip
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
        try:
            params = detection_table(raw.get("detection", {}))
        except FairbusError as exc:
            raise LedgerConfigError(f"{source}: {exc}") from None
        ints = {k: raw.get(k, getattr(cls, k)) for k in ("max_block_txs", "lease_ttl")}
        for k, v in ints.items():
            if not isinstance(v, int) or v < 1:
                raise LedgerConfigError(f"{source}: {k!r} must be a positive integer")
        linger = raw.get("linger_ms", cls.linger_ms)
        if not isinstance(linger, int | float) or linger < 0:
            raise LedgerConfigError(f"{source}: 'linger_ms' must be >= 0")
        return cls(
            roster=path_of("roster"),
            keys=path_of("keys", "keys"),
            store=store,
            sqlite=path_of("sqlite", "data/ledger.sqlite"),
            etcd=tuple(endpoint(e, "etcd") for e in etcd),
            blobs=path_of("blobs", "data/blobs"),
            broker=endpoint(raw.get("broker", "127.0.0.1:1883"), "broker"),
            detection=params,
            max_block_txs=ints["max_block_txs"],
            linger_ms=float(linger),
            lease_ttl=ints["lease_ttl"],
        )
