"""Canonical msgpack packing and strict, bounded unpacking."""

from __future__ import annotations

import re
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

    Truncated or trailing bytes, ext types, non-string map keys, duplicate keys,
    over-long strings, bins, arrays or maps, nesting deeper than ``max_depth`` and more
    than ``max_containers`` arrays and maps or ``max_items`` items in them raise a
    :class:`~fairbus.errors.WireError`; nothing from msgpack escapes. The structure is
    walked (:func:`scan`) before anything is built, so the work and memory a message
    can cost are bounded by the limits, not by its size.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    bound = limits.max_message_bytes if max_bytes is None else max_bytes
    if len(data) > bound:
        raise SizeError(f"message of {len(data)} bytes exceeds the limit of {bound}")
    data = bytes(data)
    scan(data, limits)
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
    except msgpack.StackError:
        # msgpack's C unpacker stops at 1,024 levels (scan stops far earlier).
        raise SizeError("message nested too deeply for the msgpack decoder") from None
    except ValueError as exc:
        # msgpack reports truncation, bad bytes (FormatError), invalid UTF-8 and its
        # max_*_len bounds all as ValueError subclasses.
        text = str(exc)
        if "exceeds max" in text:
            raise SizeError(f"message field too large: {text}") from None
        raise DecodeError(f"malformed msgpack: {text}") from None


# --- the structure walk -----------------------------------------------------------------------

_FIXED = bytearray(256)
"""Total size of each fixed-size scalar by its first byte (0: not a fixed-size scalar)."""
for _b in (*range(0x00, 0x80), 0xC0, 0xC2, 0xC3, *range(0xE0, 0x100)):
    _FIXED[_b] = 1  # fixints, nil, false, true
for _b, _size in {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}.items():
    _FIXED[_b] = _size  # float32/64, uint8..64
for _b, _size in {0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}.items():
    _FIXED[_b] = _size  # int8..64
_FIXED_SIZES = bytes(_FIXED)
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]+")
"""A run of one-byte scalars (small ids, nil, booleans), skipped at C speed."""
_LENGTH_FIELD = {0xC4: 1, 0xD9: 1, 0xC5: 2, 0xDA: 2, 0xC6: 4, 0xDB: 4}
"""bin8/str8, bin16/str16, bin32/str32: the width of the length after the type byte."""
_EXT = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


def scan(data: bytes, limits: WireLimits) -> None:
    """Walk the msgpack structure of ``data`` without building anything; raise
    :class:`~fairbus.errors.SizeError` past ``max_depth``, ``max_containers``,
    ``max_items`` or a container's own length bound (each counted from the container's
    header, before its items are read), :class:`~fairbus.errors.DecodeError` on
    truncated, trailing or never-valid bytes.

    The work is one step per container, string and scalar read, and at most
    ``max_items`` scalars are read (runs of one-byte scalars at once), so the worst
    input of any size costs milliseconds and no memory beyond a stack of ``max_depth``
    counts; whatever passes is then decoded by msgpack's C unpacker, which can build at
    most that many objects.
    """
    end = len(data)
    fixed = _FIXED_SIZES
    run = _ONE_BYTE_RUN.match
    max_depth, max_containers, max_items = limits.max_depth, limits.max_containers, limits.max_items
    max_array, max_map = limits.max_array_len, limits.max_map_len
    i = 0
    left = 1  # objects still to read at this level (the top level holds one)
    stack: list[int] = []  # the enclosing levels' objects still to read
    containers = items = 0
    while True:
        if not left:
            if not stack:
                break
            left = stack.pop()
            continue
        if i >= end:
            raise DecodeError("malformed msgpack: truncated")
        b = data[i]
        size = fixed[b]
        if size:
            if size == 1 and left > 2 and i + 1 < end and fixed[data[i + 1]] == 1:
                match = run(data, i, min(end, i + left))
                stop = match.end() if match is not None else i + 1  # it matches data[i]
                left -= stop - i
                i = stop
            else:
                left -= 1
                i += size
            continue
        left -= 1
        if 0xA0 <= b <= 0xBF:  # fixstr
            i += 1 + (b & 0x1F)
            continue
        width = _LENGTH_FIELD.get(b)
        if width is not None:  # bin or str
            if i + 1 + width > end:
                raise DecodeError("malformed msgpack: truncated")
            i += 1 + width + int.from_bytes(data[i + 1 : i + 1 + width], "big")
            continue
        if b <= 0x9F:  # fixmap 0x80-0x8f, fixarray 0x90-0x9f
            n, is_map, header = b & 0x0F, b < 0x90, 1
        elif b in (0xDC, 0xDE, 0xDD, 0xDF):  # array16, map16, array32, map32
            header = 3 if b in (0xDC, 0xDE) else 5
            if i + header > end:
                raise DecodeError("malformed msgpack: truncated")
            n, is_map = int.from_bytes(data[i + 1 : i + header], "big"), b in (0xDE, 0xDF)
        elif b in _EXT:
            raise SizeError("message field too large: msgpack ext types are not accepted")
        else:  # 0xc1, never used
            raise DecodeError(f"malformed msgpack: byte 0x{b:02x} at offset {i}")
        if is_map:
            if n > max_map:
                raise SizeError(f"message field too large: a map of {n} keys exceeds {max_map}")
            n *= 2
        elif n > max_array:
            raise SizeError(f"message field too large: an array of {n} items exceeds {max_array}")
        containers += 1
        items += n
        if len(stack) >= max_depth:
            raise SizeError(f"message nested deeper than {max_depth} arrays and maps")
        if containers > max_containers:
            raise SizeError(f"message holds more than {max_containers} arrays and maps")
        if items > max_items:
            raise SizeError(f"message holds more than {max_items} items in its arrays and maps")
        stack.append(left)
        left = n
        i += header
    if i > end:
        raise DecodeError("malformed msgpack: truncated")
    if i < end:
        raise DecodeError("trailing bytes after the message")
