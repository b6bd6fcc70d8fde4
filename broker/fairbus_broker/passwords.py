"""Mosquitto 2.0 password-file hashes, written in Python.

``mosquitto_passwd`` (2.0) writes ``<username>:$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-
SHA512 over the UTF-8 password with a 12-byte salt, 101 iterations by default, salt and
64-byte hash in standard base64 with padding. Writing the same lines here means the broker
bring-up needs no ``mosquitto_passwd`` binary, and the embedded broker verifies the very same
hashes (:func:`verify_password`).

The salt comes from libsodium's CSPRNG (``nacl.utils.random``). The iteration count is
Mosquitto's default: the passwords it protects are 32 random bytes (``fairbus keys new``),
so stretching adds nothing against guessing and would slow every connect.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping

import nacl.utils

from fairbus_broker.errors import BrokerError

ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64
_PREFIX = "$7$"


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The ``$7$…`` hash of ``password`` as ``mosquitto_passwd`` 2.0 writes it.

    ``salt`` is for tests that compare with a hash made elsewhere; leave it out otherwise.
    """
    if iterations < 1:
        raise BrokerError(f"PBKDF2 iterations must be positive, got {iterations}")
    if salt is None:
        salt = nacl.utils.random(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"{_PREFIX}{iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (constant-time compare).

    A malformed or foreign hash never matches.
    """
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    iterations = int(parts[2])
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        return False
    if iterations < 1 or not salt or len(expected) != HASH_BYTES:
        return False
    actual = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(actual, expected)


def mosquitto_password_file(entries: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """The text of a Mosquitto ``password_file``: one ``username:hash`` line per entry.

    ``entries`` maps (or pairs) each username with its plaintext password; only the hashes
    are written. A username with ``:`` or a line break, or one given twice, is refused.
    """
    pairs = entries.items() if isinstance(entries, Mapping) else entries
    lines: list[str] = []
    seen: set[str] = set()
    for username, password in pairs:
        check_username(username)
        if username in seen:
            raise BrokerError(f"broker username {username!r} appears twice")
        seen.add(username)
        lines.append(f"{username}:{hash_password(password)}")
    return "".join(line + "\n" for line in lines)


def check_username(username: str) -> None:
    """Refuse a username Mosquitto's password file cannot hold."""
    if not username or any(c in username for c in ":\n\r\0"):
        raise BrokerError(f"broker username {username!r} is empty or holds ':' or a line break")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
