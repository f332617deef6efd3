"""Private files in the data dir (keys): created with mode 0600 from the first byte, and read
only while no one else may read them."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700

log = logging.getLogger("roomsecrets")


def read_private(path: Path, what: str, *, group_readable_if_root_owned: bool = False) -> bytes:
    """The bytes of key material at `path` (symlinks followed), refused with PermissionError if
    group or others may read or write it. The mode is checked on the descriptor that is read, so
    a file swapped in between cannot slip past.

    `group_readable_if_root_owned` (TLS private keys): group read is accepted on a file owned by
    root, as PostgreSQL accepts its key: that is how administrators hand a key to a service
    through a group (Debian's ssl-cert); the service's own files have no business being group
    readable, so elsewhere a group bit means a careless umask or copy, and is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        allowed = PRIVATE_MODE
        if group_readable_if_root_owned and info.st_uid == 0:
            allowed |= stat.S_IRGRP
        if mode & ~allowed & 0o077:
            advice = "0600, or 0640 owned by root" if group_readable_if_root_owned else "0600"
            raise PermissionError(
                f"{path} ({what}) must not be readable by group or others (mode {mode:04o}; make it {advice})"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def tighten(path: Path, private_mode: int) -> None:
    """Take group and other bits off `path` if it has any (files and directories an older version
    left readable by others), with a warning naming the path. Missing paths are left alone."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        tightened = mode & private_mode
        os.chmod(path, tightened)
        log.warning("%s was mode %04o (readable by others); changed it to %04o", path, mode, tightened)


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
