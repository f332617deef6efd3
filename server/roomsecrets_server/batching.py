"""When to close a batch of work that callers wait on: the adaptive group window shared by the
audit log (one write(2) per batch of lines) and the SQLite writer (one commit per batch of
writes).

gRPC hands the server about one call per event-loop iteration, so batching only what one
iteration produced gives batches of one. Instead a batch stays open for up to `window` seconds,
and closes at the end of the iteration in which it holds as many items as the last window that
ran its full length collected: that is how many calls were arriving together. So a lone caller
(the last full window held one item) pays no wait, two callers wait only for each other, and
under load dozens of calls share one write and are resumed together, so their replies leave
together too. Now and then a batch runs its full window to learn the current concurrency again:
every 32nd while calls arrive together, backing off to every 1,024th while they arrive alone (a
lone caller pays that window). `window=0` closes each iteration's batch at its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class GroupWindow:
    """Calls `flush()` when the open batch should be written. The owner keeps the items: it calls
    `added()` after putting one in the batch, and `flush_now()` to write at once (on close)."""

    LEARN_EVERY = 32  # batches between full windows while calls arrive together
    LEARN_AT_MOST_EVERY = 1024  # ... backing off to this while they arrive alone

    def __init__(self, window: float, flush: Callable[[], None]) -> None:
        if window < 0:
            raise ValueError("a group window cannot be negative")
        self._window = window
        self._flush = flush
        self._pending = 0  # items in the open batch; a flush is scheduled exactly when > 0
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # the batch is full: its flush is scheduled for this iteration
        self._batch_size = 1  # items the last full window collected
        self._batches = 0
        self._next_learning = self.LEARN_EVERY  # the batch number that runs its full window
        self._last_learning = 0

    def added(self) -> None:
        self._pending += 1
        if self._closing:
            return
        learning = self._batches + 1 >= self._next_learning
        if self._window > 0 and (learning or self._pending < self._batch_size):
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._window, self._window_closed)
            return
        # Flushed at the end of this loop iteration: items added meanwhile join it.
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = False
        if not self._pending:
            return  # already flushed (by close, say)
        self._pending = 0
        self._batches += 1
        self._flush()

    def _window_closed(self) -> None:
        self._timer = None
        self._batch_size = max(1, self._pending)
        # A lone caller pays the whole window whenever it learns: learn less and less often
        # while every full window finds one item.
        interval = self.LEARN_EVERY
        if self._batch_size == 1:
            interval = min(2 * (self._next_learning - self._last_learning), self.LEARN_AT_MOST_EVERY)
        self._last_learning = self._batches + 1
        self._next_learning = self._last_learning + max(interval, self.LEARN_EVERY)
        self.flush_now()
