"""The task's state folder (``state`` in the task's configuration): ``provider/`` and
``user-<id>/`` beneath it.

Every failure to create, read or write it (no permission, a full disk, a file where a
folder should be) is a :class:`StateError` naming the path and the operating system's
reason, which the CLI prints in one line. :func:`prepare_state_folder` finds most of them
at start, before any data is loaded or the broker is contacted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fairbus.errors import OperatorError

PROBE = ".fairbus-write-test"
"""The file :func:`prepare_state_folder` writes, syncs and removes to prove the folder
writable."""


class StateError(OperatorError):
    """A participant's state folder or one of its files cannot be used."""


def os_reason(exc: OSError) -> str:
    """The operating system's words for ``exc`` ("Permission denied")."""
    return exc.strerror or str(exc)


@contextmanager
def state_io(action: str, path: Path) -> Iterator[None]:
    """Turn an :class:`OSError` inside the block into ``StateError("cannot <action>
    <path>: <reason>")``."""
    try:
        yield
    except OSError as exc:
        raise StateError(f"cannot {action} {path}: {os_reason(exc)}") from None


def prepare_state_folder(directory: Path) -> Path:
    """Create ``directory`` (mode 0700, parents as needed) and prove it writable: a small
    file is written, synced to disk and removed. Returns ``directory``."""
    with state_io("create the state folder", directory):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    probe = directory / PROBE
    try:
        with state_io("write in the state folder", directory):
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"fairbus state folder write test\n")
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        with suppress(OSError):
            probe.unlink()
    return directory


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file, fsync, rename), mode 0600;
    :class:`StateError` when it cannot."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with state_io("write", path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except StateError:
        with suppress(OSError):
            tmp.unlink()
        raise
