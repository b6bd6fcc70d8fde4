"""What a user keeps across restarts, in its own folder (``<state>/user-<id>/``).

- ``chain_head``: the hash of its last transaction the ledger committed (the ``prev`` of
  its next upload). On start the ledger's answer wins over the file: an upload signed
  just before a crash may or may not have been committed.
- ``partition.npy`` and ``partition.json``: the indices of its share of the training
  data, fixed at the first start, so a restart trains on the same data even if the
  configuration's split would now come out differently.

Files are written atomically (a temporary file, fsync, rename). A folder or file that
cannot be created, read or written is a :class:`~fairbus.runtime.state.StateError`
naming it; damaged contents are a :class:`UserStateError`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fairbus.envelope import GENESIS
from fairbus.runtime.state import StateError, prepare_state_folder, state_io, write_atomic

MAX_PARTITION_BYTES = 64 * 1024 * 1024


class UserStateError(StateError):
    """A file in the user's state folder is damaged or belongs to another setup."""


class UserState:
    def __init__(self, directory: Path) -> None:
        """Create the folder (0700) if needed and check that it is writable."""
        self.directory = prepare_state_folder(directory)

    # --- chain head ---------------------------------------------------------------------------

    @property
    def _head_path(self) -> Path:
        return self.directory / "chain_head"

    def chain_head(self) -> bytes:
        with state_io("read", self._head_path):
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
        write_atomic(self._head_path, head.hex().encode("ascii") + b"\n")

    # --- data partition -----------------------------------------------------------------------

    def partition(self, describe: dict[str, object]) -> npt.NDArray[np.int64] | None:
        """The saved indices, or None before the first start. ``describe`` must match
        what they were saved with (data set, split): another data set is an error."""
        meta_path, data_path = self.directory / "partition.json", self.directory / "partition.npy"
        with state_io("read", data_path):
            if not data_path.exists():
                return None
        with state_io("read", meta_path):
            meta_text = meta_path.read_text(encoding="utf-8", errors="replace")
        try:
            meta = json.loads(meta_text)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise UserStateError(f"{meta_path} is damaged (not a JSON object)")
        if meta.get("describe") != describe:
            raise UserStateError(
                f"{self.directory} holds the partition of {meta.get('describe')}, "
                f"not of {describe}; remove the folder to start this user afresh"
            )
        with state_io("read", data_path):
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
        write_atomic(self.directory / "partition.npy", raw)
        meta = {"describe": describe, "sha256": hashlib.sha256(raw).hexdigest()}
        write_atomic(self.directory / "partition.json", json.dumps(meta).encode())
