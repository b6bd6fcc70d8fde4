"""Bounds on everything a decoder will accept. All are configurable per deployment."""

from __future__ import annotations

from dataclasses import dataclass

from fairbus.errors import WireError

MiB = 1024 * 1024


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds enforced before and during decoding.

    ``max_model_bytes`` bounds payloads that carry a model or a share vector
    (2.3 MB for the paper's MNIST CNN); ``max_small_payload`` bounds everything else.

    Bytes alone do not bound a decoder's work: 16 MiB of one-byte maps are five million
    Python dicts (seconds, a GiB). So every decode also bounds, per message, the nesting
    depth (``max_depth``), the arrays and maps (``max_containers``) and the items in them
    (``max_items``: an array's elements plus a map's keys and values, counted as each
    container's header announces them, before anything is built). The defaults hold
    every legitimate message with room to spare — the deepest is an announcement
    (map, groups, group, members: 4), the most containers an announcement of
    ``max_groups`` groups and prior groups (3 × 4,096 + 5), the most items an id list of
    ``max_array_len`` — and keep the worst payload of any size to milliseconds and a few
    MB (``tests/unit/test_bounded_decoding.py``).
    """

    max_message_bytes: int = 64 * MiB
    max_model_bytes: int = 48 * MiB
    max_small_payload: int = 512 * 1024
    max_str_len: int = 4096
    max_array_len: int = 65_536
    max_map_len: int = 64
    max_group_members: int = 64
    max_groups: int = 4096
    max_depth: int = 8
    max_containers: int = 16_384
    max_items: int = 131_072

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise WireError(f"wire limit {name} must be a positive integer, got {value!r}")
        if self.max_model_bytes > self.max_message_bytes:
            raise WireError("max_model_bytes cannot exceed max_message_bytes")


DEFAULT_LIMITS = WireLimits()
