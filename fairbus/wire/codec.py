"""Canonical msgpack packing and strict, bounded unpacking."""

from __future__ import annotations

from typing import Any

import msgpack

from fairbus.errors import DecodeError, SchemaError, SizeError
from fairbus.wire.limits import WireLimits


def canonical(obj: Any) -> Any:
    """A copy of ``obj`` with every map's keys sorted, so packing is deterministic."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    return obj


def pack(obj: Any) -> bytes:
    """Pack ``obj`` canonically: sorted map keys, bin for bytes, str for text, float64."""
    return bytes(msgpack.packb(canonical(obj), use_bin_type=True))


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SchemaError(f"duplicate map key {key!r}")
        out[key] = value
    return out


def unpack(data: bytes, limits: WireLimits, *, max_bytes: int | None = None) -> Any:
    """Decode exactly one msgpack object from ``data`` within ``limits``.

    Truncated or trailing bytes, ext types, non-string map keys, duplicate keys and
    over-long strings, bins, arrays or maps raise a :class:`~fairbus.errors.WireError`;
    nothing from msgpack escapes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    bound = limits.max_message_bytes if max_bytes is None else max_bytes
    if len(data) > bound:
        raise SizeError(f"message of {len(data)} bytes exceeds the limit of {bound}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_pairs_to_dict,
            max_bin_len=min(bound, limits.max_model_bytes),
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except SchemaError:
        raise
    except msgpack.ExtraData:
        raise DecodeError("trailing bytes after the message") from None
    except ValueError as exc:
        # msgpack reports truncation, bad bytes (FormatError, StackError), invalid UTF-8
        # and its max_*_len bounds all as ValueError subclasses.
        text = str(exc)
        if "exceeds max" in text:
            raise SizeError(f"message field too large: {text}") from None
        raise DecodeError(f"malformed msgpack: {text}") from None
