"""OAuth end to end: the real server against a real OAuth 2.0 authorization server on loopback
(tests/oauth_provider.py: authlib, PKCE required, rotating refresh tokens, short-lived access
tokens), with a user agent that follows the authorization URL over HTTP to get the code."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from roomsecrets import AsyncSecretsClient, SecretsClient
from roomsecrets.types import ConnectorRef, OAuthClientConfig, OAuthTokenRequest
from roomsecrets.v1 import oauth_connectors_pb2 as cpb
from roomsecrets.v1 import oauth_connectors_pb2_grpc as cpb_grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc

from .harness import Participants, ServerThread, test_settings
from .oauth_provider import OAuthProvider
from .test_requests import Watcher, error_reason

REDIRECT = "https://app.example/oauth/callback"
CLIENT_SECRET = "client-secret-9f8e7d6c5b4a"


@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    with OAuthProvider(access_token_lifetime=2) as running:
        running.register_client("app", CLIENT_SECRET, [REDIRECT], scope="read write")
        yield running


def provider_allowed(provider: OAuthProvider) -> tuple[str, ...]:
    """The egress allow-list entry that lets the server reach the test provider on loopback: its
    port only, so every other loopback port stays refused."""
    return (provider.base_url.removeprefix("http://"),)


@pytest.fixture
def server(data_dir: Path, database_url: str, provider: OAuthProvider) -> Iterator[ServerThread]:
    running = ServerThread(
        test_settings(
            data_dir,
            oauth_refresh_margin=1.0,
            database_url=database_url,
            egress_allow=provider_allowed(provider),
        )
    ).start()
    yield running
    running.stop()


def client_config(provider: OAuthProvider, **overrides: object) -> pb.OAuthClientConfig:
    fields: dict[str, object] = {
        "client_id": "app",
        "client_secret": CLIENT_SECRET,
        "authorization_endpoint": provider.authorization_endpoint,
        "token_endpoint": provider.token_endpoint,
        "scopes": ["read", "write"],
    }
    fields.update(overrides)
    return pb.OAuthClientConfig(**fields)  # type: ignore[arg-type]


def fails(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, (
        f"expected {code}, got {caught.value.code()}: {caught.value.details()}"
    )
    return caught.value


class App:
    """The asked participant's app: watches its stream and lets the user agent authorize."""

    def __init__(self, room: Participants, provider: OAuthProvider, identity: str = "bob") -> None:
        self.room, self.provider, self.identity = room, provider, identity
        self.watcher = Watcher(room, identity)

    def next_request(self, after: int = 0) -> pb.OAuthRequest:
        event = self.watcher.wait_for(
            lambda e: e.HasField("oauth_request") and self._index(e) >= after, timeout=10
        )
        return event.oauth_request

    def _index(self, event: pb.WatchRequestsResponse) -> int:
        requests = [e for e in self.watcher.events if e.HasField("oauth_request")]
        return requests.index(event)

    def provide(self, request: pb.OAuthRequest, *, code: str | None = None, state: str | None = None) -> None:
        got_code, got_state = self.provider.authorize(request.authorization_url)
        self.room.stub.ProvideOAuthAuthorization(
            pb.ProvideOAuthAuthorizationRequest(
                request_id=request.request_id,
                code=got_code if code is None else code,
                state=got_state if state is None else state,
            ),
            metadata=self.room.auth(self.identity),
        )


def ask_in_background(
    room: Participants, provider: OAuthProvider, asker: str = "alice", **fields: object
) -> tuple[threading.Thread, list[object]]:
    fields.setdefault("oauth", client_config(provider))
    fields.setdefault("from_participant_id", "bob")
    fields.setdefault("redirect_uri", REDIRECT)
    fields.setdefault("delegate_to", asker)
    fields.setdefault("timeout", 15)
    result: list[object] = []

    def run() -> None:
        try:
            result.append(
                room.stub.RequestOAuthToken(
                    pb.RequestOAuthTokenRequest(**fields),  # type: ignore[arg-type]
                    metadata=room.auth(asker),
                    timeout=30,
                )
            )
        except grpc.RpcError as err:
            result.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def offline(room: Participants, identity: str, **fields: object) -> pb.GetOfflineOAuthTokenResponse:
    reply: pb.GetOfflineOAuthTokenResponse = room.stub.GetOfflineOAuthToken(
        pb.GetOfflineOAuthTokenRequest(**fields),  # type: ignore[arg-type]
        metadata=room.auth(identity),
    )
    return reply


def obtain(
    room: Participants, provider: OAuthProvider, app: App, after: int = 0
) -> pb.RequestOAuthTokenResponse:
    thread, result = ask_in_background(room, provider)
    app.provide(app.next_request(after))
    thread.join(20)
    reply = result[0]
    assert isinstance(reply, pb.RequestOAuthTokenResponse), reply
    return reply


# -- the delegated authorization-code flow ------------------------------------------------------
def test_request_provide_end_to_end(room: Participants, provider: OAuthProvider) -> None:
    app = App(room, provider)
    thread, result = ask_in_background(room, provider)
    inbound = app.next_request()
    # What the asked participant sees: everything to authorize, never the client secret.
    assert CLIENT_SECRET.encode() not in inbound.SerializeToString()
    assert (inbound.client_id, inbound.redirect_uri, inbound.requested_by, inbound.delegate_to) == (
        "app",
        REDIRECT,
        "alice",
        "alice",
    )
    query = {k: v[0] for k, v in parse_qs(urlsplit(inbound.authorization_url).query).items()}
    assert query["response_type"] == "code" and query["client_id"] == "app"
    assert query["code_challenge_method"] == "S256" and query["code_challenge"] == inbound.challenge
    assert query["state"] == inbound.state and query["scope"] == "read write"
    assert query["redirect_uri"] == REDIRECT
    app.provide(inbound)
    thread.join(20)
    reply = result[0]
    assert isinstance(reply, pb.RequestOAuthTokenResponse), reply
    issued = [t["access_token"] for t in provider.issued_tokens]
    assert reply.access_token == issued[-1] and reply.request_id == inbound.request_id
    assert list(reply.scopes) == ["read", "write"] and reply.expire_time.seconds > time.time()
    assert provider.token_requests["authorization_code"] == 1
    closed = app.watcher.closed(inbound.request_id)
    assert closed.state == pb.REQUEST_STATE_PROVIDED

    # Stored for bob, delegated to alice: alice reads it offline; asking again needs no prompt.
    again = offline(room, "alice", oauth=client_config(provider), delegated_by="bob")
    assert again.access_token == reply.access_token and not again.needs_reauthorization
    second = room.stub.RequestOAuthToken(
        pb.RequestOAuthTokenRequest(
            oauth=client_config(provider),
            from_participant_id="bob",
            redirect_uri=REDIRECT,
            delegate_to="alice",
        ),
        metadata=room.auth("alice"),
        timeout=10,
    )
    assert second.access_token == reply.access_token
    assert provider.token_requests["authorization_code"] == 1
    # Someone else in the room gets nothing from bob's token delegated to alice.
    assert not offline(room, "carol", oauth=client_config(provider), delegated_by="bob").HasField(
        "access_token"
    )
    # The token set is not readable as a plain secret (it holds the refresh token).
    listed = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("alice")).secrets
    assert [s.delegated_by for s in listed] == ["bob"]
    fails(
        lambda: room.stub.GetSecret(
            pb.GetSecretRequest(secret_id=listed[0].id, delegated_by="bob"), metadata=room.auth("alice")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def test_python_client_handler_hands_the_url_to_the_application(
    room: Participants, provider: OAuthProvider
) -> None:
    seen: list[str] = []

    def handler(request: object) -> str:
        url = request.authorization_url  # type: ignore[attr-defined]
        seen.append(url)
        code, _ = provider.authorize(url)
        return code

    address = room.server.address
    with (
        SecretsClient(address, room.token("bob"), oauth_token_request_handler=handler),
        SecretsClient(address, room.token("alice")) as alice,
    ):
        token = alice.request_oauth_token(
            oauth=OAuthClientConfig(
                client_id="app",
                client_secret=CLIENT_SECRET,
                authorization_endpoint=provider.authorization_endpoint,
                token_endpoint=provider.token_endpoint,
                scopes=("read",),
            ),
            from_participant_id="bob",
            redirect_uri=REDIRECT,
            delegate_to="alice",
            timeout=15,
        )
    assert token is not None and token == provider.issued_tokens[-1]["access_token"]
    assert len(seen) == 1 and seen[0].startswith(provider.authorization_endpoint)


def test_reject_fails_the_waiting_call_with_the_reason(room: Participants, provider: OAuthProvider) -> None:
    app = App(room, provider)
    thread, result = ask_in_background(room, provider)
    inbound = app.next_request()
    room.stub.RejectOAuthAuthorization(
        pb.RejectOAuthAuthorizationRequest(request_id=inbound.request_id, error="the user declined"),
        metadata=room.auth("bob"),
    )
    thread.join(20)
    err = result[0]
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the user declined" in str(err.details())
    assert provider.token_requests["authorization_code"] == 0


def test_wrong_or_reused_state_is_refused_and_the_request_stays_pending(
    room: Participants, provider: OAuthProvider
) -> None:
    app = App(room, provider)
    first = obtain(room, provider, app)
    first_state = app.next_request().state
    # A second request (new delegation) gets a fresh state; the old one is refused.
    thread, result = ask_in_background(room, provider, delegate_to="")
    inbound = app.next_request(after=1)
    assert inbound.state != first_state
    for wrong in (first_state, "forged-state"):
        err = fails(lambda s=wrong: app.provide(inbound, state=s), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[misc]
        assert "state" in str(err.details())
    app.provide(inbound)  # still pending: the right state completes it
    thread.join(20)
    assert (
        isinstance(result[0], pb.RequestOAuthTokenResponse) and result[0].access_token != first.access_token
    )


def test_bad_code_is_a_clear_provider_error_and_stores_nothing(
    room: Participants, provider: OAuthProvider
) -> None:
    app = App(room, provider)
    thread, result = ask_in_background(room, provider)
    inbound = app.next_request()
    err = fails(lambda: app.provide(inbound, code="not-a-real-code"), grpc.StatusCode.FAILED_PRECONDITION)
    assert "invalid_grant" in str(err.details()) and provider.token_endpoint in str(err.details())
    assert "not-a-real-code" not in str(err.details())
    assert error_reason(err) == "OAUTH_PROVIDER_ERROR"
    assert not offline(room, "alice", oauth=client_config(provider), delegated_by="bob").HasField(
        "access_token"
    )
    # The request is still pending; the user can retry and it completes.
    app.provide(inbound)
    thread.join(20)
    assert isinstance(result[0], pb.RequestOAuthTokenResponse)


def test_endpoint_outside_the_grant_is_denied(room: Participants, provider: OAuthProvider) -> None:
    grant = [{"endpoint": "https://accounts.example/*", "client_id": "app"}]
    md = room.auth("alice", request_oauth_token=grant)
    request = pb.RequestOAuthTokenRequest(
        oauth=client_config(provider), from_participant_id="bob", redirect_uri=REDIRECT
    )
    err = fails(lambda: room.stub.RequestOAuthToken(request, metadata=md), grpc.StatusCode.PERMISSION_DENIED)
    assert provider.authorization_endpoint in str(err.details()) and "'app'" in str(err.details())
    fails(
        lambda: room.stub.GetOfflineOAuthToken(
            pb.GetOfflineOAuthTokenRequest(oauth=client_config(provider)), metadata=md
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    allowed = [{"endpoint": provider.base_url + "/*", "client_id": "app"}]
    reply = room.stub.GetOfflineOAuthToken(
        pb.GetOfflineOAuthTokenRequest(oauth=client_config(provider)),
        metadata=room.auth("alice", request_oauth_token=allowed),
    )
    assert not reply.HasField("access_token")


def test_only_the_asked_participant_may_answer(room: Participants, provider: OAuthProvider) -> None:
    app = App(room, provider)
    thread, result = ask_in_background(room, provider)
    inbound = app.next_request()
    code, state = provider.authorize(inbound.authorization_url)
    for intruder in ("alice", "carol"):
        fails(
            lambda who=intruder: room.stub.ProvideOAuthAuthorization(  # type: ignore[misc]
                pb.ProvideOAuthAuthorizationRequest(request_id=inbound.request_id, code=code, state=state),
                metadata=room.auth(who),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        fails(
            lambda who=intruder: room.stub.RejectOAuthAuthorization(  # type: ignore[misc]
                pb.RejectOAuthAuthorizationRequest(request_id=inbound.request_id, error="x"),
                metadata=room.auth(who),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert provider.token_requests["authorization_code"] == 0  # the intruders' code was never exchanged
    app.provide(inbound)
    thread.join(20)
    assert isinstance(result[0], pb.RequestOAuthTokenResponse)


def test_unanswered_request_times_out(room: Participants, provider: OAuthProvider) -> None:
    app = App(room, provider)
    thread, result = ask_in_background(room, provider, timeout=1)
    inbound = app.next_request()
    thread.join(20)
    err = result[0]
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert app.watcher.closed(inbound.request_id).state == pb.REQUEST_STATE_EXPIRED


def test_nobody_listening_fails_fast(room: Participants, provider: OAuthProvider) -> None:
    request = pb.RequestOAuthTokenRequest(
        oauth=client_config(provider), from_participant_id="nobody", redirect_uri=REDIRECT, timeout=60
    )
    started = time.monotonic()
    err = fails(
        lambda: room.stub.RequestOAuthToken(request, metadata=room.auth("alice"), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "nobody" in str(err.details()) and time.monotonic() - started < 10


# -- offline tokens and refresh ----------------------------------------------------------------
def wait_until_due(reply: pb.RequestOAuthTokenResponse | pb.GetOfflineOAuthTokenResponse) -> None:
    # Lifetime 2 s, margin min(1 s, lifetime / 2): due one second before expiry.
    time.sleep(max(0.0, reply.expire_time.seconds + reply.expire_time.nanos / 1e9 - 1.0 - time.time()) + 0.2)


def test_expired_token_is_refreshed_and_rotation_kept(room: Participants, provider: OAuthProvider) -> None:
    app = App(room, provider)
    first = obtain(room, provider, app)
    cfg = client_config(provider)
    wait_until_due(first)
    refreshed = offline(room, "alice", oauth=cfg, delegated_by="bob")
    assert refreshed.access_token and refreshed.access_token != first.access_token
    assert provider.token_requests["refresh_token"] == 1
    assert offline(room, "alice", oauth=cfg, delegated_by="bob").access_token == refreshed.access_token
    # The rotated refresh token was stored: a second refresh works (the old one would be refused).
    wait_until_due(refreshed)
    again = offline(room, "alice", oauth=cfg, delegated_by="bob")
    assert again.access_token not in ("", refreshed.access_token)
    assert provider.token_requests["refresh_token"] == 2
    # bob, the owner, reads the same token by naming its delegate.
    assert offline(room, "bob", oauth=cfg, delegated_to="alice").access_token == again.access_token


def test_revoked_refresh_token_gives_none_never_a_stale_token(
    room: Participants, provider: OAuthProvider
) -> None:
    app = App(room, provider)
    first = obtain(room, provider, app)
    provider.revoke_refresh_tokens()
    wait_until_due(first)
    reply = offline(room, "alice", oauth=client_config(provider), delegated_by="bob")
    assert not reply.HasField("access_token") and reply.needs_reauthorization
    refreshes = provider.token_requests["refresh_token"]
    assert refreshes == 1
    again = offline(room, "alice", oauth=client_config(provider), delegated_by="bob")
    assert not again.HasField("access_token") and again.needs_reauthorization
    assert provider.token_requests["refresh_token"] == refreshes  # marked: no more calls
    # A new authorization replaces it.
    renewed = obtain(room, provider, app, after=1)
    assert renewed.access_token not in ("", first.access_token)


SECOND_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from roomsecrets_server.app import serve
    from roomsecrets_server.config import Settings

    def ready(server):
        print(server.address, flush=True)

    settings = Settings(
        data_dir=Path(sys.argv[1]),
        listen="127.0.0.1:0",
        oauth_refresh_margin=1.0,
        database_url=sys.argv[2],
        egress_allow=(sys.argv[3],),
    )
    asyncio.run(serve(settings, ready))
    """
)


def test_concurrent_offline_calls_on_two_server_processes_refresh_once(
    room: Participants, provider: OAuthProvider, data_dir: Path
) -> None:
    app = App(room, provider)
    first = obtain(room, provider, app)
    # A second server process (a second replica, on PostgreSQL) on the same data dir and
    # database: its own store connections, locks and OAuth service; only the store (a lease row,
    # check-and-set on the token row) is shared.
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SECOND_SERVER,
            str(data_dir),
            room.server.settings.database_url,
            *provider_allowed(provider),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert address, "second server did not start"
        with grpc.insecure_channel(address) as channel:
            stubs = [room.stub, room_secrets_pb2_grpc.RoomSecretsStub(channel)] * 10
            provider.token_delay = 0.3  # make the refreshes overlap
            wait_until_due(first)
            cfg = client_config(provider)
            md = room.auth("alice")

            def call(stub: room_secrets_pb2_grpc.RoomSecretsStub) -> pb.GetOfflineOAuthTokenResponse:
                request = pb.GetOfflineOAuthTokenRequest(oauth=cfg, delegated_by="bob")
                reply: pb.GetOfflineOAuthTokenResponse = stub.GetOfflineOAuthToken(
                    request, metadata=md, timeout=30
                )
                return reply

            with ThreadPoolExecutor(20) as pool:
                replies = list(pool.map(call, stubs))
        tokens = {r.access_token for r in replies}
        assert len(tokens) == 1 and first.access_token not in tokens and "" not in tokens
        assert provider.token_requests["refresh_token"] == 1
    finally:
        process.terminate()
        process.wait(10)


# -- connectors ---------------------------------------------------------------------------------
def test_connectors_keep_the_client_secret_on_the_server(room: Participants, provider: OAuthProvider) -> None:
    connectors = cpb_grpc.OAuthConnectorsStub(room.channel)
    config = client_config(provider, extra_params={"prompt": "consent"})
    request = cpb.SetConnectorRequest(name="example", client=config)
    fails(
        lambda: connectors.SetConnector(request, metadata=room.auth("alice")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    made = connectors.SetConnector(request, metadata=room.auth("admin", admin=True)).connector
    assert (
        made.has_client_secret
        and made.client_id == "app"
        and dict(made.extra_params) == {"prompt": "consent"}
    )
    replies = [
        made,
        connectors.GetConnector(cpb.GetConnectorRequest(name="example"), metadata=room.auth("alice")),
        connectors.ListConnectors(cpb.ListConnectorsRequest(), metadata=room.auth("alice")),
    ]
    for reply in replies:
        assert CLIENT_SECRET.encode() not in reply.SerializeToString()
    # Not visible through the Secrets API either.
    assert not room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("admin", admin=True)).secrets

    app = App(room, provider)
    thread, result = ask_in_background(room, provider, oauth=None, connector=pb.ConnectorRef(name="example"))
    inbound = app.next_request()
    assert "prompt=consent" in inbound.authorization_url
    app.provide(inbound)
    thread.join(20)
    obtained = result[0]
    assert isinstance(obtained, pb.RequestOAuthTokenResponse) and obtained.access_token
    by_connector = offline(room, "alice", connector=pb.ConnectorRef(name="example"), delegated_by="bob")
    assert by_connector.access_token == obtained.access_token
    fails(
        lambda: offline(room, "alice", connector=pb.ConnectorRef(name="missing")), grpc.StatusCode.NOT_FOUND
    )
    connectors.DeleteConnector(
        cpb.DeleteConnectorRequest(name="example"), metadata=room.auth("admin", admin=True)
    )
    assert not connectors.ListConnectors(cpb.ListConnectorsRequest(), metadata=room.auth("alice")).connectors


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"client_id": ""}, "oauth.client_id"),
        ({"token_endpoint": "ftp://x"}, "oauth.token_endpoint"),
        ({"authorization_endpoint": "http://accounts.example/auth"}, "oauth.authorization_endpoint"),
        ({"client_secret": "", "token_endpoint_auth_method": "client_secret_post"}, "oauth.client_secret"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "oauth.token_endpoint_auth_method"),
        ({"extra_params": {"state": "x"}}, "oauth.extra_params"),
        ({"scopes": ["read write"]}, "oauth.scopes"),
        ({"token_endpoint": "https://user:pw@auth.example/token"}, "oauth.token_endpoint"),
        ({"token_endpoint": "https://auth.example:99999/token"}, "oauth.token_endpoint"),
        ({"token_endpoint": "https://2130706433/token"}, "oauth.token_endpoint"),
    ],
)
def test_bad_client_config_names_the_field(
    room: Participants, provider: OAuthProvider, overrides: dict[str, object], field: str
) -> None:
    request = pb.RequestOAuthTokenRequest(
        oauth=client_config(provider, **overrides), from_participant_id="bob", redirect_uri=REDIRECT
    )
    err = fails(
        lambda: room.stub.RequestOAuthToken(request, metadata=room.auth("alice")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field in str(err.details())
    assert CLIENT_SECRET not in str(err.details())


# -- no token, code or secret in any log, error or audit line -------------------------------------
def test_tokens_and_client_secrets_never_logged(
    room: Participants, provider: OAuthProvider, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    app = App(room, provider)
    thread, result = ask_in_background(room, provider)
    inbound = app.next_request()
    errors.append(
        str(
            fails(
                lambda: app.provide(inbound, code="bad-code-123"), grpc.StatusCode.FAILED_PRECONDITION
            ).details()
        )
    )
    errors.append(
        str(fails(lambda: app.provide(inbound, state="forged"), grpc.StatusCode.INVALID_ARGUMENT).details())
    )
    app.provide(inbound)
    thread.join(20)
    first = result[0]
    assert isinstance(first, pb.RequestOAuthTokenResponse)
    provider.revoke_refresh_tokens()
    wait_until_due(first)
    assert offline(room, "alice", oauth=client_config(provider), delegated_by="bob").needs_reauthorization
    room.server.stop()  # flushes the audit log

    secrets = [*provider.issued_secrets(), CLIENT_SECRET, inbound.state]
    assert len(secrets) >= 5
    audit = (data_dir / "audit.log").read_text()
    assert "provide_oauth" in audit and "refresh_oauth_token" in audit
    # The server's log lines: those of its own threads (the provider and the test's user agent
    # run in this process too, and log what they handle).
    server_log = "\n".join(
        f"{r.getMessage()} {r.args!r}"
        for r in caplog.records
        if (r.threadName or "").startswith(("roomsecrets", "sqlite"))
    )
    assert "POST" in server_log  # the token endpoint calls were logged (by httpx) and scanned
    haystacks = {"log": server_log, "audit": audit, "errors": "\n".join(errors)}
    leaks = [(where, s[:6]) for where, text in haystacks.items() for s in secrets if s and s in text]
    assert not leaks, f"secret material found: {leaks}"
    # And none of it in plaintext at rest.
    for path in data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not [s for s in secrets if s and s.encode() in content], path.name


# -- the Python clients -------------------------------------------------------------------------
def test_sync_client_connectors_and_offline_token(room: Participants, provider: OAuthProvider) -> None:
    address = room.server.address
    config = OAuthClientConfig(
        client_id="app",
        client_secret=CLIENT_SECRET,
        authorization_endpoint=provider.authorization_endpoint,
        token_endpoint=provider.token_endpoint,
        scopes=("read",),
        extra_params={"access_type": "offline"},
    )
    with SecretsClient(address, room.token("admin", admin=True)) as admin:
        made = admin.set_connector("example", config)
        assert made.has_client_secret and made.extra_params == {"access_type": "offline"}
        assert CLIENT_SECRET not in repr(made)
        # Replacing without the secret keeps the stored one.
        kept = admin.set_connector("example", dataclasses.replace(config, client_secret=""))
        assert kept.has_client_secret
    with (
        SecretsClient(
            address,
            room.token("bob"),
            oauth_token_request_handler=lambda r: provider.authorize(r.authorization_url)[0],
        ),
        SecretsClient(address, room.token("alice")) as alice,
    ):
        assert [c.name for c in alice.list_connectors()] == ["example"]
        assert alice.get_connector("missing") is None
        token = alice.request_oauth_token(
            connector=ConnectorRef(name="example"),
            from_participant_id="bob",
            redirect_uri=REDIRECT,
            delegate_to="alice",
        )
        assert (
            token
            and alice.get_offline_oauth_token(connector=ConnectorRef(name="example"), delegated_by="bob")
            == token
        )


async def test_async_client_with_an_async_oauth_handler(room: Participants, provider: OAuthProvider) -> None:
    urls: list[str] = []

    async def handler(request: OAuthTokenRequest) -> str:
        urls.append(request.authorization_url)
        code, _ = await asyncio.to_thread(provider.authorize, request.authorization_url)
        return str(code)

    address = room.server.address
    config = OAuthClientConfig(
        client_id="app",
        client_secret=CLIENT_SECRET,
        authorization_endpoint=provider.authorization_endpoint,
        token_endpoint=provider.token_endpoint,
    )
    async with (
        AsyncSecretsClient(address, room.token("bob"), oauth_token_request_handler=handler),
        AsyncSecretsClient(address, room.token("alice")) as alice,
    ):
        token = await alice.request_oauth_token(
            oauth=config, from_participant_id="bob", redirect_uri=REDIRECT, delegate_to="alice", timeout=15
        )
        assert token == provider.issued_tokens[-1]["access_token"] and len(urls) == 1
        assert await alice.get_offline_oauth_token(oauth=config, delegated_by="bob") == token


def test_cancelled_requester_cancels_the_oauth_request(room: Participants, provider: OAuthProvider) -> None:
    app = App(room, provider)
    future = room.stub.RequestOAuthToken.future(
        pb.RequestOAuthTokenRequest(
            oauth=client_config(provider), from_participant_id="bob", redirect_uri=REDIRECT, timeout=30
        ),
        metadata=room.auth("alice"),
    )
    inbound = app.next_request()
    future.cancel()  # type: ignore[no-untyped-call]
    assert app.watcher.closed(inbound.request_id).state == pb.REQUEST_STATE_CANCELLED
    err = fails(lambda: app.provide(inbound), grpc.StatusCode.FAILED_PRECONDITION)
    assert "no longer pending" in str(err.details())
    assert provider.token_requests["authorization_code"] == 0
