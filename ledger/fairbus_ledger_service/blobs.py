"""Payload bytes kept by SHA-256 on a ledger node's disk, verified on write and on read.

Model-sized payloads (global models, masked uploads) stay out of the blocks; their
hashes are in the signed headers the blocks hold, and this store keeps the bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from fairbus.errors import FairbusError


class BlobError(FairbusError):
    """A blob that is missing, or whose bytes do not hash to its name."""


class BlobStore:
    def __init__(self, root: Path, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, digest: bytes) -> Path:
        if len(digest) != 32:
            raise BlobError(f"a blob is named by a 32-byte SHA-256, got {len(digest)} bytes")
        name = digest.hex()
        return self.root / name[:2] / name

    def put(self, digest: bytes, data: bytes) -> None:
        """Keep ``data`` under ``digest`` if it hashes to it (idempotent, crash-safe)."""
        if len(data) > self.max_bytes:
            raise BlobError(f"blob of {len(data)} bytes exceeds {self.max_bytes}")
        if hashlib.sha256(data).digest() != digest:
            raise BlobError(f"bytes do not hash to {digest.hex()[:16]}; not stored")
        path = self._path(digest)
        if path.exists():
            return
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, digest: bytes) -> bytes:
        """The bytes under ``digest``; :class:`BlobError` if missing or corrupted."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"no blob {digest.hex()[:16]}") from None
        if hashlib.sha256(data).digest() != digest:
            raise BlobError(f"blob {digest.hex()[:16]} is corrupted on disk")
        return data

    def find(self, digest: bytes) -> bytes | None:
        """The bytes under ``digest``, or None if missing or corrupted (a
        :data:`fairbus.ledger.verify.BlobSource`)."""
        try:
            return self.get(digest)
        except BlobError:
            return None

    def __contains__(self, digest: bytes) -> bool:
        return self._path(digest).exists()
