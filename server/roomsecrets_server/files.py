"""Private files in the data dir (keys): created with mode 0600 from the first byte."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path, payload: str) -> None:
    """Write atomically and durably with mode 0600 (never briefly readable by others)."""
    tmp = _written_beside(path, payload, "tmp")
    os.replace(tmp, path)
    _sync_dir(path)


def create_private(path: Path, payload: str) -> bool:
    """Create `path` (mode 0600, durably) unless it exists; False if it already did. Atomic, so
    processes starting together on a fresh data dir (`serve --workers N`) agree on one file: a
    key created twice would leave one process sealing under a key the file no longer has."""
    tmp = _written_beside(path, payload, "new")
    try:
        os.link(tmp, path)  # fails if path exists, unlike rename
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    _sync_dir(path)
    return True


def _written_beside(path: Path, payload: str, suffix: str) -> Path:
    """A private, fsync'd temporary file next to `path` holding `payload`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.write(fd, payload.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _sync_dir(path: Path) -> None:
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
