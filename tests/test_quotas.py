"""Quotas through the real server, on both stores: secrets and bytes per identity and per room,
pending requests asked and addressed, WatchRequests streams; what counts (every kind of row, and
whose); that a refused write writes nothing and disturbs no one else; and that the usage counters
stay exact under concurrency, across a restart, and from the first start after an upgrade."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
import pytest
from roomsecrets.project import ProjectSecretsClient
from roomsecrets.v1 import oauth_connectors_pb2 as cpb
from roomsecrets.v1 import oauth_connectors_pb2_grpc as cpb_grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.cli.main import build_parser
from roomsecrets_server.cli.operator import settings_from_args
from roomsecrets_server.config import Settings

from .harness import Participants, ServerThread, test_settings
from .oauth_provider import OAuthProvider
from .test_oauth import CLIENT_SECRET, REDIRECT, App, ask_in_background
from .test_project import TEMPLATE
from .test_requests import Watcher, error_reason

# Small enough to reach in a test; each distinct, so a message's number names one limit.
SMALL = {
    "max_secrets_per_identity": 3,
    "max_bytes_per_identity": 100,
    "max_secrets_per_room": 5,
    "max_bytes_per_room": 170,
    "max_pending_asked": 2,
    "max_pending_addressed": 3,
    "max_watch_streams": 2,
    "max_manifest_bytes_per_project": 400_000,
}
# For rows larger than SMALL's bytes allow (connectors and token sets are a few hundred bytes).
ROOMY_BYTES = {"max_bytes_per_identity": 2**20, "max_bytes_per_room": 2**20}
VALUE = b"v-quota-7f3a"  # 12 bytes; never in a message or an audit line
Metadata = tuple[tuple[str, str], ...]


def start(data_dir: Path, database_url: str, **overrides: Any) -> ServerThread:
    return ServerThread(test_settings(data_dir, database_url=database_url, **{**SMALL, **overrides})).start()


@pytest.fixture
def small(data_dir: Path, database_url: str) -> Iterator[Participants]:
    server = start(data_dir, database_url)
    room = Participants(server)
    yield room
    room.close()
    server.stop()


@pytest.fixture
def futures() -> Iterator[list[grpc.Future[pb.RequestSecretResponse]]]:
    made: list[grpc.Future[pb.RequestSecretResponse]] = []
    yield made
    for future in made:
        future.cancel()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.cancel()


def put(
    room: Participants, md: Metadata, secret_id: str, data: bytes = VALUE, **fields: Any
) -> pb.SecretInfo:
    reply = room.stub.SetSecret(pb.SetSecretRequest(secret_id=secret_id, data=data, **fields), metadata=md)
    return reply.secret


def refused(call: Callable[[], object], flag: str, value: int) -> grpc.RpcError:
    """`call` fails as quota_refusal describes."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return quota_refusal(caught.value, flag, value)


def quota_refusal(err: grpc.RpcError | None, flag: str, value: int) -> grpc.RpcError:
    """RESOURCE_EXHAUSTED / QUOTA_EXCEEDED, naming the limit's flag, its environment variable and
    its value, and no secret value."""
    assert err is not None, "not refused"
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert error_reason(err) == "QUOTA_EXCEEDED"
    details = err.details() or ""
    assert (
        f"serve flag --{flag}," in details and f"ROOMSECRETS_{flag.upper().replace('-', '_')}" in details
    ), details
    assert f"at most {value} " in details, details
    assert VALUE.decode() not in details
    return err


def ids(room: Participants, md: Metadata) -> set[str]:
    reply = room.stub.ListSecrets(pb.ListSecretsRequest(page_size=1000), metadata=md)
    return {s.id for s in reply.secrets}


def ask(
    room: Participants, asker: str, target: str, url: str, timeout: int = 300
) -> grpc.Future[pb.RequestSecretResponse]:
    """RequestSecret, not waited for; long enough that it never expires while a test looks."""
    request = pb.RequestSecretRequest(from_participant_id=target, url=url, timeout=timeout)
    future: grpc.Future[pb.RequestSecretResponse] = room.stub.RequestSecret.future(
        request, metadata=room.auth(asker), timeout=timeout + 5
    )
    return future


# -- what the database holds ---------------------------------------------------------------------
def query(server: ServerThread, sql: str) -> list[tuple[Any, ...]]:
    """Run `sql` on the server's database, directly (the server may be stopped)."""
    url = server.settings.database_url
    if url:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql.encode())
            return [tuple(row) for row in cur.fetchall()] if cur.description else []
    lite = sqlite3.connect(server.settings.database_path, isolation_level=None)
    try:
        return lite.execute(sql).fetchall()
    finally:
        lite.close()


def counters(
    server: ServerThread,
) -> tuple[dict[tuple[str, str], tuple[int, int]], dict[str, tuple[int, int]]]:
    """The usage counters, per (room, owner) and per room (those at zero left out)."""
    owners = query(server, "SELECT room, owner, secrets, bytes FROM secret_usage")
    rooms = query(server, "SELECT room, secrets, bytes FROM room_usage")
    assert all(b == 0 for _, _, s, b in owners if s == 0) and all(b == 0 for _, s, b in rooms if s == 0)
    return (
        {(r, o): (int(s), int(b)) for r, o, s, b in owners if s},
        {r: (int(s), int(b)) for r, s, b in rooms if s},
    )


def recount(
    server: ServerThread,
) -> tuple[dict[tuple[str, str], tuple[int, int]], dict[str, tuple[int, int]]]:
    """What the counters must say: the rows of every participant room, counted."""
    owners = query(
        server, "SELECT room, owner, count(*), sum(size) FROM secrets WHERE room <> '' GROUP BY room, owner"
    )
    rooms = query(server, "SELECT room, count(*), sum(size) FROM secrets WHERE room <> '' GROUP BY room")
    return {(r, o): (int(n), int(b)) for r, o, n, b in owners}, {r: (int(n), int(b)) for r, n, b in rooms}


def usage_of(server: ServerThread, owner: str) -> tuple[int, int]:
    """`owner`'s counters in room-1 (the only room of that name in these tests)."""
    found = [v for (room, o), v in counters(server)[0].items() if o == owner and room.endswith("/room-1")]
    return found[0] if found else (0, 0)


def test_every_limit_is_a_serve_flag_and_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings(data_dir=Path("d"))
    flags = [a for n, name in enumerate(SMALL) for a in (f"--{name.replace('_', '-')}", str(n + 1))]
    given = settings_from_args(build_parser().parse_args(["serve", *flags]))
    assert [getattr(given, name) for name in SMALL] == list(range(1, len(SMALL) + 1))
    for name in SMALL:
        monkeypatch.setenv(f"ROOMSECRETS_{name.upper()}", "77")
    from_env = settings_from_args(build_parser().parse_args(["serve"]))
    assert all(getattr(from_env, name) == 77 != getattr(defaults, name) for name in SMALL)
    with pytest.raises(ValueError, match="max_watch_streams"):
        dataclasses.replace(defaults, max_watch_streams=0).check()


# -- secrets and bytes -----------------------------------------------------------------------------
def test_secrets_per_identity(small: Participants) -> None:
    alice, bob = small.auth("alice"), small.auth("bob")
    for n in range(3):
        put(small, alice, f"s{n}")
    err = refused(lambda: put(small, alice, "s3"), "max-secrets-per-identity", 3)
    assert "'alice'" in (err.details() or "")
    assert ids(small, alice) == {"s0", "s1", "s2"}  # the refused write wrote nothing
    # At the limit, replacing (same size, smaller) still works, and nothing else is disturbed:
    put(small, alice, "s0", VALUE)
    put(small, alice, "s1", b"short")
    put(small, bob, "b0")
    alice_in_room_2 = Participants(small.server, room="room-2")
    try:
        for n in range(3):
            put(alice_in_room_2, alice_in_room_2.auth("alice"), f"s{n}")
    finally:
        alice_in_room_2.close()
    assert small.stub.GetSecret(pb.GetSecretRequest(secret_id="s0"), metadata=alice).data == VALUE
    # A delete frees its row.
    small.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="s2"), metadata=alice)
    put(small, alice, "s3")
    refused(lambda: put(small, alice, "s4"), "max-secrets-per-identity", 3)


def test_bytes_per_identity(small: Participants) -> None:
    alice = small.auth("alice")
    put(small, alice, "big", b"x" * 60)
    put(small, alice, "rest", b"y" * 40)  # 100: exactly the limit
    refused(lambda: put(small, alice, "one-more", b"z"), "max-bytes-per-identity", 100)
    # Growing a value is refused and leaves it as it was; shrinking frees bytes.
    refused(lambda: put(small, alice, "big", b"x" * 61), "max-bytes-per-identity", 100)
    assert small.stub.GetSecret(pb.GetSecretRequest(secret_id="big"), metadata=alice).data == b"x" * 60
    put(small, alice, "big", b"x" * 50)
    put(small, alice, "one-more", b"z" * 10)
    assert usage_of(small.server, "alice") == (3, 100)


def test_secrets_and_bytes_per_room(small: Participants) -> None:
    alice, bob, carol = small.auth("alice"), small.auth("bob"), small.auth("carol")
    for n in range(3):
        put(small, alice, f"a{n}")
    put(small, bob, "b0")
    put(small, bob, "b1")
    refused(lambda: put(small, carol, "c0"), "max-secrets-per-room", 5)
    other_room = Participants(small.server, room="room-2")
    try:
        put(other_room, other_room.auth("carol"), "c0")  # another room is another count
    finally:
        other_room.close()
    small.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="b1"), metadata=bob)
    # Bytes: 3 x 12 + 12 = 48 in the room; carol's 90 make 138 (of 170); bob may own 100.
    put(small, carol, "c0", b"c" * 90)
    refused(lambda: put(small, bob, "b0", b"b" * 45), "max-bytes-per-room", 170)
    put(small, bob, "b0", b"b" * 44)  # exactly 170


def test_an_admin_writing_for_another_identity_uses_that_identitys_quota(small: Participants) -> None:
    admin = small.auth("installer", admin=True)
    for n in range(3):
        put(small, admin, f"k{n}", for_identity="svc")
    refused(lambda: put(small, small.auth("svc"), "own"), "max-secrets-per-identity", 3)
    put(small, admin, "mine")  # the admin's own quota is untouched
    assert usage_of(small.server, "svc") == (3, 3 * len(VALUE))


# -- requests --------------------------------------------------------------------------------------
def test_an_answer_counts_against_the_asked_identity(
    small: Participants, watchers: list[Watcher], futures: list[grpc.Future[pb.RequestSecretResponse]]
) -> None:
    """ProvideSecret stores the answer as the asked identity's row: it counts against that
    identity, who chose to answer and may delete it; refused, the request stays pending."""
    bob = small.auth("bob")
    for n in range(3):
        put(small, bob, f"b{n}")
    watcher = Watcher(small, "bob")
    watchers.append(watcher)
    futures.append(asked := ask(small, "alice", "bob", "https://git.example/repo.git"))
    request = watcher.wait_for(lambda e: e.HasField("secret_request")).secret_request
    answer = pb.ProvideSecretRequest(request_id=request.request_id, data=VALUE)
    refused(lambda: small.stub.ProvideSecret(answer, metadata=bob), "max-secrets-per-identity", 3)
    assert not asked.done() and usage_of(small.server, "alice") == (0, 0)
    small.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="b0"), metadata=bob)
    small.stub.ProvideSecret(answer, metadata=bob)
    assert asked.result(timeout=10).data == VALUE
    assert usage_of(small.server, "bob") == (3, 3 * len(VALUE))


def test_pending_requests_asked_and_addressed(
    small: Participants, watchers: list[Watcher], futures: list[grpc.Future[pb.RequestSecretResponse]]
) -> None:
    bob = Watcher(small, "bob")
    watchers.append(bob)
    futures.extend(ask(small, "alice", "bob", f"https://a.example/{n}") for n in range(2))
    bob.wait_for(lambda e: len(bob.requests()) == 2)
    refused(lambda: ask(small, "alice", "bob", "https://a.example/2").result(10), "max-pending-asked", 2)
    futures.append(ask(small, "carol", "bob", "https://c.example/0"))  # carol's own count; bob's 3rd
    bob.wait_for(lambda e: len(bob.requests()) == 3)
    refused(lambda: ask(small, "dave", "bob", "https://d.example/0").result(10), "max-pending-addressed", 3)
    # Alice may still ask others, and again once one of hers is answered.
    erin = Watcher(small, "erin")
    watchers.append(erin)
    refused(lambda: ask(small, "alice", "erin", "https://a.example/e").result(10), "max-pending-asked", 2)
    first = bob.requests()[0]
    small.stub.RejectSecret(pb.RejectSecretRequest(request_id=first.request_id), metadata=small.auth("bob"))
    futures.append(ask(small, "alice", "erin", "https://a.example/e"))
    erin.wait_for(lambda e: len(erin.requests()) == 1)
    time.sleep(0.3)
    assert len(bob.requests()) == 3, "a refused request reached the asked participant"


def test_four_hundred_concurrent_requests_at_one_human_are_refused_past_the_limit(
    room: Participants, watchers: list[Watcher], futures: list[grpc.Future[pb.RequestSecretResponse]]
) -> None:
    """The review's scenario, with the defaults a deployment keeps: 400 concurrent RequestSecret
    calls from one participant to one human. 32 (--max-pending-asked) reach the human; the other
    368 fail at once."""
    bob = Watcher(room, "bob")
    watchers.append(bob)
    futures.extend(ask(room, "alice", "bob", f"https://flood.example/{n}") for n in range(400))
    deadline = time.monotonic() + 20
    while (sum(f.done() for f in futures) < 368 or len(bob.requests()) < 32) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # any request past the limit would have reached bob by now
    assert len(bob.requests()) == 32, f"{len(bob.requests())} of 400 requests reached the human"
    done = [f for f in futures if f.done()]
    assert len(done) == 368
    for future in done:
        quota_refusal(cast(grpc.RpcError, future.exception()), "max-pending-asked", 32)


def test_watch_streams_per_identity(small: Participants, watchers: list[Watcher]) -> None:
    watchers.extend(Watcher(small, "bob") for _ in range(2))
    third = Watcher(small, "bob")
    watchers.append(third)
    assert third.ended.wait(5) and third.error is not None
    quota_refusal(third.error, "max-watch-streams", 2)
    assert all(w.error is None for w in watchers[:2]), "the open streams were disturbed"
    watchers.append(Watcher(small, "alice"))  # others are not affected
    assert watchers[-1].error is None
    watchers[0].cancel()
    deadline = time.monotonic() + 5
    while True:  # the server sees the cancel shortly after
        again = Watcher(small, "bob")
        watchers.append(again)
        if again.error is None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again.error is None


# -- what counts ---------------------------------------------------------------------------------
def test_connectors_and_template_variables_count(data_dir: Path, database_url: str) -> None:
    """Server-held rows in a room count too: OAuth connectors (owner "", the room's) and a
    ServiceTemplate's obscure variables (the service identity's)."""
    server = start(data_dir, database_url, **ROOMY_BYTES)
    small = Participants(server)
    try:
        connectors_and_template_variables(small)
    finally:
        small.close()
        server.stop()


def connectors_and_template_variables(small: Participants) -> None:
    connectors = cpb_grpc.OAuthConnectorsStub(small.channel)
    admin = small.auth("admin", admin=True)
    config = pb.OAuthClientConfig(
        client_id="app",
        client_secret="client-secret-5e6f",
        authorization_endpoint="https://auth.example/authorize",
        token_endpoint="https://auth.example/token",
    )
    for n in range(3):
        connectors.SetConnector(cpb.SetConnectorRequest(name=f"c{n}", client=config), metadata=admin)
    err = refused(
        lambda: connectors.SetConnector(cpb.SetConnectorRequest(name="c3", client=config), metadata=admin),
        "max-secrets-per-identity",
        3,
    )
    assert "OAuth connectors" in (err.details() or "")
    connectors.DeleteConnector(cpb.DeleteConnectorRequest(name="c2"), metadata=admin)

    project = ProjectSecretsClient(small.server.address, small.token("ops", project_role="admin", admin=True))
    try:
        project.apply_service(TEMPLATE)  # room "": a project record, not counted
        for n in range(3):
            put(small, small.auth("chat"), f"own-{n}")
        with pytest.raises(Exception, match="max-secrets-per-identity"):
            project.resolve_service("chat", {"api_key": "k-1"})  # chat.api_key: chat's 4th row
        small.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="own-2"), metadata=small.auth("chat"))
        project.resolve_service("chat", {"api_key": "k-1"})
        assert usage_of(small.server, "chat") == (3, 2 * len(VALUE) + 3)
        assert project.resolve_service("chat").environment["API_KEY"] == "k-1"
    finally:
        project.close()
    refused(lambda: put(small, small.auth("alice"), "a0"), "max-secrets-per-room", 5)  # 2 + 3
    assert counters(small.server) == recount(small.server)


def test_an_oauth_token_set_counts_against_the_asked_identity(data_dir: Path, database_url: str) -> None:
    with OAuthProvider() as provider:
        provider.register_client("app", CLIENT_SECRET, [REDIRECT], scope="read write")
        server = start(
            data_dir, database_url, egress_allow=(provider.base_url.removeprefix("http://"),), **ROOMY_BYTES
        )
        room = Participants(server)
        app = App(room, provider)
        try:
            for n in range(3):
                put(room, room.auth("bob"), f"b{n}")
            thread, result = ask_in_background(room, provider)
            request = app.next_request()
            refused(lambda: app.provide(request), "max-secrets-per-identity", 3)
            room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="b0"), metadata=room.auth("bob"))
            app.provide(app.next_request())  # still pending: authorize again, a new code
            thread.join(20)
            assert isinstance(result[0], pb.RequestOAuthTokenResponse), result
            assert usage_of(server, "bob")[0] == 3
        finally:
            app.watcher.cancel()
            room.close()
            server.stop()


# -- the counters ----------------------------------------------------------------------------------
def test_counters_stay_exact_under_concurrent_writes_and_never_overshoot(
    data_dir: Path, database_url: str
) -> None:
    server = start(
        data_dir, database_url, max_secrets_per_identity=40, max_secrets_per_room=1000, **ROOMY_BYTES
    )
    room = Participants(server)
    try:
        alice = room.auth("alice")

        def write(n: int) -> bool:
            try:
                put(room, alice, f"s{n}", VALUE[: n % 12 + 1])
                return True
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                return False

        def churn(n: int) -> None:  # others write, grow, shrink and delete meanwhile
            md = room.auth(f"p{n % 4}")
            put(room, md, f"x{n}", b"x" * (n % 7 + 1))
            put(room, md, f"x{n}", b"x" * (n % 5 + 1))
            if n % 3 == 0:
                room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id=f"x{n}"), metadata=md)

        with ThreadPoolExecutor(16) as pool:
            churned = pool.map(churn, range(60))
            written = list(pool.map(write, range(100)))
            list(churned)
        assert sum(written) == 40, "the per-identity limit was overshot or undershot"
        assert counters(server) == recount(server)
    finally:
        room.close()
        server.stop()


def test_counters_survive_a_restart(data_dir: Path, database_url: str) -> None:
    server = start(data_dir, database_url)
    room = Participants(server)
    for n in range(3):
        put(room, room.auth("alice"), f"s{n}")
    before = counters(server)
    room.close()
    server.stop()
    server = start(data_dir, database_url)
    room = Participants(server)
    try:
        assert counters(server) == before == recount(server)
        refused(lambda: put(room, room.auth("alice"), "s3"), "max-secrets-per-identity", 3)
    finally:
        room.close()
        server.stop()


def downgrade(server: ServerThread) -> None:
    """Take the database back to the schema before usage counters: no counter tables, triggers
    or functions (and, on PostgreSQL, schema version 5)."""
    if server.settings.database_url:
        statements = [
            "DROP TRIGGER secrets_usage_insert ON secrets",
            "DROP TRIGGER secrets_usage_delete ON secrets",
            "DROP TRIGGER secrets_usage_update ON secrets",
            "DROP FUNCTION roomsecrets_secrets_usage()",
            "DROP FUNCTION roomsecrets_count(TEXT, TEXT, BIGINT, BIGINT)",
            "DROP FUNCTION roomsecrets_cap(TEXT)",
            "DROP TABLE secret_usage",
            "DROP TABLE room_usage",
            "DROP INDEX requests_pending_by_requester",
            "DELETE FROM schema_migrations WHERE version = 6",
        ]
    else:
        statements = [
            "DROP TRIGGER secrets_usage_insert",
            "DROP TRIGGER secrets_usage_delete",
            "DROP TRIGGER secrets_usage_update",
            "DROP TABLE secret_usage",
            "DROP TABLE room_usage",
            "DROP INDEX requests_pending_by_requester",
        ]
    for statement in statements:
        query(server, statement)


COPY_OF_S0 = (
    "INSERT INTO secrets SELECT room, owner, delegated_to, 'NEW_ID', type, '', etag, crc32c, size, kek_id, "
    "sealed, update_time, kind FROM secrets WHERE secret_id = 's0'"
)


def test_counters_are_right_at_the_first_start_after_an_upgrade(data_dir: Path, database_url: str) -> None:
    """A database written before usage counters existed: the first start counts its rows."""
    server = start(data_dir, database_url)
    room = Participants(server)
    put(room, room.auth("alice"), "s0")
    put(room, room.auth("bob"), "b0", b"b" * 30)
    room.close()
    server.stop()
    downgrade(server)
    # Rows written by the old schema, which no trigger counted: two more of alice's.
    for copy in ("s1", "s2"):
        query(server, COPY_OF_S0.replace("NEW_ID", copy))
    server = start(data_dir, database_url)
    room = Participants(server)
    try:
        assert counters(server) == recount(server)
        assert usage_of(server, "alice") == (3, 3 * len(VALUE)) and usage_of(server, "bob") == (1, 30)
        refused(lambda: put(room, room.auth("alice"), "s3"), "max-secrets-per-identity", 3)
        room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="s0"), metadata=room.auth("alice"))
        put(room, room.auth("alice"), "s3")
        assert counters(server) == recount(server)
    finally:
        room.close()
        server.stop()


def test_refusals_are_audited_and_never_show_a_value(
    small: Participants, watchers: list[Watcher], futures: list[grpc.Future[pb.RequestSecretResponse]]
) -> None:
    alice, bob = small.auth("alice"), small.auth("bob")
    secret = b"do-not-echo-0x5eed"
    for n in range(3):
        put(small, alice, f"s{n}")
    for n in range(2):
        put(small, bob, f"b{n}")  # the room's 5th
    refused(lambda: put(small, alice, "s3", secret), "max-secrets-per-identity", 3)
    refused(lambda: put(small, alice, "s0", secret * 10), "max-bytes-per-identity", 100)
    watchers.extend(Watcher(small, "bob") for _ in range(3))  # the third is refused
    futures.extend(ask(small, "alice", "bob", f"https://x.example/{n}") for n in range(2))
    watchers[0].wait_for(lambda e: len(watchers[0].requests()) == 2)
    refused(lambda: ask(small, "alice", "bob", "https://x.example/2").result(10), "max-pending-asked", 2)
    answer = pb.ProvideSecretRequest(request_id=watchers[0].requests()[0].request_id, data=secret)
    refused(lambda: small.stub.ProvideSecret(answer, metadata=bob), "max-secrets-per-room", 5)
    time.sleep(0.2)
    audit = small.server.settings.audit_log_path.read_bytes()
    assert secret not in audit and VALUE not in audit
    lines = [json.loads(line) for line in audit.splitlines()]
    refusals = sorted(line["action"] for line in lines if line["outcome"] == "quota_exceeded")
    assert refusals == ["provide_secret", "request_secret", "set_secret", "set_secret", "watch_requests"]


def test_concurrent_requests_by_many_threads_never_pass_the_limit(
    small: Participants, watchers: list[Watcher], futures: list[grpc.Future[pb.RequestSecretResponse]]
) -> None:
    bob = Watcher(small, "bob")
    watchers.append(bob)
    lock = threading.Lock()
    with ThreadPoolExecutor(8) as pool:

        def fire(n: int) -> None:
            future = ask(small, f"asker-{n % 4}", "bob", f"https://many.example/{n}")
            with lock:
                futures.append(future)

        list(pool.map(fire, range(40)))
    deadline = time.monotonic() + 30
    while sum(f.done() for f in futures) < 37 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sum(f.done() for f in futures) == 37
    time.sleep(0.3)
    assert len(bob.requests()) == 3  # --max-pending-addressed


def test_a_projects_manifests_are_bounded(data_dir: Path, database_url: str) -> None:
    """Project records had no limit: a developer applied 100 manifests of 244 KB, and every
    ListServices then failed (its reply past the message limit) and stalled the server for 14 s.
    The manifests of a project are bounded together (--max-manifest-bytes-per-project)."""
    server = start(data_dir, database_url, max_manifest_bytes_per_project=100_000)
    room = Participants(server)
    dev = ProjectSecretsClient(server.address, room.token("dev", project_role="developer"))
    try:
        env = "".join(f'    - {{name: V{i}, value: "{"y" * 2000}"}}\n' for i in range(20))  # ~41 KB each

        def manifest(n: int) -> str:
            head = f"version: v1\nkind: Service\nmetadata: {{name: flood{n}}}\ncontainer:\n  image: x\n"
            return head + "  environment:\n" + env

        dev.apply_service(manifest(0))
        dev.apply_service(manifest(1))
        with pytest.raises(Exception, match="max-manifest-bytes-per-project") as err:
            dev.apply_service(manifest(2))
        assert "RESOURCE_EXHAUSTED" in str(err.value)
        dev.apply_service(manifest(1))  # replacing one is not growth
        assert [s.name for s in dev.list_services()] == ["flood0", "flood1"]
        dev.delete_service("flood1")
        dev.apply_service(manifest(2))
    finally:
        dev.close()
        room.close()
        server.stop()
