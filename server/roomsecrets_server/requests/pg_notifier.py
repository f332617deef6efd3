"""The Notifier for several replicas on one PostgreSQL database.

Everything a replica would tell its own streams and waiters it tells locally at once (a
LocalNotifier does the dispatch) and also NOTIFYs the other replicas on one channel; each replica
LISTENs and replays what the others said. Payloads carry ids only (never values, never reasons):
a replica that has a stream to push to reads the request from the store, which is the truth.

Presence ("is bob listening anywhere?") is a row per (room, identity, replica) in `listeners`,
kept while the replica has a stream open for them. Replicas heartbeat in `replicas`; rows of a
replica that stopped heartbeating (killed) stop counting after `replica_ttl` and are swept later.
Times are the database's clock, so replicas' clocks need not agree.

After the LISTEN connection is lost and re-established (database restart), notifications sent in
between are gone, so the replica resynchronises: every local waiter re-reads its request, and
every local stream gets the pending requests it may have missed (streams drop duplicates).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager, suppress
from typing import Any

import psycopg

from ..store.postgres import CONNECTION_ERRORS, PostgresStore
from .notifier import Event, LocalNotifier, RequestClosed, RequestOpened, RequestWatch, Subscription

log = logging.getLogger(__name__)

CHANNEL = "roomsecrets_events"

_LIVE_REPLICA = "r.heartbeat > extract(epoch FROM clock_timestamp()) - %s"


class PgNotifier:
    def __init__(self, store: PostgresStore, *, heartbeat: float = 2.0, replica_ttl: float = 10.0) -> None:
        self._store = store
        self._heartbeat = heartbeat
        self._replica_ttl = replica_ttl
        self.replica = uuid.uuid4().hex
        self._local = LocalNotifier()
        self._local.on_stopped_listening(self._last_local_stream_ended)
        self._stopped_listening: list[Callable[[str, str], None]] = []
        self._listen_waiters: dict[tuple[str, str], set[asyncio.Event]] = defaultdict(set)
        # One lock per (room, identity), held by its users: presence writes for one identity are
        # serialised, different identities' run concurrently.
        self._presence_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listening = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._beat()
        self._spawn(self._listen_forever())
        self._spawn(self._send_forever())
        self._spawn(self._heartbeat_forever())
        try:  # streams opened before LISTEN is up would miss the other replicas' events
            await asyncio.wait_for(self._listening.wait(), 10.0)
        except TimeoutError:
            raise OSError("could not LISTEN on the PostgreSQL database") from None

    async def close(self) -> None:
        await self._local.close()
        for _ in range(20):  # what was said before shutdown should still reach the others
            if self._outbox.empty():
                break
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:  # leave at once rather than after replica_ttl; the rows cascade
            await self._store.execute("DELETE FROM replicas WHERE replica=%s", (self.replica,))
        except Exception:
            log.warning("could not remove this replica's presence rows; they expire by themselves")

    # -- streams and presence -----------------------------------------------------------------
    async def subscribe(self, room: str, identity: str) -> Subscription:
        subscription = self._local.subscribe_now(room, identity)  # first, so nothing slips by
        try:
            await self._sync_presence(room, identity)
        except BaseException:
            self._local.unsubscribe(subscription)
            raise
        self._wake_listen_waiters(room, identity)
        self._notify({"k": "listening", "room": room, "who": identity})
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._local.unsubscribe(subscription)  # the last one calls _last_local_stream_ended

    def _last_local_stream_ended(self, room: str, identity: str) -> None:
        async def leave() -> None:
            try:
                await self._sync_presence(room, identity)
            except Exception:
                log.warning("could not update presence; the row expires with this replica's heartbeat")
            for callback in self._stopped_listening:
                callback(room, identity)

        self._spawn(leave())

    async def _sync_presence(self, room: str, identity: str) -> None:
        """Make the presence row match whether this replica has a stream for (room, identity);
        serialised, so a quick unsubscribe + subscribe cannot end with the row deleted."""
        key = (room, identity)
        lock, users = self._presence_locks.get(key, (asyncio.Lock(), 0))
        self._presence_locks[key] = (lock, users + 1)
        try:
            async with lock:
                await self._write_presence(room, identity)
        finally:
            lock, users = self._presence_locks[key]
            if users == 1:
                del self._presence_locks[key]
            else:
                self._presence_locks[key] = (lock, users - 1)

    async def _write_presence(self, room: str, identity: str) -> None:
        if self._local.listening(room, identity):
            await self._store.execute(
                "INSERT INTO listeners (replica, room, identity) VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                (self.replica, room, identity),
            )
        else:
            await self._store.execute(
                "DELETE FROM listeners WHERE replica=%s AND room=%s AND identity=%s",
                (self.replica, room, identity),
            )

    def listening(self, room: str, identity: str) -> bool:
        """Listening on this replica (the question across replicas is wait_listening)."""
        return self._local.listening(room, identity)

    def streams(self, room: str, identity: str) -> int:
        return self._local.streams(room, identity)

    async def _listening_anywhere(self, room: str, identity: str) -> bool:
        if self._local.listening(room, identity):
            return True
        row = await self._store.query_one(
            "SELECT 1 FROM listeners l JOIN replicas r USING (replica) "
            f"WHERE l.room=%s AND l.identity=%s AND {_LIVE_REPLICA} LIMIT 1",
            (room, identity, self._replica_ttl),
        )
        return row is not None

    async def wait_listening(self, room: str, identity: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        waiter = asyncio.Event()
        self._listen_waiters[(room, identity)].add(waiter)  # before looking: no wake-up is missed
        try:
            while True:
                if await self._listening_anywhere(room, identity):
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                with suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), remaining)
                waiter.clear()
        finally:
            waiters = self._listen_waiters.get((room, identity))
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._listen_waiters[(room, identity)]

    def _wake_listen_waiters(self, room: str, identity: str) -> None:
        for waiter in self._listen_waiters.get((room, identity), ()):
            waiter.set()

    def on_stopped_listening(self, callback: Callable[[str, str], None]) -> None:
        self._stopped_listening.append(callback)

    # -- events -------------------------------------------------------------------------------
    def publish(self, room: str, identity: str, event: Event) -> None:
        self._local.publish(room, identity, event)
        kind = "opened" if isinstance(event, RequestOpened) else "closed"
        request_id = event.record.request_id if isinstance(event, RequestOpened) else event.request_id
        self._notify({"k": kind, "room": room, "to": identity, "id": request_id})

    def watch_request(self, request_id: str) -> AbstractContextManager[RequestWatch]:
        return self._local.watch_request(request_id)

    def request_changed(self, request_id: str) -> None:
        self._local.request_changed(request_id)
        self._notify({"k": "changed", "id": request_id})

    def _notify(self, message: dict[str, str]) -> None:
        message["r"] = self.replica
        self._outbox.put_nowait(json.dumps(message, separators=(",", ":"), ensure_ascii=False))

    async def _deliver(self, payload: str) -> None:
        message = json.loads(payload)
        if message.get("r") == self.replica:
            return  # told locally already
        kind = message.get("k")
        if kind == "changed":
            self._local.request_changed(message["id"])
        elif kind == "listening":
            self._wake_listen_waiters(message["room"], message["who"])
        elif kind in ("opened", "closed") and self._local.listening(message["room"], message["to"]):
            record = await self._store.get_request(message["id"])
            if record is None:
                return
            event: Event = (
                RequestOpened(record)
                if kind == "opened"
                else RequestClosed(record.request_id, record.state, record.reason)
            )
            self._local.publish(message["room"], message["to"], event)

    async def _resync(self) -> None:
        """Catch up on whatever was NOTIFYed while the LISTEN connection was down."""
        for request_id in self._local.watched_requests():
            self._local.request_changed(request_id)
        for room, identity in self._local.listeners():
            self._wake_listen_waiters(room, identity)
            for record in await self._store.pending_requests_for(room, identity, 0.0):
                self._local.publish(room, identity, RequestOpened(record))

    # -- background tasks ---------------------------------------------------------------------
    async def _listen_forever(self) -> None:
        delay, connected_before = 0.1, False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._store.url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    if connected_before:
                        log.info("LISTEN re-established; resynchronising")
                        await self._resync()
                    connected_before, delay = True, 0.1
                    async for notification in conn.notifies():
                        try:
                            await self._deliver(notification.payload)
                        except CONNECTION_ERRORS:
                            raise
                        except Exception:
                            log.exception("could not deliver a notification")
            except CONNECTION_ERRORS as exc:
                log.warning("LISTEN connection lost (%s); retrying in %.1fs", type(exc).__name__, delay)
            except Exception:  # e.g. an Unavailable from a store read during resync
                log.warning("LISTEN loop failed; retrying in %.1fs", delay, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _send_forever(self) -> None:
        """One connection sends every NOTIFY in order: a request's "closed" never overtakes its
        "opened" (PostgreSQL delivers one session's notifications in commit order)."""
        delay = 0.1
        pending: list[str] = []
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._store.url, autocommit=True)
                async with conn:
                    delay = 0.1
                    while True:
                        if not pending:
                            pending.append(await self._outbox.get())
                        while not self._outbox.empty() and len(pending) < 100:
                            pending.append(self._outbox.get_nowait())
                        try:
                            async with conn.transaction():  # one round of notifies, one commit
                                for payload in pending:
                                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                        except CONNECTION_ERRORS:
                            raise
                        except psycopg.Error:  # one payload PostgreSQL refuses must not stop the rest
                            await self._notify_one_by_one(conn, pending)
                        pending.clear()
            except CONNECTION_ERRORS as exc:
                log.warning("NOTIFY connection lost (%s); retrying in %.1fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _notify_one_by_one(self, conn: psycopg.AsyncConnection[Any], payloads: list[str]) -> None:
        for payload in payloads:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            except CONNECTION_ERRORS:
                raise
            except psycopg.Error as exc:
                # Other replicas' waiters still re-read their request every few seconds.
                log.error("could not NOTIFY an event (%s); the other replicas miss it", type(exc).__name__)

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            try:
                await self._beat()
            except Exception as exc:
                log.warning("replica heartbeat failed (%s)", type(exc).__name__)

    async def _beat(self) -> None:
        row = await self._store.query_one(
            "INSERT INTO replicas (replica, heartbeat) VALUES (%s, extract(epoch FROM clock_timestamp())) "
            "ON CONFLICT (replica) DO UPDATE SET heartbeat=excluded.heartbeat RETURNING (xmax = 0)",
            (self.replica,),
        )
        if row and row[0]:  # (re)inserted: swept while unreachable, so our presence rows went too
            for room, identity in self._local.listeners():
                await self._sync_presence(room, identity)
        # Forget replicas gone for long (their listeners cascade); any replica may do it.
        await self._store.execute(
            "DELETE FROM replicas r WHERE NOT (" + _LIVE_REPLICA + ")", (10 * self._replica_ttl,)
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
