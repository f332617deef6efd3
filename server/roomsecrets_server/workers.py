"""`serve --workers N`: N server processes on one port (SO_REUSEPORT), for more than one core.

A Python server runs its handlers on one core; N forked processes, each a full server, use N.
They are replicas of the shared PostgreSQL store (which carries requests and their answers
between them, as between replicas on several machines), so the embedded SQLite store, whose
request streams are process-local, cannot have workers (Settings.check).

The parent forks before it creates any gRPC or asyncio object (gRPC's C core does not survive a
fork), reserves the port first when the listen address asks for port 0 (a bound socket that never
listens, so it takes no connections), then only supervises: it reports ready once every worker
is, forwards SIGINT/SIGTERM, and if one worker dies it stops the others and fails, so that a
process manager restarts the whole set. The workers inherit what `serve` set up in the parent
before the fork (app.prepare_serve_process: umask, no core dumps, not dumpable, open-files limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

from .config import Settings
from .process import PR_SET_PDEATHSIG, prctl

log = logging.getLogger("roomsecrets")


def reserve_port(listen: str) -> tuple[str, socket.socket | None]:
    """The listen address with a concrete port, and the socket holding it (None if given)."""
    host, port = listen.rsplit(":", 1)
    if int(port) != 0:
        return listen, None
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host.strip("[]"), 0))
    return f"{host}:{holder.getsockname()[1]}", holder


def run_workers(
    settings: Settings,
    serve_one: Callable[[Settings, Callable[[], None]], None],
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Fork `settings.workers` processes running `serve_one(settings, ready)`; return the exit
    status for the parent. `ready()` is called by each worker once it serves; `on_ready(listen)`
    by the parent once all of them do (default: a line on stderr)."""
    listen, holder = reserve_port(settings.listen)
    settings = dataclasses.replace(settings, listen=listen)
    ready_read, ready_write = os.pipe()
    children: list[int] = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the worker
            _die_with_parent()
            os.close(ready_read)
            if holder is not None:
                holder.close()
            status = 1

            def ready() -> None:
                os.write(ready_write, b".")

            try:
                serve_one(settings, ready)
                status = 0
            except BaseException:  # a worker never returns into the parent's code
                log.exception("worker %d failed", index + 1)
            finally:
                os._exit(status)
        children.append(pid)
    os.close(ready_write)
    return _supervise(settings, children, ready_read, holder, on_ready)


def _supervise(
    settings: Settings,
    children: list[int],
    ready_read: int,
    holder: socket.socket | None,
    on_ready: Callable[[str], None] | None,
) -> int:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        _signal_all(children, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready = 0
    while ready < len(children) and not stopping:
        chunk = os.read(ready_read, len(children) - ready)  # b"" once every worker is gone
        if not chunk:
            break
        ready += len(chunk)
    os.close(ready_read)
    if holder is not None:
        holder.close()  # every worker listens on the port now
    if ready == len(children) and on_ready is not None:
        on_ready(settings.listen)
    elif ready == len(children):
        print(
            f"roomsecrets: {len(children)} workers serving on {settings.listen} (PostgreSQL store, "
            f"data dir {settings.data_dir})",
            file=sys.stderr,
            flush=True,
        )
    status = 0
    remaining = set(children)
    while remaining:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        remaining.discard(pid)
        if not stopping:
            log.error(
                "worker %d exited (status %d); stopping the others", pid, os.waitstatus_to_exitcode(code)
            )
            stopping = True
            status = 1
            _signal_all(list(remaining), signal.SIGTERM)
        elif os.waitstatus_to_exitcode(code) != 0:
            status = 1
    return status


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the parent dies, even by SIGKILL (no orphaned workers)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
