"""The handler API for inbound requests, on top of `watch_requests` (as the reference SDK's
`secret_request_handler` / `oauth_token_request_handler`).

A `secret_request_handler` receives a `SecretRequest` and returns the value (bytes) to provide,
or None to decline. If it raises, the request is rejected with the error's text; raise
`RejectRequest("reason")` to reject with exactly that reason. An `oauth_token_request_handler`
receives an `OAuthTokenRequest` and returns the authorization code (or None to decline).

Unlike the reference, nobody is ever left waiting: a request for which no handler is registered,
whose handler fails or returns something unusable, or which is still queued when the handlers
stop, is rejected at once. The stream reconnects (with backoff) when the connection drops, and
requests replayed on reconnect are not handled twice.

The wrappers never put a secret value into a reason or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Protocol, Self, TypeAlias

import grpc

from .errors import NotFoundError, RequestNotPendingError, SecretsError
from .types import OAuthTokenRequest, RequestClosed, RequestEvent, SecretRequest, WatchReady

__all__ = [
    "AsyncOAuthTokenRequestHandler",
    "AsyncRequestHandler",
    "AsyncSecretRequestHandler",
    "OAuthTokenRequestHandler",
    "RejectRequest",
    "RequestHandlerThread",
    "SecretRequestHandler",
]

log = logging.getLogger("roomsecrets.handlers")

SecretRequestHandler: TypeAlias = Callable[[SecretRequest], bytes | None]
OAuthTokenRequestHandler: TypeAlias = Callable[[OAuthTokenRequest], str | None]
AsyncSecretRequestHandler: TypeAlias = Callable[[SecretRequest], Awaitable[bytes | None] | bytes | None]
AsyncOAuthTokenRequestHandler: TypeAlias = Callable[[OAuthTokenRequest], Awaitable[str | None] | str | None]

SECRET = "secret"  # noqa: S105 - a request kind
OAUTH = "oauth"
NO_HANDLER = {
    SECRET: "no secret request handler is registered",
    OAUTH: "no OAuth request handler is registered",
}
DECLINED = "declined"
STOPPED = "the participant stopped answering requests"
MAX_REASON = 1000  # the server accepts 1024 characters
# Stream failures worth reconnecting after; anything else (bad token, no grant) is final.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
FIRST_DELAY = 0.1
MAX_DELAY = 5.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class RejectRequest(Exception):
    """Raise from a handler to reject the request with this reason (shown to the requester)."""


def clean_reason(text: str) -> str:
    """One line the server accepts: no control characters, at most MAX_REASON characters."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def failure_reason(error: BaseException) -> str:
    if isinstance(error, RejectRequest):
        return clean_reason(str(error)) or "rejected"
    text = clean_reason(str(error))
    return clean_reason(f"handler failed: {type(error).__name__}" + (f": {text}" if text else ""))


def secret_value(result: object) -> tuple[bytes | None, str]:
    """(value to provide, or None and the reason to reject) from a secret handler's result."""
    if result is None:
        return None, DECLINED
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result), ""
    if isinstance(result, str):
        return result.encode(), ""
    return None, f"handler returned {type(result).__name__}, not bytes"


def oauth_code(result: object) -> tuple[str | None, str]:
    if result is None:
        return None, DECLINED
    if isinstance(result, str) and result:
        return result, ""
    return None, f"handler returned {type(result).__name__}, not an authorization code"


def _request_id(request: SecretRequest | OAuthTokenRequest) -> str:
    return request.request_id


# -- synchronous --------------------------------------------------------------------------------
class _SyncStream(Protocol):
    def __iter__(self) -> Iterator[RequestEvent]: ...
    def cancel(self) -> None: ...


class _SyncClient(Protocol):
    def watch_requests(self) -> _SyncStream: ...
    def provide_secret(self, request_id: str, data: bytes) -> None: ...
    def reject_secret(self, request_id: str, error: str) -> None: ...
    def provide_oauth_authorization(
        self, request_id: str, code: str, *, state: str | None = None
    ) -> None: ...
    def reject_oauth_authorization(self, request_id: str, error: str) -> None: ...


class RequestHandlerThread:
    """Reads WatchRequests on a background thread and answers each request with the handlers,
    which run on a small thread pool (so a slow handler does not hold up the others)."""

    def __init__(
        self,
        client: _SyncClient,
        *,
        secret_request_handler: SecretRequestHandler | None = None,
        oauth_token_request_handler: OAuthTokenRequestHandler | None = None,
        max_workers: int = 4,
        reconnect: bool = True,
    ) -> None:
        self._client = client
        self._secret_handler = secret_request_handler
        self._oauth_handler = oauth_token_request_handler
        self._reconnect = reconnect
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="roomsecrets-handler")
        self._cond = threading.Condition()
        self._inflight: dict[str, tuple[str, Future[None]]] = {}
        self._stream: _SyncStream | None = None
        self._ready = False
        self._finished = False
        self._error: SecretsError | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="roomsecrets-watch", daemon=True)
        self.provided = 0
        self.rejected = 0

    # -- control ------------------------------------------------------------------------------
    def start(self) -> Self:
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        """True while the stream is open and live (after the replay of pending requests)."""
        return self._ready

    @property
    def error(self) -> SecretsError | None:
        """The error that ended the stream for good (e.g. UNAUTHENTICATED), if any."""
        return self._error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the stream is live. Raises the stream's error if it failed for good, and
        TimeoutError if it is not live within `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._finished, timeout)
            if self._error is not None:
                raise self._error
            if self._ready:
                return
            if self._finished:
                raise RuntimeError("the request handlers have stopped")
        raise TimeoutError(f"the request stream was not ready within {timeout} s")

    def stop(self, timeout: float | None = 10.0) -> None:
        """Close the stream; reject requests not yet started; let running handlers finish
        (waiting up to `timeout` seconds for them)."""
        self._stopping.set()
        with self._cond:
            stream = self._stream
        if stream is not None:
            stream.cancel()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with self._cond:
            inflight = list(self._inflight.items())
        for request_id, (kind, future) in inflight:
            if future.cancel():
                self._reject(kind, request_id, STOPPED)
        self._pool.shutdown(wait=False)
        wait_futures([future for _, (_, future) in inflight], timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the stream ---------------------------------------------------------------------------
    def _run(self) -> None:
        delay = FIRST_DELAY
        try:
            while not self._stopping.is_set():
                with self._cond:
                    if self._stopping.is_set():
                        break
                    stream = self._client.watch_requests()
                    self._stream = stream
                try:
                    for event in stream:
                        if isinstance(event, WatchReady):
                            delay = FIRST_DELAY
                        self._on_event(event)
                except SecretsError as error:
                    if self._stopping.is_set():
                        break
                    if not self._reconnect or error.code not in RETRYABLE:
                        log.error("request stream failed: %s", error)
                        self._error = error
                        break
                    log.warning("request stream lost (%s); reconnecting in %.1f s", error, delay)
                else:
                    if self._stopping.is_set() or not self._reconnect:
                        break
                    log.info("request stream ended by the server; reconnecting in %.1f s", delay)
                finally:
                    with self._cond:
                        self._stream = None
                        self._ready = False
                        self._cond.notify_all()
                if not self._reconnect:
                    break
                self._stopping.wait(delay)
                delay = min(delay * 2, MAX_DELAY)
        except Exception:
            log.exception("request handler thread crashed")
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _on_event(self, event: RequestEvent) -> None:
        if isinstance(event, WatchReady):
            with self._cond:
                self._ready = True
                self._cond.notify_all()
        elif isinstance(event, SecretRequest):
            self._dispatch(SECRET, event)
        elif isinstance(event, OAuthTokenRequest):
            self._dispatch(OAUTH, event)
        elif isinstance(event, RequestClosed):
            log.debug("request %s closed: %s", event.request_id, event.state.value)

    def _dispatch(self, kind: str, request: SecretRequest | OAuthTokenRequest) -> None:
        request_id = _request_id(request)
        with self._cond:
            if request_id in self._inflight:  # replayed after a reconnect: already being handled
                return
            try:
                future = self._pool.submit(self._answer, kind, request)
            except RuntimeError:  # the pool is shut down: we are stopping
                future = None
            if future is not None:
                self._inflight[request_id] = (kind, future)
        if future is None:
            self._reject(kind, request_id, STOPPED)
            return
        future.add_done_callback(lambda _: self._done(request_id))

    def _done(self, request_id: str) -> None:
        with self._cond:
            self._inflight.pop(request_id, None)

    # -- answering ----------------------------------------------------------------------------
    def _answer(self, kind: str, request: SecretRequest | OAuthTokenRequest) -> None:
        request_id = _request_id(request)
        handler: Callable[[object], object] | None = (
            self._secret_handler if kind == SECRET else self._oauth_handler  # type: ignore[assignment]
        )
        if handler is None:
            self._reject(kind, request_id, NO_HANDLER[kind])
            return
        try:
            result = handler(request)
        except Exception as error:
            _log_failure(kind, request_id, error)
            self._reject(kind, request_id, failure_reason(error))
            return
        if kind == SECRET:
            data, reason = secret_value(result)
            if data is None:
                self._reject(kind, request_id, reason)
                return
            self._provide(kind, request_id, lambda: self._client.provide_secret(request_id, data))
        else:
            code, reason = oauth_code(result)
            if code is None:
                self._reject(kind, request_id, reason)
                return
            state = request.state if isinstance(request, OAuthTokenRequest) else ""
            self._provide(
                kind,
                request_id,
                lambda: self._client.provide_oauth_authorization(request_id, code, state=state or None),
            )

    def _provide(self, kind: str, request_id: str, call: Callable[[], None]) -> None:
        try:
            call()
        except (RequestNotPendingError, NotFoundError) as error:
            log.info("request %s was closed before it was answered: %s", request_id, error)
            return
        except SecretsError as error:
            log.warning("could not answer request %s: %s", request_id, error)
            self._reject(kind, request_id, f"could not provide the answer: {error}")
            return
        with self._cond:
            self.provided += 1

    def _reject(self, kind: str, request_id: str, reason: str) -> None:
        reason = clean_reason(reason) or "rejected"
        try:
            if kind == SECRET:
                self._client.reject_secret(request_id, reason)
            else:
                self._client.reject_oauth_authorization(request_id, reason)
        except SecretsError as error:
            log.info("could not reject request %s: %s", request_id, error)
            return
        with self._cond:
            self.rejected += 1


def _log_failure(kind: str, request_id: str, error: Exception) -> None:
    if isinstance(error, RejectRequest):
        log.info("%s request %s rejected by its handler", kind, request_id)
    else:
        log.warning("%s request handler failed for request %s", kind, request_id, exc_info=error)


# -- asyncio ------------------------------------------------------------------------------------
class _AsyncStream(Protocol):
    def __aiter__(self) -> AsyncIterator[RequestEvent]: ...
    def cancel(self) -> None: ...


class _AsyncClient(Protocol):
    def watch_requests(self) -> _AsyncStream: ...
    async def provide_secret(self, request_id: str, data: bytes) -> None: ...
    async def reject_secret(self, request_id: str, error: str) -> None: ...
    async def provide_oauth_authorization(
        self, request_id: str, code: str, *, state: str | None = None
    ) -> None: ...
    async def reject_oauth_authorization(self, request_id: str, error: str) -> None: ...


class AsyncRequestHandler:
    """Reads WatchRequests and answers each request with the handlers, one task per request.

    `await handler.run()` serves until stopped (or until the stream fails for good, raising
    that error); `start()` runs it as a task. A handler still working on a request that gets
    cancelled or expires elsewhere is cancelled. `stop()` cancels the handlers that are still
    working and rejects their requests.
    """

    def __init__(
        self,
        client: _AsyncClient,
        *,
        secret_request_handler: AsyncSecretRequestHandler | None = None,
        oauth_token_request_handler: AsyncOAuthTokenRequestHandler | None = None,
        reconnect: bool = True,
    ) -> None:
        self._client = client
        self._secret_handler = secret_request_handler
        self._oauth_handler = oauth_token_request_handler
        self._reconnect = reconnect
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._handling: set[str] = set()  # ids whose handler is still running (cancellable)
        self._closed_elsewhere: set[str] = set()
        self._stream: _AsyncStream | None = None
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._ready_event: asyncio.Event | None = None
        self._finished_event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._error: SecretsError | None = None
        self.provided = 0
        self.rejected = 0

    def _events(self) -> tuple[asyncio.Event, asyncio.Event, asyncio.Event]:
        if self._stop_event is None or self._ready_event is None or self._finished_event is None:
            self._stop_event, self._ready_event, self._finished_event = (
                asyncio.Event(),
                asyncio.Event(),
                asyncio.Event(),
            )
        return self._stop_event, self._ready_event, self._finished_event

    # -- control ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready_event is not None and self._ready_event.is_set()

    @property
    def error(self) -> SecretsError | None:
        return self._error

    def start(self) -> Self:
        """Run as a background task of the running event loop."""
        if self._task is None:
            self._events()
            self._task = asyncio.get_running_loop().create_task(self._run_quietly())
        return self

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the stream is live; raises the stream's error or TimeoutError."""
        _, ready, finished = self._events()
        waiters = [asyncio.ensure_future(ready.wait()), asyncio.ensure_future(finished.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._error is not None:
            raise self._error
        if ready.is_set():
            return
        if finished.is_set():
            raise RuntimeError("the request handlers have stopped")
        raise TimeoutError(f"the request stream was not ready within {timeout} s")

    async def stop(self) -> None:
        self._stopping = True
        stop, _, finished = self._events()
        stop.set()
        if self._stream is not None:
            self._stream.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        elif self._running:
            await finished.wait()

    async def wait(self) -> None:
        """Wait until the handlers stop (after `stop()`, or a final stream error)."""
        _, _, finished = self._events()
        await finished.wait()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- the stream ---------------------------------------------------------------------------
    async def _run_quietly(self) -> None:
        with contextlib.suppress(SecretsError):  # recorded in .error and logged
            await self.run()

    async def run(self) -> None:
        """Serve until stopped. Raises the error that ended the stream for good, if any."""
        stop, ready, finished = self._events()
        self._running = True
        delay = FIRST_DELAY
        try:
            while not self._stopping:
                stream = self._client.watch_requests()
                self._stream = stream
                try:
                    async for event in stream:
                        if isinstance(event, WatchReady):
                            delay = FIRST_DELAY
                            ready.set()
                        else:
                            self._on_event(event)
                except SecretsError as error:
                    if self._stopping:
                        break
                    if not self._reconnect or error.code not in RETRYABLE:
                        log.error("request stream failed: %s", error)
                        self._error = error
                        raise
                    log.warning("request stream lost (%s); reconnecting in %.1f s", error, delay)
                else:
                    if self._stopping or not self._reconnect:
                        break
                    log.info("request stream ended by the server; reconnecting in %.1f s", delay)
                finally:
                    self._stream = None
                    ready.clear()
                if not self._reconnect:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, MAX_DELAY)
        finally:
            self._stopping = True
            await self._drain()
            finished.set()

    async def _drain(self) -> None:
        for request_id, task in list(self._tasks.items()):
            if request_id in self._handling:
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _on_event(self, event: RequestEvent) -> None:
        if isinstance(event, SecretRequest):
            self._dispatch(SECRET, event)
        elif isinstance(event, OAuthTokenRequest):
            self._dispatch(OAUTH, event)
        elif isinstance(event, RequestClosed):
            task = self._tasks.get(event.request_id)
            if task is not None and event.request_id in self._handling:
                log.info("request %s was %s; cancelling its handler", event.request_id, event.state.value)
                self._closed_elsewhere.add(event.request_id)
                task.cancel()

    def _dispatch(self, kind: str, request: SecretRequest | OAuthTokenRequest) -> None:
        request_id = _request_id(request)
        if request_id in self._tasks:  # replayed after a reconnect: already being handled
            return
        self._handling.add(request_id)
        task = asyncio.get_running_loop().create_task(self._answer(kind, request))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._done(request_id))

    def _done(self, request_id: str) -> None:
        self._tasks.pop(request_id, None)
        self._handling.discard(request_id)
        self._closed_elsewhere.discard(request_id)

    # -- answering ----------------------------------------------------------------------------
    async def _answer(self, kind: str, request: SecretRequest | OAuthTokenRequest) -> None:
        request_id = _request_id(request)
        handler: Callable[[object], object] | None = (
            self._secret_handler if kind == SECRET else self._oauth_handler  # type: ignore[assignment]
        )
        if handler is None:
            self._handling.discard(request_id)
            await self._reject(kind, request_id, NO_HANDLER[kind])
            return
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            self._handling.discard(request_id)
            if request_id not in self._closed_elsewhere:
                await self._reject(kind, request_id, STOPPED)
            return
        except Exception as error:
            self._handling.discard(request_id)
            _log_failure(kind, request_id, error)
            await self._reject(kind, request_id, failure_reason(error))
            return
        self._handling.discard(request_id)  # from here on, the answer goes out even if closed
        if kind == SECRET:
            data, reason = secret_value(result)
            if data is None:
                await self._reject(kind, request_id, reason)
                return
            await self._provide(kind, request_id, self._client.provide_secret(request_id, data))
        else:
            code, reason = oauth_code(result)
            if code is None:
                await self._reject(kind, request_id, reason)
                return
            state = request.state if isinstance(request, OAuthTokenRequest) else ""
            await self._provide(
                kind,
                request_id,
                self._client.provide_oauth_authorization(request_id, code, state=state or None),
            )

    async def _provide(self, kind: str, request_id: str, call: Awaitable[None]) -> None:
        try:
            await call
        except (RequestNotPendingError, NotFoundError) as error:
            log.info("request %s was closed before it was answered: %s", request_id, error)
            return
        except SecretsError as error:
            log.warning("could not answer request %s: %s", request_id, error)
            await self._reject(kind, request_id, f"could not provide the answer: {error}")
            return
        self.provided += 1

    async def _reject(self, kind: str, request_id: str, reason: str) -> None:
        reason = clean_reason(reason) or "rejected"
        try:
            if kind == SECRET:
                await self._client.reject_secret(request_id, reason)
            else:
                await self._client.reject_oauth_authorization(request_id, reason)
        except SecretsError as error:
            log.info("could not reject request %s: %s", request_id, error)
            return
        self.rejected += 1
