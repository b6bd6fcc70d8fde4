"""The broker's configuration file (see ``configs/broker.example.toml``).

Strict: an unknown key, a wrong type, a value out of range or a missing TLS file is a
:class:`~broker.errors.BrokerConfigError` naming the file and the field. Relative paths are
relative to the folder of the configuration file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fairbus_broker.errors import BrokerConfigError

MIB = 1024 * 1024
DEFAULT_MAX_PACKET_SIZE = 16 * MIB
MIN_MAX_PACKET_SIZE = 4 * MIB
"""A masked upload of the paper's MNIST CNN is 2.3 MB plus its envelope; below 4 MiB a
model-sized publish could be refused (Mosquitto disconnects the sender)."""
MQTT_MAX_PACKET_SIZE = 268_435_455  # the largest "remaining length" MQTT 3.1.1 can encode
DEFAULT_MAX_QUEUED_MESSAGES = 100_000
DEFAULT_MAX_INFLIGHT_MESSAGES = 20

_T = TypeVar("_T")
_TOP_KEYS = frozenset(
    {"roster", "keys", "data_dir", "host", "port", "persistence", "max_packet_size",
     "max_queued_messages", "max_inflight_messages", "tls"}
)  # fmt: skip
_TLS_KEYS = frozenset({"cafile", "certfile", "keyfile", "require_certificate"})


@dataclass(frozen=True)
class TlsConfig:
    """A TLS listener. With ``require_certificate`` every client must present a certificate
    signed by ``cafile`` whose CN is its broker username (``user-3``); no passwords then."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    """Everything ``fairbus broker`` needs; see ``configs/broker.example.toml``."""

    roster: Path
    keys: Path
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 1883
    persistence: bool = True
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES
    tls: TlsConfig | None = None

    @classmethod
    def load(cls, path: Path) -> BrokerConfig:
        """Read and check a TOML configuration file."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BrokerConfigError(f"broker configuration {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BrokerConfigError(f"{path}: cannot read: {exc}") from None
        return cls.from_toml(text, base=path.parent, source=str(path))

    @classmethod
    def from_toml(cls, text: str, *, base: Path, source: str = "<broker config>") -> BrokerConfig:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BrokerConfigError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_dict(raw, base=base, source=source)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base: Path, source: str) -> BrokerConfig:
        """Check ``raw`` (a parsed TOML document) field by field."""
        _no_unknown(raw, _TOP_KEYS, source, "")
        get = _Getter(raw, base, source, "")
        if "roster" not in raw:
            raise BrokerConfigError(f"{source}: 'roster' is required (the roster TOML file)")
        return cls(
            roster=get.path("roster", ""),
            keys=get.path("keys", "keys"),
            data_dir=get.path("data_dir", "data/broker"),
            host=get.host("host", cls.host),
            port=get.integer("port", cls.port, 1, 65_535),
            persistence=get.boolean("persistence", cls.persistence),
            max_packet_size=get.integer(
                "max_packet_size", cls.max_packet_size, MIN_MAX_PACKET_SIZE, MQTT_MAX_PACKET_SIZE
            ),
            max_queued_messages=get.integer(
                "max_queued_messages", cls.max_queued_messages, 1, 2**31 - 1
            ),
            max_inflight_messages=get.integer(
                "max_inflight_messages", cls.max_inflight_messages, 0, 65_535
            ),
            tls=_tls(raw["tls"], base, source) if "tls" in raw else None,
        )


def _tls(raw: Any, base: Path, source: str) -> TlsConfig:
    if not isinstance(raw, dict):
        raise BrokerConfigError(f"{source}: 'tls' must be a table ([tls])")
    _no_unknown(raw, _TLS_KEYS, source, "tls.")
    get = _Getter(raw, base, source, "tls.")
    missing = sorted({"cafile", "certfile", "keyfile"} - set(raw))
    if missing:
        raise BrokerConfigError(f"{source}: [tls] is missing {missing}")
    files = {k: get.path(k, "") for k in ("cafile", "certfile", "keyfile")}
    for key, path in files.items():
        if not path.is_file():
            raise BrokerConfigError(f"{source}: 'tls.{key}' = {str(path)!r} is not a file")
    return TlsConfig(
        cafile=files["cafile"],
        certfile=files["certfile"],
        keyfile=files["keyfile"],
        require_certificate=get.boolean("require_certificate", False),
    )


def _no_unknown(raw: dict[str, Any], known: frozenset[str], source: str, prefix: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        names = ", ".join(repr(prefix + k) for k in unknown)
        raise BrokerConfigError(f"{source}: unknown key(s) {names}; known: {sorted(known)}")


@dataclass(frozen=True)
class _Getter:
    """Typed reads of one table, each error naming ``<prefix><key>``."""

    raw: dict[str, Any]
    base: Path
    source: str
    prefix: str

    def _get(self, key: str, default: _T, ok: Callable[[Any], bool], want: str) -> Any:
        value = self.raw.get(key, default)
        if not ok(value):
            raise BrokerConfigError(
                f"{self.source}: '{self.prefix}{key}' must be {want}, got {value!r}"
            )
        return value

    def path(self, key: str, default: str) -> Path:
        value = self._get(key, default, _is_path, "a non-empty path string")
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def host(self, key: str, default: str) -> str:
        value: str = self._get(key, default, _is_host, "a host name or address")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        def ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

        value: int = self._get(key, default, ok, f"an integer in {low}..{high}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value: bool = self._get(key, default, lambda v: isinstance(v, bool), "true or false")
        return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value != "" and not any(c in value for c in "\n\r\0")


def _is_host(value: Any) -> bool:
    return isinstance(value, str) and value != "" and not any(c.isspace() for c in value)
