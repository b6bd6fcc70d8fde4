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
            # Text is never model-sized; each field's schema bounds it further (a
            # roster change carries a whole roster's TOML).
            max_str_len=max(limits.max_str_len, min(bound, limits.max_small_payload)),
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

# What each first byte starts (msgpack spec): a scalar of a fixed total size (_SCALAR: the
# size is in _SIZE), a string or bin with its length in the next 0/1/2/4 bytes, an array
# or map with its count in the byte itself or the next 2/4 bytes, an ext type, or nothing.
_SCALAR, _FIXSTR, _VAR1, _VAR2, _VAR4, _FIXMAP, _FIXARRAY = 0, 1, 2, 3, 4, 5, 6
_ARRAY2, _ARRAY4, _MAP2, _MAP4, _EXT, _NEVER = 7, 8, 9, 10, 11, 12
_WIDE_SCALARS = {
    0xCA: 5,
    0xCB: 9,
    0xCC: 2,
    0xCD: 3,
    0xCE: 5,
    0xCF: 9,
    0xD0: 2,
    0xD1: 3,
    0xD2: 5,
    0xD3: 9,
}
"""float32/64, uint8..64, int8..64: their total sizes."""
_kind = bytearray(256)
_size = bytearray(256)
for _b in range(256):
    if _b <= 0x7F or _b >= 0xE0 or _b in (0xC0, 0xC2, 0xC3):  # fixints, nil, booleans
        _kind[_b], _size[_b] = _SCALAR, 1
    elif _b <= 0x8F:
        _kind[_b] = _FIXMAP
    elif _b <= 0x9F:
        _kind[_b] = _FIXARRAY
    elif _b <= 0xBF:
        _kind[_b] = _FIXSTR
    elif _b in _WIDE_SCALARS:
        _kind[_b], _size[_b] = _SCALAR, _WIDE_SCALARS[_b]
    else:
        _kind[_b] = {
            0xC4: _VAR1, 0xD9: _VAR1, 0xC5: _VAR2, 0xDA: _VAR2, 0xC6: _VAR4, 0xDB: _VAR4,
            0xDC: _ARRAY2, 0xDD: _ARRAY4, 0xDE: _MAP2, 0xDF: _MAP4, 0xC1: _NEVER,
        }.get(_b, _EXT)  # fmt: skip
_KIND, _SIZE = bytes(_kind), bytes(_size)
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]+")
"""A run of one-byte scalars (small ids, nil, booleans), skipped at C speed."""


def scan(data: bytes, limits: WireLimits) -> None:
    """Walk the msgpack structure of ``data`` without building anything; raise
    :class:`~fairbus.errors.SizeError` past ``max_depth``, ``max_containers``,
    ``max_items`` or a container's own length bound (each counted from the container's
    header, before its items are read), :class:`~fairbus.errors.DecodeError` on
    truncated, trailing or never-valid bytes.

    The work is one step per container, string and scalar read, and at most
    ``max_items`` items are read (runs of one-byte scalars at once), so the worst input
    of any size costs milliseconds and no memory beyond a stack of ``max_depth`` counts;
    whatever passes is then decoded by msgpack's C unpacker, which can build at most
    that many objects.
    """
    end = len(data)
    kinds, sizes = _KIND, _SIZE
    run = _ONE_BYTE_RUN.match
    max_depth, max_containers, max_items = limits.max_depth, limits.max_containers, limits.max_items
    max_array, max_map = limits.max_array_len, limits.max_map_len
    i = 0
    left = 1  # objects still to read at this level (the top level holds one)
    stack: list[int] = []  # the enclosing levels' objects still to read
    containers = items = 0
    try:
        while True:
            if not left:
                if not stack:
                    break
                left = stack.pop()
                continue
            b = data[i]  # IndexError: truncated
            kind = kinds[b]
            if kind == _SCALAR:
                if left > 2 and sizes[b] == 1 and sizes[data[i + 1]] == 1:
                    # two one-byte scalars in a row: skip the whole run at once
                    match = run(data, i, min(end, i + left))
                    stop = match.end() if match is not None else i + 1  # data[i] matches
                    left -= stop - i
                    i = stop
                    continue
                left -= 1
                i += sizes[b]
                continue
            left -= 1
            if kind == _FIXSTR:
                i += 1 + (b & 0x1F)
                continue
            if kind == _VAR1:
                i += 2 + data[i + 1]
                continue
            if kind == _VAR2:
                i += 3 + (data[i + 1] << 8 | data[i + 2])
                continue
            if kind == _VAR4:
                if i + 5 > end:
                    raise DecodeError("malformed msgpack: truncated")
                i += 5 + int.from_bytes(data[i + 1 : i + 5], "big")
                continue
            if kind in (_FIXMAP, _FIXARRAY):
                n, is_map, header = b & 0x0F, kind == _FIXMAP, 1
            elif kind in (_ARRAY2, _MAP2):
                n, is_map, header = data[i + 1] << 8 | data[i + 2], kind == _MAP2, 3
            elif kind in (_ARRAY4, _MAP4):
                if i + 5 > end:
                    raise DecodeError("malformed msgpack: truncated")
                n, is_map, header = int.from_bytes(data[i + 1 : i + 5], "big"), kind == _MAP4, 5
            elif kind == _EXT:
                raise SizeError("message field too large: msgpack ext types are not accepted")
            else:  # 0xc1, never used
                raise DecodeError(f"malformed msgpack: byte 0x{b:02x} at offset {i}")
            if is_map:
                if n > max_map:
                    raise SizeError(f"message field too large: a map of {n} keys exceeds {max_map}")
                n *= 2
            elif n > max_array:
                raise SizeError(
                    f"message field too large: an array of {n} items exceeds {max_array}"
                )
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
    except IndexError:
        raise DecodeError("malformed msgpack: truncated") from None
    if i > end:
        raise DecodeError("malformed msgpack: truncated")
    if i < end:
        raise DecodeError("trailing bytes after the message")
