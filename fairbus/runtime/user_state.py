"""What a user keeps across restarts, in its own folder (``<state>/user-<id>/``).

- ``chain_head``: the hash of its last transaction the ledger committed (the ``prev`` of
  its next upload). On start the ledger's answer wins over the file: an upload signed
  just before a crash may or may not have been committed.
- ``partition.npy`` and ``partition.json``: the indices of its share of the training
  data, fixed at the first start, so a restart trains on the same data even if the
  configuration's split would now come out differently.

Files are written atomically (a temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError

MAX_PARTITION_BYTES = 64 * 1024 * 1024


class UserStateError(FairbusError):
    pass


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class UserState:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- chain head ---------------------------------------------------------------------------

    @property
    def _head_path(self) -> Path:
        return self.directory / "chain_head"

    def chain_head(self) -> bytes:
        if not self._head_path.exists():
            return GENESIS
        text = self._head_path.read_bytes()[:256].decode("ascii", "replace").strip()
        try:
            head = bytes.fromhex(text)
        except ValueError:
            raise UserStateError(f"{self._head_path} is not a hex hash") from None
        if len(head) != len(GENESIS):
            raise UserStateError(f"{self._head_path} holds {len(head)} bytes, expected 32")
        return head

    def save_chain_head(self, head: bytes) -> None:
        _write_atomic(self._head_path, head.hex().encode("ascii") + b"\n")

    # --- data partition -----------------------------------------------------------------------

    def partition(self, describe: dict[str, object]) -> npt.NDArray[np.int64] | None:
        """The saved indices, or None before the first start. ``describe`` must match
        what they were saved with (data set, split): another data set is an error."""
        meta_path, data_path = self.directory / "partition.json", self.directory / "partition.npy"
        if not data_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("describe") != describe:
            raise UserStateError(
                f"{self.directory} holds the partition of {meta.get('describe')}, "
                f"not of {describe}; remove the folder to start this user afresh"
            )
        raw = data_path.read_bytes()
        if len(raw) > MAX_PARTITION_BYTES or hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            raise UserStateError(f"{data_path} is damaged (its hash does not match)")
        indices: npt.NDArray[np.int64] = np.load(io.BytesIO(raw), allow_pickle=False)
        if indices.dtype != np.int64 or indices.ndim != 1:
            raise UserStateError(f"{data_path} is not a list of sample indices")
        return indices

    def save_partition(self, describe: dict[str, object], indices: npt.NDArray[np.int64]) -> None:
        buffer = io.BytesIO()
        np.save(buffer, indices.astype(np.int64), allow_pickle=False)
        raw = buffer.getvalue()
        _write_atomic(self.directory / "partition.npy", raw)
        meta = {"describe": describe, "sha256": hashlib.sha256(raw).hexdigest()}
        _write_atomic(self.directory / "partition.json", json.dumps(meta).encode())
