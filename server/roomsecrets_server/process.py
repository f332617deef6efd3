"""What the commands that hold keys (`serve`, `token`, `rewrap`) do to their own process: files
they create are the owner's alone (umask 077), a crash writes no memory image (keys, values) to
disk and other processes of the same user cannot read their memory (RLIMIT_CORE 0, not dumpable),
and `serve` raises its open-files soft limit to the hard limit.

Only those commands call this, never RoomSecretsServer: the test suite runs servers in-process
and must keep its own umask, dumpability and limits. prctl is Linux only; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Any

log = logging.getLogger("roomsecrets")

PRIVATE_UMASK = 0o077
# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int = 0) -> int | None:
    """prctl(2) on Linux: its result, or None where there is no prctl or it failed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        result = int(_libc().prctl(option, arg, 0, 0, 0))
    except (OSError, AttributeError):
        return None
    return None if result < 0 else result


def protect_process() -> None:
    """umask 077 and no core dumps, for any command that holds key material."""
    os.umask(PRIVATE_UMASK)
    _no_core_dumps()


def _no_core_dumps() -> None:
    if sys.platform == "win32":  # no core dumps to turn off
        return
    import resource  # noqa: PLC0415 - POSIX only

    # Soft and hard: code in this process cannot turn them back on either.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Not dumpable: no core even where the limit is ignored (a core_pattern pipe), and no ptrace
    # or /proc/<pid>/mem reads by other processes of the same user. Inherited by forked workers.
    if prctl(PR_SET_DUMPABLE, 0) is None or prctl(PR_GET_DUMPABLE) != 0:
        if sys.platform.startswith("linux"):
            log.warning("could not make the process non-dumpable; core dumps are off (RLIMIT_CORE 0)")
        return
    log.info("core dumps off (RLIMIT_CORE 0) and the process is not dumpable")


def raise_open_files_limit() -> int | None:
    """Raise the open-files soft limit (RLIMIT_NOFILE) to the hard limit, so a common soft limit
    of 1,024 is not what many connections run into; logs and returns the soft limit in force
    (None where there is none)."""
    if sys.platform == "win32":
        return None
    import resource  # noqa: PLC0415 - POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:  # e.g. macOS refuses an unlimited soft limit
            log.warning("open files limit stays %d (could not raise it to %d: %s)", soft, hard, error)
            return soft
        log.info("open files limit (RLIMIT_NOFILE) raised from %d to the hard limit %d", soft, hard)
        return hard
    log.info("open files limit (RLIMIT_NOFILE) is %d (the hard limit)", soft)
    return soft
