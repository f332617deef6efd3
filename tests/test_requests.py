"""The request -> provide | reject flow and the WatchRequests stream, through the real server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.requests.notifier import DeliveredRequests, RequestClosed, RequestOpened
from roomsecrets_server.store import RequestRecord, RequestState

from .harness import Participants, ServerThread, test_settings

Answer = Callable[[pb.SecretRequest], None]


def error_reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo in status details")


class Watcher:
    """A participant's WatchRequests stream, read on a thread; optionally answers requests."""

    def __init__(self, room: Participants, identity: str, answer: Answer | None = None) -> None:
        self.events: list[pb.WatchRequestsResponse] = []
        self.ready = threading.Event()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self._changed = threading.Condition()
        self._answer = answer
        self.call = room.stub.WatchRequests(pb.WatchRequestsRequest(), metadata=room.auth(identity))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.ready.wait(5), "stream never became ready"

    def _read(self) -> None:
        try:
            for event in self.call:
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
                if event.HasField("ready"):
                    self.ready.set()
                if event.HasField("secret_request") and self._answer is not None:
                    self._answer(event.secret_request)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.ended.set()
            self.ready.set()

    def wait_for(
        self, predicate: Callable[[pb.WatchRequestsResponse], bool], timeout: float = 5
    ) -> pb.WatchRequestsResponse:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no matching event; got {[e.WhichOneof('event') for e in self.events]}"
                self._changed.wait(remaining)

    def requests(self) -> list[pb.SecretRequest]:
        return [e.secret_request for e in self.events if e.HasField("secret_request")]

    def closed(self, request_id: str) -> pb.RequestClosed:
        event = self.wait_for(
            lambda e: e.HasField("request_closed") and e.request_closed.request_id == request_id
        )
        return event.request_closed

    def cancel(self) -> None:
        self.call.cancel()  # type: ignore[no-untyped-call]
        self.ended.wait(5)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.cancel()


def ask(
    room: Participants, asker: str = "alice", target: str = "bob", **fields: object
) -> pb.RequestSecretResponse:
    fields.setdefault("url", "https://git.example/repo.git")
    fields.setdefault("timeout", 10)
    request = pb.RequestSecretRequest(from_participant_id=target, **fields)  # type: ignore[arg-type]
    return room.stub.RequestSecret(request, metadata=room.auth(asker), timeout=request.timeout + 20)


def provider(room: Participants, identity: str, value: bytes) -> Answer:
    def answer(request: pb.SecretRequest) -> None:
        room.stub.ProvideSecret(
            pb.ProvideSecretRequest(request_id=request.request_id, data=value), metadata=room.auth(identity)
        )

    return answer


def test_provide_returns_value_and_stores_it_for_the_asked_participant(
    room: Participants, watchers: list[Watcher]
) -> None:
    bob = Watcher(room, "bob", provider(room, "bob", b"s3cret-token"))
    watchers.append(bob)
    reply = ask(room, type="git", delegate_to="alice")
    assert reply.data == b"s3cret-token"
    inbound = bob.requests()[0]
    assert (inbound.request_id, inbound.url, inbound.type) == (
        reply.request_id,
        "https://git.example/repo.git",
        "git",
    )
    assert inbound.requested_by == "alice" and inbound.delegate_to == "alice"
    assert bob.closed(reply.request_id).state == pb.REQUEST_STATE_PROVIDED
    # Stored as bob's secret keyed by (url, type), delegated to alice; alice sees it as delegated.
    got = room.stub.GetSecret(
        pb.GetSecretRequest(type="git", name="https://git.example/repo.git", delegated_to="alice"),
        metadata=room.auth("bob"),
    )
    assert got.data == b"s3cret-token"
    listed = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("alice")).secrets
    assert [(s.name, s.type, s.delegated_by) for s in listed] == [
        ("https://git.example/repo.git", "git", "bob")
    ]


def test_reject_fails_the_asker_with_the_reason(room: Participants, watchers: list[Watcher]) -> None:
    def reject(request: pb.SecretRequest) -> None:
        room.stub.RejectSecret(
            pb.RejectSecretRequest(request_id=request.request_id, error="not today"),
            metadata=room.auth("bob"),
        )

    bob = Watcher(room, "bob", reject)
    watchers.append(bob)
    with pytest.raises(grpc.RpcError) as caught:
        ask(room)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not today" in (caught.value.details() or "")
    assert error_reason(caught.value) == "REQUEST_REJECTED"
    request_id = bob.requests()[0].request_id
    assert bob.closed(request_id).state == pb.REQUEST_STATE_REJECTED


def test_unanswered_request_times_out_and_expires_for_the_asked_participant(
    room: Participants, watchers: list[Watcher]
) -> None:
    bob = Watcher(room, "bob")
    watchers.append(bob)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        ask(room, timeout=1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 <= time.monotonic() - started < 20  # the 1 s timeout, not the default
    request_id = bob.requests()[0].request_id
    assert bob.closed(request_id).state == pb.REQUEST_STATE_EXPIRED
    with pytest.raises(grpc.RpcError) as late:
        room.stub.ProvideSecret(
            pb.ProvideSecretRequest(request_id=request_id, data=b"late"), metadata=room.auth("bob")
        )
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_call_deadline_bounds_the_wait(room: Participants, watchers: list[Watcher]) -> None:
    bob = Watcher(room, "bob")
    watchers.append(bob)
    request = pb.RequestSecretRequest(from_participant_id="bob", url="u", timeout=300)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        room.stub.RequestSecret(request, metadata=room.auth("alice"), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 30  # bounded by the 1 s deadline, not the 300 s timeout
    closed = bob.closed(bob.requests()[0].request_id)
    assert closed.state in (pb.REQUEST_STATE_EXPIRED, pb.REQUEST_STATE_CANCELLED)


def test_an_answer_whose_call_deadline_fires_mid_write_still_completes_the_request(
    server: ServerThread, room: Participants, watchers: list[Watcher]
) -> None:
    """If the answering call is cancelled (its deadline fired) while the store is closing the
    request, a write that completes regardless (SQLite's writer thread, a PostgreSQL commit in
    flight), the requester must still be woken and the watcher told the request is closed."""
    assert server.server is not None
    store = server.server.store
    real_close = store.close_request

    async def slow_close(*args: Any, **kwargs: Any) -> bool:
        async def write() -> bool:
            await asyncio.sleep(0.5)
            return await real_close(*args, **kwargs)

        # Like a write already handed to the database: cancelling the caller does not undo it.
        return await asyncio.shield(asyncio.get_running_loop().create_task(write()))

    store.close_request = slow_close  # type: ignore[method-assign]
    try:
        bob = Watcher(room, "bob")
        watchers.append(bob)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(ask, room)
            inbound = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
            with pytest.raises(grpc.RpcError) as caught:
                room.stub.ProvideSecret(
                    pb.ProvideSecretRequest(request_id=inbound.request_id, data=b"made-it"),
                    metadata=room.auth("bob"),
                    timeout=0.1,
                )
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert bob.closed(inbound.request_id).state == pb.REQUEST_STATE_PROVIDED
            assert waiting.result(10).data == b"made-it"
    finally:
        store.close_request = real_close  # type: ignore[method-assign]


def test_requester_cancelling_cancels_the_request(room: Participants, watchers: list[Watcher]) -> None:
    bob = Watcher(room, "bob")
    watchers.append(bob)
    call = room.stub.RequestSecret.future(
        pb.RequestSecretRequest(from_participant_id="bob", url="u", timeout=60), metadata=room.auth("alice")
    )
    inbound = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
    call.cancel()  # type: ignore[no-untyped-call]
    closed = bob.closed(inbound.request_id)
    assert closed.state == pb.REQUEST_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as caught:
        room.stub.ProvideSecret(
            pb.ProvideSecretRequest(request_id=inbound.request_id, data=b"x"), metadata=room.auth("bob")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_request_to_someone_not_listening_fails_fast(room: Participants) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        ask(room, timeout=60)
    elapsed = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'bob'" in (caught.value.details() or "") and "not listening" in (caught.value.details() or "")
    assert error_reason(caught.value) == "NOT_LISTENING"
    assert elapsed < 3, f"took {elapsed:.1f}s; the grace in tests is 0.5s"


def test_listener_arriving_within_the_grace_gets_the_request(
    room: Participants, watchers: list[Watcher]
) -> None:
    def late_listener() -> None:
        time.sleep(0.2)
        watchers.append(Watcher(room, "bob", provider(room, "bob", b"late-but-fine")))

    threading.Thread(target=late_listener, daemon=True).start()
    assert ask(room).data == b"late-but-fine"


def test_participant_gone_past_the_grace_cancels_its_pending_requests(room: Participants) -> None:
    bob = Watcher(room, "bob")
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(ask, room, timeout=60)
        bob.wait_for(lambda e: e.HasField("secret_request"))
        bob.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            pending.result(timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stopped listening" in (caught.value.details() or "")
    assert time.monotonic() - started < 20  # after the grace, not the 60 s timeout


def test_only_the_asked_participant_may_answer(room: Participants, watchers: list[Watcher]) -> None:
    bob = Watcher(room, "bob")
    watchers.append(bob)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, room)
        request_id = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request.request_id
        for intruder in ("carol", "alice"):
            with pytest.raises(grpc.RpcError) as caught:
                room.stub.ProvideSecret(
                    pb.ProvideSecretRequest(request_id=request_id, data=b"forged"),
                    metadata=room.auth(intruder),
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as rejected:
                room.stub.RejectSecret(
                    pb.RejectSecretRequest(request_id=request_id, error="x"), metadata=room.auth(intruder)
                )
            assert rejected.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The same id from another room is simply not found there.
        with pytest.raises(grpc.RpcError) as other_room:
            room.stub.ProvideSecret(
                pb.ProvideSecretRequest(request_id=request_id, data=b"forged"),
                metadata=room.auth("bob", room="room-2"),
            )
        assert other_room.value.code() == grpc.StatusCode.NOT_FOUND
        room.stub.ProvideSecret(
            pb.ProvideSecretRequest(request_id=request_id, data=b"genuine"), metadata=room.auth("bob")
        )
        assert pending.result(timeout=10).data == b"genuine"


@pytest.mark.parametrize("second", ["provide", "reject"])
def test_two_answers_racing_exactly_one_wins(
    room: Participants, watchers: list[Watcher], second: str
) -> None:
    bob = Watcher(room, "bob")
    watchers.append(bob)
    md = room.auth("bob")
    for attempt in range(5):
        with ThreadPoolExecutor(3) as pool:
            pending = pool.submit(ask, room, url=f"race-{second}-{attempt}")
            url = f"race-{second}-{attempt}"

            def is_this_request(e: pb.WatchRequestsResponse, url: str = url) -> bool:
                return e.HasField("secret_request") and e.secret_request.url == url

            request_id = bob.wait_for(is_this_request).secret_request.request_id
            barrier = threading.Barrier(2)

            def answer(
                kind: str, rid: str = request_id, barrier: threading.Barrier = barrier
            ) -> grpc.StatusCode:
                barrier.wait()
                try:
                    if kind == "provide":
                        room.stub.ProvideSecret(
                            pb.ProvideSecretRequest(request_id=rid, data=b"first"), metadata=md
                        )
                    else:
                        room.stub.RejectSecret(
                            pb.RejectSecretRequest(request_id=rid, error="no"), metadata=md
                        )
                except grpc.RpcError as err:
                    return err.code()
                return grpc.StatusCode.OK

            outcomes = sorted(
                (f.result() for f in [pool.submit(answer, "provide"), pool.submit(answer, second)]), key=str
            )
            assert outcomes.count(grpc.StatusCode.OK) == 1, outcomes
            assert outcomes.count(grpc.StatusCode.FAILED_PRECONDITION) == 1, outcomes
            try:
                result: bytes | grpc.StatusCode = pending.result(timeout=10).data
            except grpc.RpcError as err:
                result = err.code()
            assert result in (b"first", grpc.StatusCode.PERMISSION_DENIED)


def test_new_stream_replays_pending_requests(room: Participants, watchers: list[Watcher]) -> None:
    first = Watcher(room, "bob")
    watchers.append(first)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, room)
        request_id = first.wait_for(lambda e: e.HasField("secret_request")).secret_request.request_id
        second = Watcher(room, "bob")
        watchers.append(second)
        kinds = [e.WhichOneof("event") for e in second.events]
        assert kinds[:2] == ["secret_request", "ready"]
        assert second.events[0].secret_request.request_id == request_id
        assert second.events[1].ready.pending == 1
        room.stub.ProvideSecret(
            pb.ProvideSecretRequest(request_id=request_id, data=b"v"), metadata=room.auth("bob")
        )
        assert pending.result(timeout=10).data == b"v"
        # Both streams of the same identity hear that it was answered.
        assert first.closed(request_id).state == second.closed(request_id).state == pb.REQUEST_STATE_PROVIDED


def test_a_republished_pending_request_reaches_a_stream_once(
    server: ServerThread, room: Participants, watchers: list[Watcher]
) -> None:
    """A PgNotifier resync republishes every pending request to the streams still open; the
    participant must not be asked twice. Checked by republishing on the server's own notifier."""
    bob = Watcher(room, "bob")
    watchers.append(bob)
    assert server.server is not None
    requests, store = server.server.requests, server.server.store

    async def republish(request_id: str) -> None:
        record = await store.get_request(request_id)
        assert record is not None
        requests._notifier.publish(record.room, record.target, RequestOpened(record))

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, room, url="https://x.example/first")
        first_id = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request.request_id
        server.call(republish(first_id))
        # Events reach a stream in order: once the second request is here, the republished
        # first one has been through the stream too.
        second = pool.submit(ask, room, url="https://x.example/second")
        bob.wait_for(lambda e: e.HasField("secret_request") and e.secret_request.url.endswith("second"))
        assert [r.request_id for r in bob.requests()].count(first_id) == 1
        for request in bob.requests():
            room.stub.RejectSecret(
                pb.RejectSecretRequest(request_id=request.request_id, error="no"), metadata=room.auth("bob")
            )
        for asked in (first, second):
            with pytest.raises(grpc.RpcError):
                asked.result(timeout=10)


def test_a_stream_remembers_only_the_requests_still_open() -> None:
    """What a stream keeps to avoid asking twice must not grow with every request it ever
    delivered: a stream can live for months."""
    delivered = DeliveredRequests(["pending-at-start"])

    def opened(request_id: str) -> RequestOpened:
        return RequestOpened(cast(RequestRecord, SimpleNamespace(request_id=request_id)))

    assert not delivered.first_time(opened("pending-at-start"))  # already sent from the store
    for n in range(1000):
        assert delivered.first_time(opened(f"r{n}"))
        assert not delivered.first_time(opened(f"r{n}"))  # republished while open
        assert delivered.first_time(RequestClosed(f"r{n}", RequestState.REJECTED, "no"))
    assert len(delivered) == 1  # only the one never closed
    assert delivered.first_time(RequestClosed("pending-at-start", RequestState.EXPIRED, "timed out"))
    assert len(delivered) == 0


def test_provided_secret_answers_again_until_deleted(room: Participants, watchers: list[Watcher]) -> None:
    bob = Watcher(room, "bob", provider(room, "bob", b"wrong-password"))
    watchers.append(bob)
    assert ask(room, type="git", delegate_to="alice").data == b"wrong-password"
    assert ask(room, type="git", delegate_to="alice").data == b"wrong-password"
    assert len(bob.requests()) == 1, "the second ask should be answered from storage without a prompt"
    room.stub.DeleteRequestedSecret(
        pb.DeleteRequestedSecretRequest(url="https://git.example/repo.git", type="git", delegated_to="alice"),
        metadata=room.auth("alice"),
    )
    assert ask(room, type="git", delegate_to="alice").data == b"wrong-password"
    assert len(bob.requests()) == 2, "after DeleteRequestedSecret the next ask prompts again"


def test_pending_request_survives_a_restart(data_dir: Path) -> None:
    settings = test_settings(data_dir, listener_grace=2.0)
    first = ServerThread(settings).start()
    room = Participants(first)
    bob = Watcher(room, "bob")
    pool = ThreadPoolExecutor(1)
    pending = pool.submit(ask, room, timeout=60, delegate_to="alice")
    request_id = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request.request_id
    first.stop()
    with pytest.raises(grpc.RpcError) as dropped:
        pending.result(timeout=10)
    assert dropped.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert bob.ended.wait(5)
    room.close()

    second = ServerThread(settings).start()
    room = Participants(second)
    try:
        bob = Watcher(room, "bob")
        assert bob.events[0].secret_request.request_id == request_id, "the pending request was replayed"
        assert bob.events[1].ready.pending == 1
        # The asker retries: it joins the same pending request instead of asking twice.
        retry = pool.submit(ask, room, timeout=60, delegate_to="alice")
        time.sleep(0.3)
        room.stub.ProvideSecret(
            pb.ProvideSecretRequest(request_id=request_id, data=b"after-restart"), metadata=room.auth("bob")
        )
        reply = retry.result(timeout=10)
        assert (reply.data, reply.request_id) == (b"after-restart", request_id)
        assert len(bob.requests()) == 1
        bob.cancel()
    finally:
        pool.shutdown()
        room.close()
        second.stop()


def test_requests_left_past_their_deadline_are_expired_by_the_sweeper(data_dir: Path) -> None:
    settings = test_settings(data_dir)
    first = ServerThread(settings).start()
    room = Participants(first)
    bob = Watcher(room, "bob")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, room, timeout=2)
        request_id = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request.request_id
        first.stop()  # nobody is left waiting for this request
        with pytest.raises(grpc.RpcError):
            pending.result(timeout=10)
    room.close()
    time.sleep(2.2)
    second = ServerThread(settings).start()
    room = Participants(second)
    try:
        time.sleep(0.6)  # a few sweeps
        bob = Watcher(room, "bob")
        assert bob.events[0].ready.pending == 0
        with pytest.raises(grpc.RpcError) as caught:
            room.stub.ProvideSecret(
                pb.ProvideSecretRequest(request_id=request_id, data=b"x"), metadata=room.auth("bob")
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "expired" in (caught.value.details() or "")
        bob.cancel()
    finally:
        room.close()
        second.stop()


def test_watch_requires_a_valid_token(room: Participants) -> None:
    call = room.stub.WatchRequests(pb.WatchRequestsRequest(), metadata=(("authorization", "Bearer nope"),))
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(call))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_shutdown_ends_streams_cleanly(data_dir: Path) -> None:
    running = ServerThread(test_settings(data_dir)).start()
    room = Participants(running)
    bob = Watcher(room, "bob")
    started = time.monotonic()
    running.stop()
    assert bob.ended.wait(5)
    assert time.monotonic() - started < 10, "stream was not ended within the shutdown grace"
    # A retryable status with a clear message, so clients know to reconnect (not a silent OK).
    assert bob.error is not None
    assert bob.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (bob.error.details() or "")
    room.close()


def test_values_never_reach_the_stream_or_the_audit_log(
    room: Participants, watchers: list[Watcher], data_dir: Path
) -> None:
    marker = b"marker-5f1c0d9e-value"
    bob = Watcher(room, "bob", provider(room, "bob", marker))
    watchers.append(bob)
    assert ask(room, delegate_to="alice").data == marker
    assert all(marker not in e.SerializeToString() for e in bob.events)
    room.server.call(_flush_audit(room.server))
    audit = (data_dir / "audit.log").read_bytes()
    assert b"provide_secret" in audit and b"request_secret" in audit
    assert marker not in audit


async def _flush_audit(server: ServerThread) -> None:
    assert server.server is not None
    server.server.audit.flush()
