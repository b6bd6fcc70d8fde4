"""Field specs: each checks one decoded msgpack value and converts it to Python.

A spec refuses anything but its exact type (``True`` is not an int, an int is not
a float), checks ranges and sizes, and names the path of the offending field.
:class:`WireStruct` subclasses declare ``FIELDS`` and get strict ``from_wire`` /
``to_wire``: a missing or extra key is a :class:`SchemaError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from fairbus.errors import SchemaError, SizeError
from fairbus.wire.limits import WireLimits


class Spec(Protocol):
    def load(self, value: Any, path: str, limits: WireLimits) -> Any: ...

    def dump(self, value: Any) -> Any: ...


def _type_error(path: str, expected: str, value: Any) -> SchemaError:
    return SchemaError(f"field {path}: expected {expected}, got {type(value).__name__}")


@dataclass(frozen=True)
class Int:
    lo: int = 0
    hi: int = 2**32 - 1

    def load(self, value: Any, path: str, limits: WireLimits) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, "int", value)
        if not self.lo <= value <= self.hi:
            raise SchemaError(f"field {path}: {value} is outside {self.lo}..{self.hi}")
        return value

    def dump(self, value: Any) -> Any:
        return int(value)


@dataclass(frozen=True)
class Float:
    lo: float = -math.inf
    hi: float = math.inf

    def load(self, value: Any, path: str, limits: WireLimits) -> float:
        if not isinstance(value, float):
            raise _type_error(path, "float", value)
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise SchemaError(f"field {path}: {value} is outside [{self.lo}, {self.hi}]")
        return value

    def dump(self, value: Any) -> Any:
        return float(value)


@dataclass(frozen=True)
class Bool:
    def load(self, value: Any, path: str, limits: WireLimits) -> bool:
        if not isinstance(value, bool):
            raise _type_error(path, "bool", value)
        return value

    def dump(self, value: Any) -> Any:
        return bool(value)


@dataclass(frozen=True)
class Str:
    max_len: int | None = None
    choices: tuple[str, ...] | None = None

    def load(self, value: Any, path: str, limits: WireLimits) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "str", value)
        bound = limits.max_str_len if self.max_len is None else self.max_len
        if len(value) > bound:
            raise SizeError(f"field {path}: string of {len(value)} characters exceeds {bound}")
        if self.choices is not None and value not in self.choices:
            raise SchemaError(f"field {path}: {value!r} is not one of {list(self.choices)}")
        return value

    def dump(self, value: Any) -> Any:
        return str(value)


@dataclass(frozen=True)
class Bin:
    """Bytes: ``exact`` length, or at most ``max_len`` (default: the model-size limit)."""

    exact: int | None = None
    max_len: int | None = None

    def load(self, value: Any, path: str, limits: WireLimits) -> bytes:
        if not isinstance(value, bytes):
            raise _type_error(path, "bytes", value)
        if self.exact is not None and len(value) != self.exact:
            raise SchemaError(f"field {path}: {len(value)} bytes, expected exactly {self.exact}")
        bound = limits.max_model_bytes if self.max_len is None else self.max_len
        if len(value) > bound:
            raise SizeError(f"field {path}: {len(value)} bytes exceeds {bound}")
        return value

    def dump(self, value: Any) -> Any:
        return bytes(value)


@dataclass(frozen=True)
class Optional:
    inner: Spec

    def load(self, value: Any, path: str, limits: WireLimits) -> Any:
        return None if value is None else self.inner.load(value, path, limits)

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)


@dataclass(frozen=True)
class List:
    """An array of ``item``; ``limit`` names the :class:`WireLimits` bound, or ``max_len``."""

    item: Spec
    limit: str = "max_array_len"
    max_len: int | None = None
    unique: bool = False

    def load(self, value: Any, path: str, limits: WireLimits) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _type_error(path, "array", value)
        bound = self.max_len if self.max_len is not None else getattr(limits, self.limit)
        if len(value) > bound:
            raise SizeError(f"field {path}: {len(value)} items exceed {bound}")
        out = tuple(self.item.load(v, f"{path}[{k}]", limits) for k, v in enumerate(value))
        if self.unique and len(set(out)) != len(out):
            raise SchemaError(f"field {path}: items must be distinct")
        return out

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]


S = TypeVar("S", bound="WireStruct")


class WireStruct:
    """Base of every wire structure: a frozen dataclass with a ``FIELDS`` schema."""

    FIELDS: ClassVar[dict[str, Spec]]

    def to_wire(self) -> dict[str, Any]:
        return {name: spec.dump(getattr(self, name)) for name, spec in self.FIELDS.items()}

    @classmethod
    def from_wire(cls: type[S], obj: Any, path: str, limits: WireLimits) -> S:
        if not isinstance(obj, dict):
            raise _type_error(path or cls.__name__, "map", obj)
        keys = set(obj)
        expected = set(cls.FIELDS)
        if keys != expected:
            missing = sorted(expected - keys)
            extra = sorted(str(k) for k in keys - expected)
            raise SchemaError(
                f"{path or cls.__name__}: missing fields {missing}, unknown fields {extra}"
            )
        values = {
            name: spec.load(obj[name], f"{path}.{name}" if path else name, limits)
            for name, spec in cls.FIELDS.items()
        }
        return cls(**values)


@dataclass(frozen=True)
class Struct:
    cls: type[WireStruct]

    def load(self, value: Any, path: str, limits: WireLimits) -> WireStruct:
        return self.cls.from_wire(value, path, limits)

    def dump(self, value: Any) -> Any:
        return value.to_wire()


def ids(limit: str = "max_array_len", *, unique: bool = True) -> List:
    """A list of distinct participant ids."""
    return List(Int(), limit=limit, unique=unique)


def names(values: Sequence[str]) -> Str:
    return Str(max_len=64, choices=tuple(values))
