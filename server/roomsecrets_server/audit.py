"""The audit log: one JSON line per action — who did what to which secret or request id.

It never receives values, tokens or keys: its API takes only identities, ids and outcomes.

Fail closed (the default): `await record(...)` returns only once the line is in the file (one
write(2), not fsync'd), and raises Unavailable when it cannot be written, so no value is handed
out unaudited (a write that already reached the store is then reported as failed; clients retry
with an etag). Events no caller waits on (a request expiring) use `record_nowait`: the same
batch, but a failure can only be logged.

Lines are group-committed, adaptively (`batching.GroupWindow`, shared with the SQLite writer):
under load dozens of calls share one write and are resumed together, while a lone caller pays no
wait. `group_window=0` writes each iteration's lines at its end. Measured in bench/README.md.

Buffered (`--audit-buffered`): lines are kept as tuples and written every half second, which costs
the hot path a list append, at the price of losing up to half a second of lines in a crash and of
calls succeeding while the log cannot be written (logged as an error).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from json.encoder import encode_basestring_ascii as _escape
from pathlib import Path

from .batching import GroupWindow
from .errors import Unavailable

log = logging.getLogger(__name__)


Entry = tuple[float | str, ...]


class AuditLog:
    FLUSH_SECONDS = 0.5

    def __init__(self, path: Path | None, *, fail_closed: bool = True, group_window: float = 0.002) -> None:
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.fail_closed = fail_closed
        self._buffer: list[Entry] = []
        # Fail closed: the callers waiting for the lines now in _buffer; the group window
        # schedules a batch write exactly when _buffer is non-empty.
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._group = GroupWindow(group_window, self._write_batch)

    async def record(
        self,
        action: str,
        *,
        room: str,
        actor: str,
        outcome: str = "ok",
        secret_id: str = "",
        owner: str = "",
        delegated_to: str = "",
        request_id: str = "",
        target: str = "",
        authority: str = "",
    ) -> None:
        """Returns once the line is written (fail closed) or buffered; raises Unavailable if the
        line cannot be written. `authority`: on whose authority a value was released or deleted
        (auth/authority.py), when that is not simply the actor as owner."""
        if self._fd is None:
            return
        entry = (
            time.time(),
            action,
            room,
            actor,
            outcome,
            secret_id,
            owner,
            delegated_to,
            request_id,
            target,
            authority,
        )
        if not self.fail_closed:
            self._buffer.append(entry)
            return
        written = asyncio.get_running_loop().create_future()
        self._waiters.append(written)
        self._enqueue(entry)
        # A cancelled caller cancels only its own future: the line is still written.
        await written

    def record_nowait(
        self, action: str, *, room: str, actor: str, outcome: str, request_id: str = "", target: str = ""
    ) -> None:
        """For events no caller waits on: the line joins the next write; a failure is logged."""
        if self._fd is None:
            return
        entry = (time.time(), action, room, actor, outcome, "", "", "", request_id, target, "")
        if self.fail_closed:
            self._enqueue(entry)
        else:
            self._buffer.append(entry)

    def _enqueue(self, entry: Entry) -> None:
        self._buffer.append(entry)
        self._group.added()

    def _write_batch(self) -> None:
        entries, self._buffer = self._buffer, []
        waiters, self._waiters = self._waiters, []
        try:
            self._append("".join(_line(entry) for entry in entries).encode())
        except OSError as exc:
            log.error(
                "audit log write failed (%s): refusing %d calls",
                exc.strerror or type(exc).__name__,
                len(waiters),
            )
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(
                        Unavailable(
                            "the audit log cannot be written; refusing to proceed unaudited",
                            reason="AUDIT_UNAVAILABLE",
                        )
                    )
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            raise OSError(0, "audit log closed")
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def start(self) -> None:
        if self._fd is not None and self._task is None and not self.fail_closed:
            self._task = asyncio.get_running_loop().create_task(self._flush_periodically())

    def flush(self) -> None:
        if self.fail_closed:
            self._group.flush_now()
            return
        if self._fd is not None and self._buffer:
            entries, self._buffer = self._buffer, []
            try:
                self._append("".join(_line(entry) for entry in entries).encode())
            except OSError as exc:
                log.error("audit log write failed (%s): %d entries lost", exc.strerror, len(entries))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_SECONDS)
            self.flush()


_FIELDS = (
    "ts",
    "action",
    "room",
    "actor",
    "outcome",
    "secret_id",
    "owner",
    "delegated_to",
    "request_id",
    "target",
    "authority",
)


_ALWAYS = frozenset(("action", "room", "actor", "outcome"))


def _line(entry: Entry) -> str:
    # Built by hand with json's own C string escaper (ASCII-only output, like json.dumps): the
    # same JSON object as json.dumps of a dict, at half the cost.
    out = ['{"ts":', repr(round(float(entry[0]), 6))]
    for name, value in zip(_FIELDS[1:], entry[1:], strict=True):
        if value or name in _ALWAYS:
            out.append(f',"{name}":{_escape(str(value))}')
    out.append("}\n")
    return "".join(out)
