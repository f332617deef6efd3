"""Wake-ups and presence for request flows.

The store is the source of truth for request state; the notifier only says "look again" and
who is listening. LocalNotifier does this inside one process; PgNotifier (pg_notifier.py) relays
the same calls between replicas sharing a PostgreSQL database. The Notifier protocol below is the
whole contract.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from ..store import RequestRecord, RequestState


@dataclass(frozen=True, slots=True)
class RequestOpened:
    record: RequestRecord


@dataclass(frozen=True, slots=True)
class RequestClosed:
    request_id: str
    state: RequestState
    reason: str


Event = RequestOpened | RequestClosed


class Subscription:
    """Events for one WatchRequests stream. Iteration ends when the notifier closes, or when the
    reader fell MAX_UNDELIVERED events behind (`overflowed`): a client that stops reading must not
    make the server hold its events without bound. Nothing is lost by ending the stream: a new
    WatchRequests starts with every request still pending."""

    MAX_UNDELIVERED = 1024
    # Thousands of these sit idle at once (one per open stream), so they are lean: no queue until
    # an event comes (an empty deque is ~630 B) and, only while the stream's reader waits, one
    # future (an asyncio.Queue would cost ~1.5 KiB more).
    __slots__ = ("_events", "_wakeup", "identity", "overflowed", "room")

    def __init__(self, room: str, identity: str) -> None:
        self.room = room
        self.identity = identity
        self.overflowed = False
        self._events: deque[Event | None] | None = None
        self._wakeup: asyncio.Future[None] | None = None

    @property
    def queued(self) -> int:
        """Events (and the end-of-stream marker) pushed but not yet read."""
        return len(self._events) if self._events is not None else 0

    def push(self, event: Event | None) -> None:
        if self.overflowed:
            return
        if self._events is None:
            self._events = deque()
        if event is not None and len(self._events) >= self.MAX_UNDELIVERED:
            self.overflowed = True
            self._events.clear()  # free the backlog now, not when the stream ends
            event = None
        self._events.append(event)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            while not self._events:
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
            event = self._events.popleft()
            if not self._events:
                self._events = None  # idle again: give the deque's block back
            if event is None:
                return
            yield event


class DeliveredRequests:
    """The requests a stream has delivered that are still open, so none reaches the participant
    twice: a request pending when the stream starts may also arrive as an event, and a PgNotifier
    resync republishes every pending request. An id leaves when the request's RequestClosed
    passes, so a stream that lives for months holds only what is still open. (A resync racing a
    close can still resend a request just closed; answering it fails REQUEST_NOT_PENDING, as any
    late answer does.)"""

    __slots__ = ("_open",)

    def __init__(self, pending: Iterable[str]) -> None:
        self._open = set(pending)

    def first_time(self, event: Event) -> bool:
        """Whether `event` should go out on the stream (and remember what it opens or closes)."""
        if isinstance(event, RequestClosed):
            self._open.discard(event.request_id)
            return True
        request_id = event.record.request_id
        if request_id in self._open:
            return False
        self._open.add(request_id)
        return True

    def __len__(self) -> int:
        return len(self._open)


class RequestWatch:
    """Wakes a waiter whenever its request changes; registered before the waiter reads state,
    so no change between read and wait is missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return
        self._event.clear()


class Notifier(Protocol):
    async def start(self) -> None: ...
    async def subscribe(self, room: str, identity: str) -> Subscription:
        """Register a stream; once this returns, requesters anywhere see `identity` listening."""
        ...

    def unsubscribe(self, subscription: Subscription) -> None: ...
    def listening(self, room: str, identity: str) -> bool: ...
    def streams(self, room: str, identity: str) -> int:
        """Streams of (room, identity) open on this process (the quota on them is per process)."""
        ...

    async def wait_listening(self, room: str, identity: str, timeout: float) -> bool: ...
    def publish(self, room: str, identity: str, event: Event) -> None: ...
    def watch_request(self, request_id: str) -> AbstractContextManager[RequestWatch]: ...
    def request_changed(self, request_id: str) -> None: ...
    def on_stopped_listening(self, callback: Callable[[str, str], None]) -> None: ...
    async def close(self) -> None:
        """End every stream (graceful shutdown)."""
        ...


class LocalNotifier:
    def __init__(self) -> None:
        self._subscriptions: dict[tuple[str, str], set[Subscription]] = defaultdict(set)
        self._listen_waiters: dict[tuple[str, str], set[asyncio.Event]] = defaultdict(set)
        self._watches: dict[str, set[RequestWatch]] = defaultdict(set)
        self._stopped_listening: list[Callable[[str, str], None]] = []
        self._closed = False

    async def start(self) -> None:
        pass

    async def subscribe(self, room: str, identity: str) -> Subscription:
        return self.subscribe_now(room, identity)

    def subscribe_now(self, room: str, identity: str) -> Subscription:
        subscription = Subscription(room, identity)
        if self._closed:
            subscription.push(None)
            return subscription
        self._subscriptions[(room, identity)].add(subscription)
        for waiter in self._listen_waiters.pop((room, identity), set()):
            waiter.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        key = (subscription.room, subscription.identity)
        subs = self._subscriptions.get(key)
        if subs is None:
            return
        subs.discard(subscription)
        if not subs:
            del self._subscriptions[key]
            for callback in self._stopped_listening:
                callback(*key)

    def listening(self, room: str, identity: str) -> bool:
        return bool(self._subscriptions.get((room, identity)))

    def streams(self, room: str, identity: str) -> int:
        return len(self._subscriptions.get((room, identity), ()))

    def listeners(self) -> list[tuple[str, str]]:
        """(room, identity) of every open stream."""
        return list(self._subscriptions)

    def watched_requests(self) -> list[str]:
        """Ids of the requests someone here waits on."""
        return list(self._watches)

    async def wait_listening(self, room: str, identity: str, timeout: float) -> bool:
        if self.listening(room, identity):
            return True
        if timeout <= 0:
            return False
        waiter = asyncio.Event()
        self._listen_waiters[(room, identity)].add(waiter)
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._listen_waiters.get((room, identity))
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._listen_waiters[(room, identity)]
        return self.listening(room, identity)

    def publish(self, room: str, identity: str, event: Event) -> None:
        for subscription in self._subscriptions.get((room, identity), ()):
            subscription.push(event)

    @contextmanager
    def watch_request(self, request_id: str) -> Iterator[RequestWatch]:
        watch = RequestWatch()
        self._watches[request_id].add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(request_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[request_id]

    def request_changed(self, request_id: str) -> None:
        for watch in self._watches.get(request_id, ()):
            watch.notify()

    def on_stopped_listening(self, callback: Callable[[str, str], None]) -> None:
        self._stopped_listening.append(callback)

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        self._closed = True
        for subs in self._subscriptions.values():
            for subscription in subs:
                subscription.push(None)
        self._subscriptions.clear()
