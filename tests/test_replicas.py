"""Several replicas on one PostgreSQL database: three real `roomsecrets serve` processes sharing a
data dir's keys (keyring and token key) and one database, with requests and answers crossing
them, exactly-once expiry and cancellation, and faults (a replica killed, PostgreSQL restarted)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar, cast

import grpc
import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.config import Settings
from roomsecrets_server.requests.pg_notifier import PgNotifier

from .harness import Participants, ServerThread, test_settings
from .postgres import PostgresCluster
from .test_requests import Watcher, error_reason
from .test_requests import ask as ask_one

pytestmark = pytest.mark.postgres_only

COMMAND = [sys.executable, "-m", "roomsecrets_server.cli.main"]
URL = "https://git.example/repo.git"
T = TypeVar("T")


class Replica:
    """One `roomsecrets serve` process; `address` and `settings` as Participants expects."""

    def __init__(self, data_dir: Path, database_url: str, index: int) -> None:
        self.index = index
        self.audit_log = data_dir / f"audit-{index}.log"
        self.settings = Settings(data_dir=data_dir, database_url=database_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMSECRETS_")}
        env["ROOMSECRETS_DATABASE_URL"] = database_url  # not on the command line: `ps` shows those
        self.process = subprocess.Popen(
            [
                *COMMAND, "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
                "--listener-grace", "0.5", "--sweep-interval", "0.2", "--shutdown-grace", "1",
                "--audit-log", str(self.audit_log), "--no-uvloop",
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.log: list[str] = []
        ready = threading.Event()
        self.address = ""

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = re.search(r"serving on (127\.0\.0\.1:\d+) ", line)
                if match:
                    self.address = match.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(30) and self.address, f"replica {index} did not start: {''.join(self.log)}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def audit(self) -> list[dict[str, object]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]


class Cluster:
    def __init__(self, data_dir: Path, database_url: str, count: int) -> None:
        self.data_dir, self.database_url = data_dir, database_url
        self.replicas: list[Replica] = []
        self.rooms: list[Participants] = []
        for _ in range(count):
            self.add()

    def add(self) -> Participants:
        # The first replica creates the keyring and token key; the others read the same files.
        replica = Replica(self.data_dir, self.database_url, len(self.replicas))
        self.replicas.append(replica)
        # Participants needs only `address` and `settings`, which a Replica has too.
        self.rooms.append(Participants(cast(ServerThread, replica)))
        return self.rooms[-1]

    def close(self) -> None:
        for room in self.rooms:
            room.close()
        for replica in self.replicas:
            replica.stop()

    def audit(self) -> list[dict[str, object]]:
        return [entry for replica in self.replicas for entry in replica.audit()]


@pytest.fixture
def cluster(data_dir: Path, database_url: str) -> Iterator[Cluster]:
    running = Cluster(data_dir, database_url, 3)
    yield running
    running.close()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.cancel()


def ask(
    room: Participants, asker: str = "alice", target: str = "bob", **fields: object
) -> pb.RequestSecretResponse:
    fields.setdefault("timeout", 20)  # three processes share two cores: more slack than one server
    return ask_one(room, asker, target, **fields)


def in_background(call: Callable[[], T]) -> Future[T]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def provide(room: Participants, request_id: str, value: bytes, identity: str = "bob") -> None:
    room.stub.ProvideSecret(
        pb.ProvideSecretRequest(request_id=request_id, data=value), metadata=room.auth(identity)
    )


def eventually(check: Callable[[], T], timeout: float = 20) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (grpc.RpcError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- requests and answers crossing replicas --------------------------------------------------------
def test_request_made_on_b_reaches_a_watcher_on_a_and_an_answer_on_c_completes_it(
    cluster: Cluster, watchers: list[Watcher]
) -> None:
    a, b, c = cluster.rooms
    bob = Watcher(a, "bob")
    watchers.append(bob)
    waiting = in_background(lambda: ask(b, type="git", delegate_to="alice"))
    inbound = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
    assert (inbound.requested_by, inbound.url, inbound.type) == ("alice", URL, "git")
    provide(c, inbound.request_id, b"cross-replica-token")
    reply = waiting.result(20)
    assert reply.data == b"cross-replica-token" and reply.request_id == inbound.request_id
    assert bob.closed(inbound.request_id).state == pb.REQUEST_STATE_PROVIDED
    # Stored once, readable through any replica.
    for room in cluster.rooms:
        got = room.stub.GetSecret(
            pb.GetSecretRequest(type="git", name=URL, delegated_to="alice"), metadata=room.auth("bob")
        )
        assert got.data == b"cross-replica-token"


def test_a_rejection_on_another_replica_fails_the_waiting_call_with_its_reason(
    cluster: Cluster, watchers: list[Watcher]
) -> None:
    a, b, _ = cluster.rooms
    bob = Watcher(a, "bob")
    watchers.append(bob)
    waiting = in_background(lambda: ask(b))
    inbound = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
    a.stub.RejectSecret(
        pb.RejectSecretRequest(request_id=inbound.request_id, error="not for you"), metadata=a.auth("bob")
    )
    with pytest.raises(grpc.RpcError) as caught:
        waiting.result(20)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not for you" in (caught.value.details() or "")
    assert error_reason(caught.value) == "REQUEST_REJECTED"


def test_presence_is_seen_across_replicas(cluster: Cluster, watchers: list[Watcher]) -> None:
    a, b, _ = cluster.rooms
    # Nobody listening anywhere: fails fast, after the listener grace.
    with pytest.raises(grpc.RpcError) as caught:
        ask(b, target="carol")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "NOT_LISTENING"
    # Carol starts listening on A while B's request waits out its grace: B sees her.
    carol_later = threading.Timer(0.2, lambda: watchers.append(Watcher(a, "carol")))
    carol_later.start()
    waiting = in_background(lambda: ask(b, target="carol", timeout=3))
    carol_later.join()
    carol = watchers[-1]
    inbound = carol.wait_for(lambda e: e.HasField("secret_request")).secret_request
    provide(a, inbound.request_id, b"late-but-fine", identity="carol")
    assert waiting.result(20).data == b"late-but-fine"


def test_unanswered_requests_expire_exactly_once_with_three_replicas_sweeping(
    cluster: Cluster, watchers: list[Watcher]
) -> None:
    rooms = cluster.rooms
    bob = Watcher(rooms[0], "bob")
    watchers.append(bob)
    asks = [(room, f"https://x.example/{n}") for n, room in enumerate(rooms * 2)]
    calls = [in_background(functools.partial(ask, room, url=url, timeout=1)) for room, url in asks]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call.result(30)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    request_ids = {r.request_id for r in bob.requests()}
    assert len(request_ids) == len(asks)
    for request_id in request_ids:
        assert bob.closed(request_id).state == pb.REQUEST_STATE_EXPIRED
    time.sleep(1.0)  # every replica's sweeper has run several times since
    closed = [e.request_closed.request_id for e in bob.events if e.HasField("request_closed")]
    assert sorted(closed) == sorted(request_ids), "each request is closed once, on the stream too"
    expired = [e for e in cluster.audit() if e.get("outcome") == "expired"]
    assert sorted(str(e["request_id"]) for e in expired) == sorted(request_ids)


def test_a_cancelled_call_cancels_the_request_once_for_a_watcher_on_another_replica(
    cluster: Cluster, watchers: list[Watcher]
) -> None:
    a, b, _ = cluster.rooms
    bob = Watcher(a, "bob")
    watchers.append(bob)
    call = b.stub.RequestSecret.future(
        pb.RequestSecretRequest(from_participant_id="bob", url=URL, timeout=60), metadata=b.auth("alice")
    )
    inbound = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
    call.cancel()  # type: ignore[no-untyped-call]
    assert bob.closed(inbound.request_id).state == pb.REQUEST_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as late:
        provide(a, inbound.request_id, b"too late")
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    time.sleep(0.5)
    cancelled = [e for e in cluster.audit() if e.get("outcome") == "cancelled"]
    assert [e["request_id"] for e in cancelled] == [inbound.request_id]


def test_exactly_one_of_racing_answers_on_different_replicas_wins(
    cluster: Cluster, watchers: list[Watcher]
) -> None:
    a, b, c = cluster.rooms
    bob = Watcher(a, "bob")
    watchers.append(bob)
    waiting = in_background(lambda: ask(b))
    inbound = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request

    def answer(room: Participants, value: bytes) -> str:
        try:
            provide(room, inbound.request_id, value)
            return "won"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
            return "lost"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(answer, [a, b, c] * 2, [bytes([65 + n]) for n in range(6)]))
    assert outcomes.count("won") == 1
    winner = bytes([65 + outcomes.index("won")])
    assert waiting.result(20).data == winner


# -- faults -----------------------------------------------------------------------------------------
def test_the_watchers_replica_killed_mid_request_the_answer_still_arrives(
    cluster: Cluster, watchers: list[Watcher]
) -> None:
    a, b, c = cluster.rooms
    bob = Watcher(a, "bob")
    watchers.append(bob)
    waiting = in_background(lambda: ask(b, timeout=30))
    first = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
    cluster.replicas[0].kill()
    assert bob.ended.wait(10) and bob.error is not None
    assert bob.error.code() == grpc.StatusCode.UNAVAILABLE
    # Bob reconnects to another replica: the pending request is waiting for him there.
    again = Watcher(c, "bob")
    watchers.append(again)
    inbound = again.wait_for(lambda e: e.HasField("secret_request")).secret_request
    assert inbound.request_id == first.request_id
    provide(c, inbound.request_id, b"after-the-crash")
    assert waiting.result(20).data == b"after-the-crash"


def test_the_requesters_replica_killed_the_request_survives_and_is_joined_on_another(
    cluster: Cluster, watchers: list[Watcher]
) -> None:
    a, b, c = cluster.rooms
    bob = Watcher(a, "bob")
    watchers.append(bob)
    lost = in_background(lambda: ask(b, timeout=30))
    first = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
    cluster.replicas[1].kill()
    with pytest.raises(grpc.RpcError) as caught:
        lost.result(10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # a clean error, not a hang
    time.sleep(1.0)  # no replica cancels it: the requester may still come back for the answer
    assert not any(e.HasField("request_closed") for e in bob.events)
    # Alice asks again through C: the same pending request, answered once.
    waiting = in_background(lambda: ask(c, timeout=30))
    time.sleep(0.5)
    provide(a, first.request_id, b"still-wanted")
    reply = waiting.result(20)
    assert reply.request_id == first.request_id and reply.data == b"still-wanted"


def test_postgres_restart_gives_unavailable_then_recovers_with_every_acknowledged_write(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    pg = PostgresCluster().init()  # its own cluster: this test stops it
    cluster = Cluster(tmp_path / "data", pg.create_database(), 2)
    try:
        a, b = cluster.rooms
        bob = Watcher(a, "bob")
        watchers.append(bob)
        acknowledged: dict[str, bytes] = {}
        stop_writing = threading.Event()
        failures: list[tuple[grpc.StatusCode, str]] = []

        def write() -> None:
            n = 0
            while not stop_writing.is_set():
                secret_id, value = f"w{n}", f"value-{n}".encode()
                try:
                    b.stub.SetSecret(
                        pb.SetSecretRequest(secret_id=secret_id, data=value),
                        metadata=b.auth("alice"),
                        timeout=5,
                    )
                    acknowledged[secret_id] = value
                except grpc.RpcError as err:
                    failures.append((err.code(), err.details() or ""))
                n += 1
                time.sleep(0.01)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.5)
        pg.stop("immediate")  # a crash: WAL replay on the next start
        time.sleep(1.5)
        with pytest.raises(grpc.RpcError) as caught:
            a.stub.GetSecret(pb.GetSecretRequest(secret_id="w0"), metadata=a.auth("alice"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "postgres" not in (caught.value.details() or "").lower()  # no URL, no user name
        pg.start()
        time.sleep(1.0)
        stop_writing.set()
        writer.join(30)
        assert failures, "writes during the outage failed"
        for code, details in failures:  # fast and clean: not a deadline, no value in the message
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "value-" not in details

        # Recovered by themselves: reads, writes, and the cross-replica request flow on the
        # WatchRequests stream bob opened before the restart.
        def every_write_is_there() -> None:
            for secret_id, value in acknowledged.items():
                got = a.stub.GetSecret(pb.GetSecretRequest(secret_id=secret_id), metadata=a.auth("alice"))
                assert got.data == value

        eventually(every_write_is_there)
        assert len(acknowledged) > 10
        waiting = in_background(lambda: ask(b))
        inbound = eventually(lambda: bob.wait_for(lambda e: e.HasField("secret_request"), timeout=1))
        provide(a, inbound.secret_request.request_id, b"after-restart")
        assert waiting.result(20).data == b"after-restart"
    finally:
        cluster.close()
        pg.destroy()


@pytest.mark.postgres_only
def test_a_notify_postgresql_refuses_does_not_stop_the_replicas_notifications(
    data_dir: Path, database_url: str, watchers: list[Watcher]
) -> None:
    """PostgreSQL refuses a NOTIFY payload over 8000 bytes. One such event (an oversized token
    once made one) used to end the replica's sending loop silently: from then on the other
    replicas heard nothing from it. Now only that payload is dropped."""
    a = ServerThread(test_settings(data_dir, database_url=database_url)).start()
    b = ServerThread(test_settings(data_dir, database_url=database_url)).start()  # same keys
    room_a, room_b = Participants(a), Participants(b)
    try:
        assert a.server is not None
        notifier = cast(PgNotifier, a.server.requests._notifier)

        async def refused() -> None:
            notifier.request_changed("x" * 9000)
            await asyncio.sleep(0.5)  # sent, and refused

        a.call(refused())
        bob = Watcher(room_b, "bob")
        watchers.append(bob)
        waiting = in_background(lambda: ask(room_a))  # opened on A: B hears it only by NOTIFY
        inbound = bob.wait_for(lambda e: e.HasField("secret_request")).secret_request
        provide(room_b, inbound.request_id, b"heard")
        assert waiting.result(20).data == b"heard"
    finally:
        room_a.close()
        room_b.close()
        a.stop()
        b.stop()
