"""The audit log: one JSON line per action — who did what to which secret or request id.

It never receives values, tokens or keys: its API takes only identities, ids and outcomes.

Fail closed (the default): `await record(...)` returns only once the line is in the file (one
write(2), not fsync'd), and raises Unavailable when it cannot be written, so no value is handed
out unaudited (a write that already reached the store is then reported as failed; clients retry
with an etag). Events no caller waits on (a request expiring) use `record_nowait`: the same
batch, but a failure can only be logged.

Lines are group-committed, adaptively. gRPC hands the server about one call per event-loop
iteration, so batching only what one iteration recorded writes one line at a time. Instead a
batch stays open for up to `group_window` seconds, and is written at the end of the iteration in
which it holds as many lines as the last window that ran its full length collected: that is how
many calls were arriving together. So a lone caller (the last full window held one line) pays no
wait, two callers wait only for each other, and under load dozens of calls share one write and
are resumed together, so their replies leave together too. Now and then a batch runs its full
window to learn the current concurrency again: every 32nd while calls arrive together, backing off
to every 1,024th while they arrive alone (a lone caller pays that window). `group_window=0`
writes each iteration's lines at its end. Measured in bench/README.md.

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

from .errors import Unavailable

log = logging.getLogger(__name__)


Entry = tuple[float | str, ...]


class AuditLog:
    FLUSH_SECONDS = 0.5

    LEARN_EVERY = 32  # batches between full windows while calls arrive together
    LEARN_AT_MOST_EVERY = 1024  # ... backing off to this while they arrive alone

    def __init__(self, path: Path | None, *, fail_closed: bool = True, group_window: float = 0.002) -> None:
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.fail_closed = fail_closed
        self._buffer: list[Entry] = []
        # Fail closed: the callers waiting for the lines now in _buffer; a batch write is
        # scheduled (_timer) exactly when _buffer is non-empty.
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._window = group_window
        self._timer: asyncio.TimerHandle | None = None
        self._batch_size = 1  # lines the last full window collected
        self._batches = 0
        self._next_learning = self.LEARN_EVERY  # the batch number that runs its full window
        self._last_learning = 0
        self._closing = False  # the batch is full: its write is scheduled for this iteration

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
    ) -> None:
        """Returns once the line is written (fail closed) or buffered; raises Unavailable if the
        line cannot be written."""
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
        entry = (time.time(), action, room, actor, outcome, "", "", "", request_id, target)
        if self.fail_closed:
            self._enqueue(entry)
        else:
            self._buffer.append(entry)

    def _enqueue(self, entry: Entry) -> None:
        self._buffer.append(entry)
        if self._closing:
            return
        learning = self._batches + 1 >= self._next_learning
        if self._window > 0 and (learning or len(self._buffer) < self._batch_size):
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._window, self._window_closed)
            return
        # Written at the end of this loop iteration: lines recorded meanwhile join it.
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        asyncio.get_running_loop().call_soon(self._write_batch)

    def _window_closed(self) -> None:
        self._timer = None
        self._batch_size = max(1, len(self._buffer))
        # A lone caller pays the whole window whenever it learns: learn less and less often
        # while every full window finds one line.
        interval = self.LEARN_EVERY
        if self._batch_size == 1:
            interval = min(2 * (self._next_learning - self._last_learning), self.LEARN_AT_MOST_EVERY)
        self._last_learning = self._batches + 1
        self._next_learning = self._last_learning + max(interval, self.LEARN_EVERY)
        self._write_batch()

    def _write_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = False
        entries, self._buffer = self._buffer, []
        waiters, self._waiters = self._waiters, []
        if not entries:
            return  # already written by close()
        self._batches += 1
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
            self._write_batch()
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
