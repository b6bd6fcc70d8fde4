"""The ``--keying`` option shared by ``fairbus simulate`` and ``fairbus bench round``."""

from __future__ import annotations

from typing import TypeVar

import typer

from fairbus.wire.messages import KEYINGS

T = TypeVar("T", str, list[str])

HELP = (
    "How group members make their keys: 'shamir' (Alg. 3: shares as long as the model to "
    "every group mate) or 'pairwise' (from X25519 agreements; nothing sent)."
)


def known_keyings(value: T) -> T:
    """Typer callback: refuse, in one line, a keying that is not one of :data:`KEYINGS`."""
    given = [value] if isinstance(value, str) else value
    if set(given) - set(KEYINGS):
        raise typer.BadParameter(f"one of {', '.join(KEYINGS)}")
    return value
