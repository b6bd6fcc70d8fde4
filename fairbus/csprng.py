"""Secret randomness: libsodium only (docs/architecture.md, "Keys and numbers").

A 32-byte seed comes from ``randombytes_buf`` (``nacl.utils.random``) and is expanded
into field vectors with ``randombytes_deterministic`` (ChaCha20). Independent streams
under one seed are separated by keyed BLAKE2b, so one seed can drive a secret and all
of its polynomial coefficients without any stream overlapping another.
"""

from __future__ import annotations

import numpy as np
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.utils import random as _sodium_random
from nacl.utils import randombytes_deterministic

from fairbus.errors import FieldError
from fairbus.field import FieldVector, P

SEED_BYTES = 32
_MASK31 = np.uint32(0x7FFF_FFFF)
_P32 = np.uint32(P)


def new_seed() -> bytes:
    """A fresh 32-byte seed from the operating system's CSPRNG via libsodium."""
    return bytes(_sodium_random(SEED_BYTES))


def substream_seed(seed: bytes, label: bytes) -> bytes:
    """Derive an independent 32-byte seed for the stream named ``label``."""
    if len(seed) != SEED_BYTES:
        raise FieldError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return bytes(
        blake2b(
            label, digest_size=SEED_BYTES, key=seed, person=b"fairbus-stream", encoder=RawEncoder
        )
    )


def expand_field(seed: bytes, length: int) -> FieldVector:
    """Expand ``seed`` into ``length`` uniform elements of GF(p), deterministically.

    Each element is 31 random bits; the value p itself (probability 2^-31) is rejected
    and redrawn from a follow-on stream, so the output is exactly uniform on [0, p).
    """
    if length < 0:
        raise FieldError(f"length must be >= 0, got {length}")
    if len(seed) != SEED_BYTES:
        raise FieldError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    raw = randombytes_deterministic(4 * length, seed)
    out = np.frombuffer(raw, dtype="<u4").astype(np.uint32) & _MASK31
    rejected = np.flatnonzero(out == _P32)
    refill = 0
    while rejected.size:
        refill += 1
        extra = expand_field(substream_seed(seed, b"refill%d" % refill), int(rejected.size))
        out[rejected] = extra
        rejected = rejected[extra == _P32]
    return out


def random_field(length: int) -> FieldVector:
    """``length`` fresh uniform field elements from a new CSPRNG seed."""
    return expand_field(new_seed(), length)
