"""The wire format: strict, bounded msgpack for every message fairbus sends.

* :mod:`fairbus.wire.limits` – the configurable bounds;
* :mod:`fairbus.wire.codec` – canonical packing and strict, bounded unpacking;
* :mod:`fairbus.wire.schema` – field specs that check types, ranges and sizes;
* :mod:`fairbus.wire.messages` – one class per message type of the protocol.

Every failure is a :class:`fairbus.errors.WireError`.
"""

from fairbus.wire.limits import WireLimits

__all__ = ["WireLimits"]
