"""Request -> provide | reject: the stateful, durable flow between two participants.

A asks B (`request_secret`): a pending request (id, from, to, url, type, delegate_to, deadline)
is stored, then pushed on B's WatchRequests stream(s). B answers with `provide_secret` (the value
is stored encrypted as B's *answer*, keyed by (type, name=url), delegated to `delegate_to`, in the
same transaction that closes the request) or `reject_secret`. Exactly one answer wins. Answers are
their own kind (SecretKind.ANSWER): they never replace a secret B stored with SetSecret, and a
later identical request by the delegate is answered from them without a prompt.

Nothing waits forever: A's wait is bounded by the timeout and its call deadline; a cancelled
call cancels the request; a request to someone with no open stream fails fast (after a short
grace); when B's last stream closes and B does not come back within the grace, B's pending
requests are cancelled; a sweeper expires whatever is left past its deadline (e.g. after a
restart). Store first, then notify: the store is the truth, notifications only wake readers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from .. import validate
from ..audit import AuditLog
from ..auth.principal import Principal
from ..errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    RequestRejected,
    RequestTimedOut,
    ResourceExhausted,
    Unavailable,
    audited,
)
from ..quotas import QuotaExceeded, Quotas
from ..secrets.service import SecretsService, SecretValue
from ..store import (
    ABSENT,
    ANY,
    RequestRecord,
    RequestState,
    SecretKey,
    SecretKind,
    SecretRecord,
    Store,
    WriteCondition,
)
from .notifier import DeliveredRequests, Event, Notifier, RequestClosed, RequestOpened

T = TypeVar("T")

RECHECK_SECONDS = 5.0

log = logging.getLogger(__name__)

SECRET = "secret"  # noqa: S105 - a request kind, not a credential
OAUTH = "oauth"


class WatchReady:
    """Marks the end of the replay on a WatchRequests stream."""

    def __init__(self, pending: int) -> None:
        self.pending = pending


class RequestService:
    def __init__(
        self,
        store: Store,
        secrets: SecretsService,
        notifier: Notifier,
        audit: AuditLog,
        *,
        listener_grace: float,
        sweep_interval: float = 1.0,
        quotas: Quotas,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._notifier = notifier
        self._audit = audit
        self._quotas = quotas
        self.listener_grace = listener_grace
        self._sweep_interval = sweep_interval
        self._waiters: Counter[str] = Counter()  # local requesters waiting on each request
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set on shutdown: calls and streams ending because the server stops must not cancel
        # their requests, which stay pending in the store for the next start.
        self._stopping = False
        notifier.on_stopped_listening(self._stopped_listening)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._notifier.start()
        self._spawn(self._sweep_forever())

    async def stop(self) -> None:
        self._stopping = True
        await self._notifier.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- asking -------------------------------------------------------------------------------
    async def request_secret(
        self,
        p: Principal,
        *,
        target: str,
        url: str,
        type_: str,
        timeout: int,
        delegate_to: str,
        call_time_remaining: float | None,
    ) -> tuple[str, SecretValue]:
        p.require_secrets()
        target = validate.identity(target, "from_participant_id", required=True)
        url = validate.text(url, "url", validate.MAX_URL, required=True)
        type_ = validate.secret_type(type_)
        timeout = validate.timeout(timeout)
        delegate_to = validate.identity(delegate_to, "delegate_to")

        # Provided earlier and delegated to the caller: answer from storage, without a prompt
        # (DeleteRequestedSecret forces a new one).
        if delegate_to and delegate_to == p.identity:
            found = await self._store.find_secrets(p.room, target, delegate_to, SecretKind.ANSWER, type_, url)
            if found:
                return "", await self._secrets.release(p, found[0], "request_secret", outcome="from_store")

        wait = float(timeout) if call_time_remaining is None else min(float(timeout), call_time_remaining)
        deadline = time.time() + wait  # fixed now: waiting for a listener counts against it
        record = await self._store.find_pending_request(
            p.room, p.identity, target, SECRET, url, type_, delegate_to
        )
        if record is None:
            record = await self.open_request(p, SECRET, target, url, type_, delegate_to, deadline)
        else:  # the same question is already pending (e.g. asked again after a restart): join it
            await self._audit.record(
                "request_secret",
                room=p.room,
                actor=p.identity,
                outcome="joined",
                request_id=record.request_id,
                target=target,
            )
        closed = await self.await_answer(record, deadline)
        return record.request_id, await self._provided_value(closed)

    async def open_request(
        self,
        p: Principal,
        kind: str,
        target: str,
        url: str,
        type_: str,
        delegate_to: str,
        deadline: float,
        *,
        params: bytes = b"",
        request_id: str = "",
    ) -> RequestRecord:
        """Store a pending request and push it to `target`, once it is listening."""
        action = f"request_{kind}"
        if not await self._notifier.wait_listening(
            p.room, target, min(self.listener_grace, deadline - time.time())
        ):
            await self._audit.record(
                action, room=p.room, actor=p.identity, outcome="not_listening", target=target
            )
            raise audited(
                FailedPrecondition(
                    f"participant {target!r} is not listening for requests (no open WatchRequests stream)",
                    reason="NOT_LISTENING",
                )
            )
        now = time.time()
        record = RequestRecord(
            request_id=request_id or uuid.uuid4().hex,
            room=p.room,
            kind=kind,
            requested_by=p.identity,
            target=target,
            url=url,
            type=type_,
            delegate_to=delegate_to,
            state=RequestState.PENDING,
            reason="",
            created=now,
            deadline=deadline,
            params=params,
        )
        created = self._spawn(self._create_and_publish(record))
        try:
            await asyncio.shield(created)
            await self._audit.record(
                action,
                room=p.room,
                actor=p.identity,
                outcome="pending",
                request_id=record.request_id,
                target=target,
            )
        except QuotaExceeded as refused:  # the store refused it (quotas.py): nothing stored or pushed
            await self._audit.record(
                action, room=p.room, actor=p.identity, outcome="quota_exceeded", target=target
            )
            raise audited(refused) from None
        except BaseException:
            # The requester went away while the request was being stored, or its audit line
            # could not be written: once it is stored, cancel it, so the asked participant is not
            # left holding a question nobody awaits.
            if not self._stopping:
                self._spawn(self._cancel_once_created(created, record))
            raise
        return record

    async def _create_and_publish(self, record: RequestRecord) -> None:
        await self._store.create_request(record)
        self._notifier.publish(record.room, record.target, RequestOpened(record))

    async def _cancel_once_created(self, created: asyncio.Task[None], record: RequestRecord) -> None:
        try:
            await created
        except Exception:
            return  # never stored (the requester was told why): nothing to cancel
        await self.close(record, RequestState.CANCELLED, "requester cancelled")

    async def await_answer(self, record: RequestRecord, my_deadline: float) -> RequestRecord:
        """Wait until the request is closed (by an answer, expiry or cancellation); bounded by
        `my_deadline`. A cancelled wait cancels the request unless someone else waits on it."""
        request_id = record.request_id
        self._waiters[request_id] += 1
        try:
            with self._notifier.watch_request(request_id) as watch:
                while True:
                    current = await self._store.get_request(request_id)
                    if current is None:
                        raise NotFound(f"request {request_id} not found")
                    if current.state is not RequestState.PENDING:
                        return current
                    now = time.time()
                    if now >= my_deadline:
                        if now >= current.deadline - 0.001 and not await self.close(
                            current, RequestState.EXPIRED, "timed out"
                        ):
                            continue  # answered at the last moment: use the answer
                        raise RequestTimedOut(
                            f"request {request_id} to {current.target!r} timed out", reason="REQUEST_EXPIRED"
                        )
                    # Woken by the notifier; the re-read every RECHECK_SECONDS is a safety net
                    # for a wake-up lost between replicas (e.g. the database restarting).
                    await watch.wait(min(my_deadline, current.deadline, now + RECHECK_SECONDS) - now)
        except asyncio.CancelledError:
            if self._waiters[request_id] == 1 and not self._stopping:  # nobody else is waiting here
                expired = time.time() >= my_deadline - 0.05
                state = RequestState.EXPIRED if expired else RequestState.CANCELLED
                self._spawn(self.close(record, state, "timed out" if expired else "requester cancelled"))
            raise
        finally:
            self._waiters[request_id] -= 1
            if self._waiters[request_id] <= 0:
                del self._waiters[request_id]

    async def _provided_value(self, closed: RequestRecord) -> SecretValue:
        if closed.state is RequestState.PROVIDED:
            key = SecretKey(closed.room, closed.target, closed.delegate_to, closed.secret_id)
            stored = await self._store.get_secret(key)
            if stored is None:
                raise FailedPrecondition(f"the secret provided for request {closed.request_id} was deleted")
            return SecretValue(stored, self._secrets.open(stored))
        raise self.outcome_error(closed)

    @staticmethod
    def outcome_error(closed: RequestRecord) -> Exception:
        if closed.state is RequestState.REJECTED:
            return RequestRejected(f"{closed.target!r} rejected request {closed.request_id}: {closed.reason}")
        if closed.state is RequestState.EXPIRED:
            return RequestTimedOut(f"request {closed.request_id} to {closed.target!r} timed out")
        return FailedPrecondition(
            f"request {closed.request_id} was cancelled: {closed.reason}", reason="REQUEST_CANCELLED"
        )

    # -- answering ----------------------------------------------------------------------------
    async def provide_secret(
        self, p: Principal, *, request_id: str, data: bytes, data_crc32c: int | None
    ) -> None:
        p.require_secrets()
        validate.secret_id(request_id, "request_id")
        self._secrets.check_data(data, data_crc32c)
        record = await self.answerable(p, request_id, SECRET)
        for _ in range(4):
            found = await self._store.find_secrets(
                p.room, record.target, record.delegate_to, SecretKind.ANSWER, record.type, record.url
            )
            existing = found[0] if found else None
            key = (
                existing.key
                if existing
                else SecretKey(p.room, record.target, record.delegate_to, uuid.uuid4().hex)
            )
            secret = self._secrets.seal(key, record.type, record.url, data, SecretKind.ANSWER)
            condition = WriteCondition(etag=existing.etag) if existing else ABSENT
            try:
                won = await self.close(
                    record, RequestState.PROVIDED, "", secret=secret, secret_condition=condition
                )
            except (EtagMismatch, AlreadyExists):
                continue  # the stored secret changed under us; look again
            except QuotaExceeded as refused:  # the answer would pass the asked identity's quota
                await self._audit.record(
                    "provide_secret",
                    room=p.room,
                    actor=p.identity,
                    outcome="quota_exceeded",
                    request_id=request_id,
                    owner=record.target,
                )
                raise audited(refused) from None
            if not won:
                raise self._not_pending(await self._store.get_request(request_id))
            await self._audit.record(
                "provide_secret",
                room=p.room,
                actor=p.identity,
                request_id=request_id,
                secret_id=key.secret_id,
                owner=record.target,
                delegated_to=record.delegate_to,
                target=record.requested_by,  # who receives it, on the answering identity's authority
                authority=f"answer:{p.identity}",
            )
            return
        raise FailedPrecondition(f"request {request_id}: the stored secret keeps changing; try again")

    async def reject(self, p: Principal, *, request_id: str, error: str, kind: str) -> None:
        p.require_secrets()
        validate.secret_id(request_id, "request_id")
        reason = validate.text(error, "error", validate.MAX_REASON) or "rejected"
        record = await self.answerable(p, request_id, kind)
        if not await self.close(record, RequestState.REJECTED, reason):
            raise self._not_pending(await self._store.get_request(request_id))
        await self._audit.record(f"reject_{kind}", room=p.room, actor=p.identity, request_id=request_id)

    async def answerable(self, p: Principal, request_id: str, kind: str) -> RequestRecord:
        """The pending request `request_id`, if the caller is the participant it asks."""
        record = await self._store.get_request(request_id)
        if record is None or record.room != p.room:
            raise NotFound(f"request {request_id} not found")
        if record.target != p.identity:
            await self._audit.record(
                f"answer_{kind}", room=p.room, actor=p.identity, outcome="denied", request_id=request_id
            )
            raise audited(
                PermissionDenied(
                    f"request {request_id} is addressed to another participant; only they may answer"
                )
            )
        if record.kind != kind:
            raise FailedPrecondition(f"request {request_id} is a {record.kind} request, not a {kind} request")
        if record.state is not RequestState.PENDING:
            raise self._not_pending(record)
        if record.deadline <= time.time():
            await self.close(record, RequestState.EXPIRED, "timed out")
            raise FailedPrecondition(f"request {request_id} has expired", reason="REQUEST_NOT_PENDING")
        return record

    @staticmethod
    def _not_pending(record: RequestRecord | None) -> FailedPrecondition:
        state = record.state.value if record else "gone"
        request_id = record.request_id if record else ""
        return FailedPrecondition(
            f"request {request_id} is no longer pending ({state})", reason="REQUEST_NOT_PENDING"
        )

    # -- the inbound stream -------------------------------------------------------------------
    async def watch(self, p: Principal) -> AsyncIterator[Event | WatchReady]:
        p.require_secrets()
        try:  # counted and subscribed with no await in between: one process's streams are exact
            self._quotas.check_watch_streams(p.room, p.identity, self._notifier.streams(p.room, p.identity))
        except QuotaExceeded as refused:
            await self._audit.record(
                "watch_requests", room=p.room, actor=p.identity, outcome="quota_exceeded"
            )
            raise audited(refused) from None
        subscription = await self._notifier.subscribe(p.room, p.identity)  # first, so nothing slips by
        try:
            await self._audit.record("watch_requests", room=p.room, actor=p.identity)
            pending = await self._store.pending_requests_for(p.room, p.identity, time.time())
            delivered = DeliveredRequests(r.request_id for r in pending)
            for record in pending:
                yield RequestOpened(record)
            yield WatchReady(len(pending))
            del pending  # the stream may idle for days: hold no more than `delivered`
            async for event in subscription.events():
                if delivered.first_time(event):
                    yield event
            if subscription.overflowed:
                raise ResourceExhausted(
                    f"this stream fell {subscription.MAX_UNDELIVERED} events behind; reconnect "
                    "(a new stream starts with every pending request)",
                    reason="WATCH_OVERFLOW",
                )
            # Otherwise the notifier only ends subscriptions when the server shuts down.
            raise Unavailable("server is shutting down; reconnect to keep watching", reason="SHUTTING_DOWN")
        finally:
            self._notifier.unsubscribe(subscription)

    # -- closing ------------------------------------------------------------------------------
    async def close(
        self,
        record: RequestRecord,
        state: RequestState,
        reason: str,
        *,
        secret: SecretRecord | None = None,
        secret_condition: WriteCondition = ANY,
    ) -> bool:
        """Close a pending request in the store (with the answer's secret, atomically) and tell
        everyone waiting on it. False if it was no longer pending. Shielded: a caller cancelled
        mid-close (its deadline fired) must not leave the request closed with nobody told."""
        return await asyncio.shield(
            self._spawn(self._close_and_notify(record, state, reason, secret, secret_condition))
        )

    async def _close_and_notify(
        self,
        record: RequestRecord,
        state: RequestState,
        reason: str,
        secret: SecretRecord | None,
        secret_condition: WriteCondition,
    ) -> bool:
        if not await self._store.close_request(
            record.request_id, state, reason, secret=secret, secret_condition=secret_condition
        ):
            return False
        self.notify_closed(record, state, reason)
        return True

    def notify_closed(self, record: RequestRecord, state: RequestState, reason: str) -> None:
        self._notifier.request_changed(record.request_id)
        self._notifier.publish(record.room, record.target, RequestClosed(record.request_id, state, reason))
        if state in (RequestState.EXPIRED, RequestState.CANCELLED):
            self._audit.record_nowait(  # nobody waits on an expiry or a cancellation
                f"request_{record.kind}",
                room=record.room,
                actor=record.requested_by,
                outcome=state.value,
                request_id=record.request_id,
                target=record.target,
            )

    def _stopped_listening(self, room: str, identity: str) -> None:
        if self._stopping:
            return
        self._spawn(self._cancel_if_still_away(room, identity))

    async def _cancel_if_still_away(self, room: str, identity: str) -> None:
        if await self._notifier.wait_listening(room, identity, self.listener_grace):
            return
        for record in await self._store.pending_requests_for(room, identity, time.time()):
            await self.close(record, RequestState.CANCELLED, f"participant {identity!r} stopped listening")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                for record in await self._store.expire_due(time.time()):
                    self.notify_closed(record, RequestState.EXPIRED, "timed out")
            except Exception:
                log.exception("request expiry sweep failed")

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
