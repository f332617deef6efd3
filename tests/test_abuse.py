"""Abuse on both stores: thousands of WatchRequests streams opened and dropped abruptly, and raw
malformed bytes and HTTP/2 frames on the port. The server keeps serving, leaks no tasks or
presence, and its memory stays bounded (RSS measured before and after, printed)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc
from roomsecrets_server.errors import ResourceExhausted
from roomsecrets_server.requests.notifier import RequestClosed, Subscription
from roomsecrets_server.requests.service import WatchReady
from roomsecrets_server.store import RequestState

from .harness import Participants, ServerThread
from .test_replicas import Replica

STREAMS = 2000
PER_CHANNEL = 100


def open_and_drop(address: str, tokens: list[str]) -> None:
    """Open len(tokens) streams over channels of PER_CHANNEL each, wait until each is ready, then
    close the channels: every stream ends at once, abruptly, without a clean cancel per stream."""
    for start in range(0, len(tokens), PER_CHANNEL):
        channel = grpc.insecure_channel(address)
        stub = room_secrets_pb2_grpc.RoomSecretsStub(channel)
        ready = threading.Semaphore(0)
        calls = []
        for token in tokens[start : start + PER_CHANNEL]:
            call = stub.WatchRequests(
                pb.WatchRequestsRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
            calls.append(call)

            def first(call: grpc.Call = call, ready: threading.Semaphore = ready) -> None:
                with contextlib.suppress(grpc.RpcError):
                    next(iter(call))  # type: ignore[call-overload]
                ready.release()

            threading.Thread(target=first, daemon=True).start()
        for _ in calls:
            assert ready.acquire(timeout=30), "a stream never became ready"
        channel.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousands_of_streams_dropped_abruptly_leave_memory_bounded(
    data_dir: Path, database_url: str
) -> None:
    replica = Replica(data_dir, database_url, 0)
    room = Participants(cast(ServerThread, replica))
    try:
        tokens = [room.token(f"watcher-{n}") for n in range(STREAMS)]
        open_and_drop(replica.address, tokens[:200])  # warm-up: caches, pools, allocator arenas
        time.sleep(1.0)
        before = rss_kib(replica.process.pid)
        started = time.monotonic()
        open_and_drop(replica.address, tokens)
        elapsed = time.monotonic() - started
        time.sleep(2.0)  # past the listener grace: every presence is gone
        after = rss_kib(replica.process.pid)
        print(
            f"\n{STREAMS} streams opened and dropped in {elapsed:.1f}s; server RSS {before / 1024:.1f} MiB "
            f"before, {after / 1024:.1f} MiB after ({(after - before) / 1024:+.1f} MiB)"
        )
        assert after - before < 64 * 1024, "memory grew by more than 64 MiB"
        # Still serving, and nobody is listening any more: a request fails fast as not listening.
        md = room.auth("alice")
        room.stub.SetSecret(pb.SetSecretRequest(secret_id="alive", data=b"yes"), metadata=md)
        assert room.stub.GetSecret(pb.GetSecretRequest(secret_id="alive"), metadata=md).data == b"yes"
        try:
            room.stub.RequestSecret(
                pb.RequestSecretRequest(from_participant_id="watcher-7", url="u", timeout=5), metadata=md
            )
            raise AssertionError("a dropped watcher still counted as listening")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    finally:
        room.close()
        replica.stop()


def test_dropped_streams_leave_no_tasks_behind(server: ServerThread, room: Participants) -> None:
    async def tasks() -> int:
        return len(asyncio.all_tasks())

    open_and_drop(server.address, [room.token(f"w{n}") for n in range(20)])  # warm-up
    time.sleep(1.0)
    baseline = server.call(tasks())
    open_and_drop(server.address, [room.token(f"watcher-{n}") for n in range(500)])
    deadline = time.monotonic() + 10
    while (now := server.call(tasks())) > baseline + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now <= baseline + 5, f"{now - baseline} tasks left behind by 500 dropped streams"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GARBAGE = {
    "random bytes": bytes(range(256)) * 4,
    "http/1.1": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "preface then nonsense": PREFACE + b"\xff" * 100,
    "headers with broken hpack": PREFACE + frame(4, 0, 0, b"") + frame(1, 0x4 | 0x1, 1, b"\xff\xff\xff\xff"),
    "data on stream 0": PREFACE + frame(4, 0, 0, b"") + frame(0, 0x1, 0, b"x" * 50),
    "oversized frame length": PREFACE + frame(4, 0, 0, b"") + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",
    "settings with bad length": PREFACE + frame(4, 0, 0, b"\x00\x01\x00"),
    "window update of 0": PREFACE + frame(4, 0, 0, b"") + frame(8, 0, 0, b"\x00\x00\x00\x00"),
    "truncated preface": PREFACE[:10],
}


def test_malformed_bytes_and_frames_on_the_port_do_not_hurt_the_server(
    server: ServerThread, room: Participants
) -> None:
    host, port = server.address.rsplit(":", 1)
    for name, payload in GARBAGE.items():
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(payload)
            sock.settimeout(2)
            try:
                while sock.recv(4096):  # the server answers (GOAWAY) and closes, or just closes
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
        md = room.auth("alice")
        room.stub.SetSecret(pb.SetSecretRequest(secret_id="alive", data=name.encode()), metadata=md)
        got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="alive"), metadata=md)
        assert got.data == name.encode(), f"after {name!r}"


def hpack_string(data: bytes) -> bytes:
    """An HPACK string literal (no Huffman), its length as a 7-bit-prefix integer (RFC 7541 §5)."""
    n, out = len(data), bytearray()
    if n < 127:
        out.append(n)
    else:
        out.append(127)
        n -= 127
        while n >= 128:
            out.append(n % 128 + 128)
            n //= 128
        out.append(n)
    return bytes(out) + data


def grpc_headers(path: str, authority: str, token: str) -> bytes:
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"authorization", f"Bearer {token}".encode()),
    ]
    # 0x00: a literal field without indexing, with a literal name.
    return b"".join(b"\x00" + hpack_string(name) + hpack_string(value) for name, value in fields)


def local_subscriptions(server: ServerThread) -> dict[tuple[str, str], set[Subscription]]:
    """The in-process server's open streams (PgNotifier keeps them in a LocalNotifier)."""
    assert server.server is not None
    notifier: Any = server.server.requests._notifier
    return cast(
        dict[tuple[str, str], set[Subscription]], getattr(notifier, "_local", notifier)._subscriptions
    )


def test_a_watcher_that_never_reads_cannot_make_the_server_hold_events_without_bound(
    server: ServerThread, room: Participants, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw HTTP/2 client opens WatchRequests with a flow-control window of 0 and never grants
    more: the server can send it nothing. Requests to it pile up until the bound; then the
    subscription drops its backlog and stops queueing. A stream opened afterwards starts with
    every pending request: nothing is lost."""
    monkeypatch.setattr(Subscription, "MAX_UNDELIVERED", 8)
    host, port = server.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    settings = frame(4, 0, 0, struct.pack(">HI", 0x4, 0))  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    headers = frame(
        1,
        0x4,
        1,
        grpc_headers("/roomsecrets.v1.RoomSecrets/WatchRequests", server.address, room.token("bob")),
    )
    body = frame(0, 0x1, 1, b"\x00\x00\x00\x00\x00")  # one empty WatchRequestsRequest, end of stream
    sock.sendall(PREFACE + settings + headers + body)

    async def subscriptions() -> list[tuple[bool, int]]:
        subs = [s for subs in local_subscriptions(server).values() for s in subs]
        return [(s.overflowed, s.queued) for s in subs]

    deadline = time.monotonic() + 10
    while not server.call(subscriptions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.call(subscriptions()) == [(False, 0)]
    asked = [
        room.stub.RequestSecret.future(
            pb.RequestSecretRequest(from_participant_id="bob", url=f"https://x.example/{n}", timeout=60),
            metadata=room.auth("alice"),
        )
        for n in range(12)
    ]
    dropped = [(True, 1)]  # overflowed, and nothing queued but the end-of-stream marker
    while server.call(subscriptions()) != dropped and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    assert server.call(subscriptions()) == dropped, "the backlog was not dropped at the bound"
    sock.close()

    watch = room.stub.WatchRequests(pb.WatchRequestsRequest(), metadata=room.auth("bob"))
    urls = set()
    for event in watch:
        if event.HasField("ready"):
            break
        urls.add(event.secret_request.url)
    watch.cancel()  # type: ignore[no-untyped-call]
    assert urls == {f"https://x.example/{n}" for n in range(12)}
    for call in asked:
        call.cancel()  # type: ignore[no-untyped-call]


def test_a_stream_that_fell_behind_ends_with_resource_exhausted(
    server: ServerThread, room: Participants, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other half of the bound: once the reader catches up with the dropped backlog, its
    stream ends with RESOURCE_EXHAUSTED (reason WATCH_OVERFLOW) telling it to reconnect."""
    monkeypatch.setattr(Subscription, "MAX_UNDELIVERED", 4)
    assert server.server is not None
    requests = server.server.requests
    bob = server.server.verifier.verify(room.token("bob"))

    async def fall_behind() -> str:
        events = cast(AsyncGenerator[Any, None], requests.watch(bob))
        assert isinstance(await anext(events), WatchReady)
        (subscription,) = local_subscriptions(server)[(bob.room, bob.identity)]
        for n in range(5):  # published while the reader was busy elsewhere
            subscription.push(RequestClosed(f"r{n}", RequestState.CANCELLED, "test"))
        try:
            await anext(events)
        except ResourceExhausted as exc:
            return f"{exc.reason}: {exc.message}"
        finally:
            await events.aclose()
        raise AssertionError("the stream went on")

    assert server.call(fall_behind()).startswith(
        "WATCH_OVERFLOW: this stream fell 4 events behind; reconnect"
    )
