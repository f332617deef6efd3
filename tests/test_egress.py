"""The egress policy (server/roomsecrets_server/egress.py) and the OAuth holes it closes, against
the real server, a real OAuth 2.0 server on loopback (tests/oauth_provider.py) and raw TCP
listeners that record every connection and every byte they receive.

The findings: (1) SSRF from any participant, through an inline client's token endpoint, and the
target's answer read back in the error; (2) a connector re-pointed at a listener without its
client secret, which then sent the stored secret there; (3) an OAuth answer with an empty state
accepted. Each test here that guards one fails on the code before the fix."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import importlib
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from roomsecrets.v1 import oauth_connectors_pb2 as cpb
from roomsecrets.v1 import oauth_connectors_pb2_grpc as cpb_grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.auth.principal import room_scope
from roomsecrets_server.cli.main import build_parser
from roomsecrets_server.cli.operator import settings_from_args
from roomsecrets_server.config import Settings
from roomsecrets_server.oauth.connectors import CONNECTOR_OWNER, CONNECTOR_TYPE
from roomsecrets_server.store import ABSENT, SecretKey, WriteCondition

from .harness import Participants, ServerThread, test_settings
from .oauth_provider import OAuthProvider
from .test_bad_input import violations
from .test_cli import run, stderr_line
from .test_oauth import CLIENT_SECRET, REDIRECT, client_config, fails, provider_allowed
from .test_requests import Watcher, error_reason

Code = grpc.StatusCode
# What an internal service answers: the SSRF of finding 1 read it back in the caller's error.
BANNER = "internal-admin-console-v1.2-on-10.0.0.5"


# -- raw listeners ----------------------------------------------------------------------------------
Respond = Callable[[socket.socket], None]


def http(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def sends(raw: bytes) -> Respond:
    return lambda conn: conn.sendall(raw)


def oauth_error(error: object, description: str = BANNER) -> Respond:
    body = json.dumps({"error": error, "error_description": description}).encode()
    return sends(http("400 Bad Request", body, "Content-Type: application/json"))


INTERNAL_SERVICE = oauth_error(BANNER)


class Listener:
    """A TCP server on loopback that records every connection and every byte it receives; it
    reads an HTTP request (if one comes) and then lets `respond` answer on the socket."""

    def __init__(
        self, respond: Respond = INTERNAL_SERVICE, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        self._respond = respond
        self._tls = tls
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        threading.Thread(target=self._serve, name="raw-listener", daemon=True).start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(2)
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            self._read_request(conn)
            self._respond(conn)
        except OSError:
            pass  # the client went away (or failed the TLS handshake)
        finally:
            conn.close()

    def _read_request(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            self._record(chunk)
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
        missing = int(length.group(1)) - len(body) if length else 0
        while missing > 0:
            chunk = conn.recv(min(missing, 65536))
            if not chunk:
                return
            self._record(chunk)
            missing -= len(chunk)

    def _record(self, chunk: bytes) -> None:
        with self._lock:
            self.received += chunk

    def untouched(self) -> bool:
        time.sleep(0.2)  # a connection the server made would have been accepted by now
        with self._lock:
            return self.connections == 0 and not self.received

    def close(self) -> None:
        self._closing.set()
        self._sock.close()


@pytest.fixture
def listeners() -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(respond: Respond = INTERNAL_SERVICE, **kwargs: Any) -> Listener:
        started.append(Listener(respond, **kwargs))
        return started[-1]

    yield start
    for listener in started:
        listener.close()


@pytest.fixture
def listener(listeners: Callable[..., Listener]) -> Listener:
    return listeners()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- servers ----------------------------------------------------------------------------------------
@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    with OAuthProvider(access_token_lifetime=3600) as running:
        running.register_client("app", CLIENT_SECRET, [REDIRECT], scope="read write")
        yield running


@pytest.fixture
def server(data_dir: Path, database_url: str, provider: OAuthProvider) -> Iterator[ServerThread]:
    """The server allows the test provider's port, and no other loopback port."""
    running = ServerThread(
        test_settings(data_dir, database_url=database_url, egress_allow=provider_allowed(provider))
    ).start()
    yield running
    running.stop()


@pytest.fixture
def serve(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Participants]]:
    """Start a server with settings of the test's own (e.g. its listeners allowed)."""
    started: list[tuple[ServerThread, Participants]] = []

    def start(**overrides: Any) -> Participants:
        settings = test_settings(tmp_path / f"data-{len(started)}", database_url=database_url, **overrides)
        running = ServerThread(settings).start()
        started.append((running, Participants(running)))
        return started[-1][1]

    yield start
    for running, room in started:
        room.close()
        running.stop()


def allowed(*ports: int) -> tuple[str, ...]:
    return tuple(f"127.0.0.1:{port}" for port in ports)


# -- the attack of the findings -------------------------------------------------------------------
def attack(
    room: Participants, metadata: Any = None, code: str = "attacker-code", **client: Any
) -> grpc.RpcError:
    """A participant asks itself for a token with the client given, watches its own stream and
    answers with any code. Returns what it is told: RequestOAuthToken's error at once, or the
    error of its answer (ProvideOAuthAuthorization)."""
    md = metadata or room.auth("mallory")
    watcher = Watcher(room, "mallory")
    earlier = {e.oauth_request.request_id for e in watcher.events if e.HasField("oauth_request")}
    request = pb.RequestOAuthTokenRequest(
        from_participant_id="mallory", redirect_uri=REDIRECT, timeout=30, **client
    )
    future = room.stub.RequestOAuthToken.future(request, metadata=md, timeout=40)
    try:
        deadline = time.monotonic() + 10
        prompts: list[pb.OAuthRequest] = []
        while not prompts and not future.done():
            assert time.monotonic() < deadline, "neither refused nor prompted"
            prompts = [
                e.oauth_request
                for e in list(watcher.events)
                if e.HasField("oauth_request") and e.oauth_request.request_id not in earlier
            ]
            time.sleep(0.01)
        if not prompts:
            err = future.exception()
            assert isinstance(err, grpc.RpcError)
            return err
        answer = pb.ProvideOAuthAuthorizationRequest(
            request_id=prompts[0].request_id, code=code, state=prompts[0].state
        )
        try:
            room.stub.ProvideOAuthAuthorization(answer, metadata=md, timeout=30)
        except grpc.RpcError as err:
            return err
        raise AssertionError(f"the answer was accepted: {future.result(timeout=10)}")
    finally:
        future.cancel()  # type: ignore[no-untyped-call]
        watcher.cancel()


def inline(provider: OAuthProvider, token_endpoint: str, **overrides: Any) -> dict[str, Any]:
    return {"oauth": client_config(provider, token_endpoint=token_endpoint, **overrides)}


def connectors(room: Participants) -> cpb_grpc.OAuthConnectorsStub:
    return cpb_grpc.OAuthConnectorsStub(room.channel)


def set_connector(
    room: Participants, config: pb.OAuthClientConfig, name: str = "example"
) -> cpb.ConnectorInfo:
    reply = connectors(room).SetConnector(
        cpb.SetConnectorRequest(name=name, client=config), metadata=room.auth("admin", admin=True)
    )
    return reply.connector


# -- finding 1: SSRF through an inline token endpoint ----------------------------------------------
@pytest.mark.parametrize(
    ("token_endpoint", "code", "says"),
    [
        ("http://127.0.0.1:{port}/token", Code.INVALID_ARGUMENT, "127.0.0.1 is a loopback address"),
        (
            "http://localhost:{port}/token",
            Code.FAILED_PRECONDITION,
            "localhost resolves to a loopback address",
        ),
        ("https://[::ffff:127.0.0.1]:{port}/token", Code.INVALID_ARGUMENT, "an IPv4-mapped loopback address"),
        ("https://169.254.169.254/latest/meta-data/", Code.INVALID_ARGUMENT, "a link-local address"),
        ("https://2130706433:{port}/token", Code.INVALID_ARGUMENT, "dotted-decimal"),
        ("https://0x7f.1:{port}/token", Code.INVALID_ARGUMENT, "dotted-decimal"),
        ("https://0177.0.0.1:{port}/token", Code.INVALID_ARGUMENT, "dotted-decimal"),
    ],
)
def test_an_inline_token_endpoint_never_reaches_an_internal_address(
    room: Participants,
    provider: OAuthProvider,
    listener: Listener,
    token_endpoint: str,
    code: Code,
    says: str,
) -> None:
    err = attack(room, **inline(provider, token_endpoint.format(port=listener.port)))
    assert err.code() == code, err.details()
    details = str(err.details())
    assert says in details and "oauth.token_endpoint" in details
    if code == Code.INVALID_ARGUMENT:
        assert violations(err) == ["oauth.token_endpoint"]
    else:
        assert error_reason(err) == "EGRESS_DENIED" and "--egress-allow" in details
    assert BANNER not in details
    assert listener.untouched(), "the server connected to the listener"


def test_the_provider_port_is_reachable_and_no_other_loopback_port(
    room: Participants, provider: OAuthProvider, listener: Listener
) -> None:
    """The allow-list entry `127.0.0.1:<provider port>` opens exactly that port: a real
    exchange with the provider still works (the code is refused there: invalid_grant)."""
    err = attack(room, **inline(provider, provider.token_endpoint))
    assert err.code() == Code.FAILED_PRECONDITION and error_reason(err) == "OAUTH_PROVIDER_ERROR"
    assert "invalid_grant" in str(err.details())
    assert provider.token_requests["authorization_code"] == 1
    refused = attack(room, **inline(provider, f"http://127.0.0.1:{listener.port}/token"))
    assert refused.code() == Code.INVALID_ARGUMENT and listener.untouched()


# -- finding 2: a connector's client secret sent elsewhere ------------------------------------------
def test_a_connector_cannot_be_repointed_without_its_secret(
    room: Participants, provider: OAuthProvider, listener: Listener
) -> None:
    made = set_connector(room, client_config(provider))
    assert made.has_client_secret
    elsewhere = f"http://localhost:{listener.port}/token"
    for changes, named in [
        ({"token_endpoint": elsewhere}, "token_endpoint"),
        ({"token_endpoint": f"http://127.0.0.1:{listener.port}/token"}, "token_endpoint"),
        ({"authorization_endpoint": f"http://localhost:{listener.port}/authorize"}, "authorization_endpoint"),
        ({"client_id": "other-app"}, "client_id"),
    ]:
        err = fails(
            lambda c=changes: set_connector(room, client_config(provider, client_secret="", **c)),  # type: ignore[misc]
            Code.INVALID_ARGUMENT,
        )
        assert violations(err) == ["client.client_secret"]
        assert f"is required when changing {named}" in str(err.details())
    # The same client at the same endpoints keeps its stored secret (e.g. new scopes).
    kept = set_connector(room, client_config(provider, client_secret="", scopes=["read"]))
    assert kept.has_client_secret and list(kept.scopes) == ["read"]
    # Through the connector the attacker's code reaches only the provider, with the right secret.
    err = attack(room, connector=pb.ConnectorRef(name="example"))
    assert error_reason(err) == "OAUTH_PROVIDER_ERROR" and "invalid_grant" in str(err.details())
    assert listener.untouched()


def test_a_connector_pointed_at_an_internal_address_with_a_secret_still_sends_nothing(
    room: Participants, provider: OAuthProvider, listener: Listener
) -> None:
    """An admin who does give the secret may store a host name (judged at connection time), but
    the egress policy refuses the connection; an IP literal is refused when set."""
    literal = client_config(provider, token_endpoint=f"http://127.0.0.1:{listener.port}/token")
    err = fails(lambda: set_connector(room, literal), Code.INVALID_ARGUMENT)
    assert violations(err) == ["client.token_endpoint"] and "loopback" in str(err.details())
    set_connector(room, client_config(provider, token_endpoint=f"http://localhost:{listener.port}/token"))
    err = attack(room, connector=pb.ConnectorRef(name="example"))
    assert err.code() == Code.FAILED_PRECONDITION and error_reason(err) == "EGRESS_DENIED"
    assert "connector.token_endpoint: localhost resolves to a loopback address" in str(err.details())
    assert CLIENT_SECRET not in str(err.details())
    assert listener.untouched()


def _connector_row(room: Participants, name: str) -> tuple[SecretKey, dict[str, Any]]:
    server = room.server.server
    assert server is not None
    key = SecretKey(room_scope("dev-project", room.room), CONNECTOR_OWNER, "", f"connector:{name}")

    async def read() -> dict[str, Any]:
        record = await server.store.get_secret(key)
        assert record is not None
        doc: dict[str, Any] = json.loads(server.secrets.open(record))
        return doc

    doc: dict[str, Any] = room.server.call(read())
    return key, doc


def _write_connector_row(room: Participants, key: SecretKey, doc: dict[str, Any]) -> None:
    server = room.server.server
    assert server is not None

    async def write() -> None:
        existing = await server.store.get_secret(key)
        record = server.secrets.seal(key, CONNECTOR_TYPE, "", json.dumps(doc).encode())
        condition = WriteCondition(etag=existing.etag) if existing else ABSENT
        await server.store.put_secret(record, condition)

    room.server.call(write())


def test_the_client_secret_is_sealed_to_its_client_and_endpoints(
    room: Participants, provider: OAuthProvider
) -> None:
    set_connector(room, client_config(provider), name="first")
    set_connector(room, client_config(provider, token_endpoint="https://tokens.example/token"), name="second")
    _, first = _connector_row(room, "first")
    key, second = _connector_row(room, "second")
    # Not in plain in the row, even inside its envelope.
    assert CLIENT_SECRET not in json.dumps(first) and first["client_secret"] == ""
    assert first["sealed_client_secret"]
    # The first connector's sealed secret moved into the second (other endpoints): it cannot open.
    _write_connector_row(room, key, {**second, "sealed_client_secret": first["sealed_client_secret"]})
    err = fails(
        lambda: connectors(room).GetConnector(
            cpb.GetConnectorRequest(name="second"), metadata=room.auth("bob")
        ),
        Code.DATA_LOSS,
    )
    assert "does not open for its client and endpoints" in str(err.details())
    # Nor does a row whose endpoints were changed around the sealed secret.
    _, first = _connector_row(room, "first")
    first_key, _ = _connector_row(room, "first")
    _write_connector_row(room, first_key, {**first, "token_endpoint": "https://tokens.example/token"})
    fails(
        lambda: room.stub.GetOfflineOAuthToken(
            pb.GetOfflineOAuthTokenRequest(connector=pb.ConnectorRef(name="first")), metadata=room.auth("bob")
        ),
        Code.DATA_LOSS,
    )


def test_connector_rows_of_the_earlier_format_keep_working(
    room: Participants, provider: OAuthProvider
) -> None:
    """A row written before the secret was sealed on its own (in plain inside the sealed JSON)
    is read as before; the next set writes the new format."""
    set_connector(room, client_config(provider), name="legacy")
    key, doc = _connector_row(room, "legacy")
    legacy = {k: v for k, v in doc.items() if k != "sealed_client_secret"}
    _write_connector_row(room, key, {**legacy, "client_secret": CLIENT_SECRET})
    info = connectors(room).GetConnector(cpb.GetConnectorRequest(name="legacy"), metadata=room.auth("bob"))
    assert info.connector.has_client_secret
    # The stored secret authenticates at the provider (a wrong one would be invalid_client).
    err = attack(room, connector=pb.ConnectorRef(name="legacy"))
    assert "invalid_grant" in str(err.details())
    set_connector(room, client_config(provider, client_secret="", scopes=["read"]), name="legacy")
    _, rewritten = _connector_row(room, "legacy")
    assert rewritten["client_secret"] == "" and rewritten["sealed_client_secret"]
    err = attack(room, connector=pb.ConnectorRef(name="legacy"))
    assert "invalid_grant" in str(err.details())


# -- the secrets grant covers the token endpoint ---------------------------------------------------
def _offline(room: Participants, grant: list[dict[str, str]], **client: Any) -> grpc.RpcError | None:
    try:
        room.stub.GetOfflineOAuthToken(
            pb.GetOfflineOAuthTokenRequest(**client), metadata=room.auth("mallory", request_oauth_token=grant)
        )
    except grpc.RpcError as err:
        return err
    return None


def test_the_grant_restricts_the_token_endpoint_too(room: Participants, provider: OAuthProvider) -> None:
    auth = provider.authorization_endpoint
    same_origin = [{"endpoint": auth, "client_id": "app"}]
    # Without token_endpoint: only the authorization endpoint's origin.
    assert _offline(room, same_origin, **inline(provider, provider.token_endpoint)) is None
    for elsewhere in (
        "https://tokens.example/token",
        provider.base_url.replace("http:", "https:") + "/token",
    ):
        err = _offline(room, same_origin, **inline(provider, elsewhere))
        assert err is not None and err.code() == Code.PERMISSION_DENIED
        assert elsewhere in str(err.details()) and "'app'" in str(err.details())
        # RequestOAuthToken alike (the finding's call), before anyone is asked.
        asked = attack(
            room, room.auth("mallory", request_oauth_token=same_origin), **inline(provider, elsewhere)
        )
        assert asked.code() == Code.PERMISSION_DENIED
    # With token_endpoint: exact, or a prefix.
    exact = [{"endpoint": auth, "client_id": "app", "token_endpoint": "https://tokens.example/oauth/token"}]
    prefix = [{"endpoint": auth, "client_id": "app", "token_endpoint": "https://tokens.example/oauth/*"}]
    for grant, token_endpoint, ok in [
        (exact, "https://tokens.example/oauth/token", True),
        (exact, "https://tokens.example/oauth/token2", False),
        (exact, provider.token_endpoint, False),
        (prefix, "https://tokens.example/oauth/v2/token", True),
        (prefix, "https://tokens.example/other/token", False),
        (prefix, "https://tokens.example.evil/oauth/token", False),
    ]:
        err = _offline(room, grant, **inline(provider, token_endpoint))
        assert (err is None) == ok, (token_endpoint, err and err.details())
        assert err is None or err.code() == Code.PERMISSION_DENIED
    # Connectors alike.
    set_connector(room, client_config(provider, token_endpoint="https://tokens.example/token"))
    err = _offline(room, same_origin, connector=pb.ConnectorRef(name="example"))
    assert err is not None and err.code() == Code.PERMISSION_DENIED
    allowed_grant = [{"endpoint": auth, "client_id": "app", "token_endpoint": "https://tokens.example/token"}]
    assert _offline(room, allowed_grant, connector=pb.ConnectorRef(name="example")) is None


def test_a_grant_entry_with_an_empty_token_endpoint_is_refused(
    room: Participants, provider: OAuthProvider
) -> None:
    grant = [{"endpoint": provider.authorization_endpoint, "client_id": "app", "token_endpoint": ""}]
    err = _offline(room, grant, **inline(provider, provider.token_endpoint))
    assert err is not None and err.code() == Code.UNAUTHENTICATED
    assert "token_endpoint" in str(err.details())


def test_token_command_mints_the_token_endpoint(tmp_path: Path) -> None:
    done = run(
        "token", "--data-dir", str(tmp_path), "--identity", "agent", "--room", "r",
        "--allow-oauth", "https://a.example/authorize", "app",
        "--allow-oauth-token-endpoint", "https://a.example/authorize", "app", "https://t.example/oauth/*",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), options={"verify_signature": False})
    api = next(g["scope"] for g in claims["grants"] if g["name"] == "api")
    assert api["secrets"]["request_oauth_token"] == [
        {"endpoint": "https://a.example/authorize", "client_id": "app"},
        {
            "endpoint": "https://a.example/authorize",
            "client_id": "app",
            "token_endpoint": "https://t.example/oauth/*",
        },
    ]


# -- what a caller learns: the port-scanner check, and the provider's text -----------------------
def test_closed_and_open_ports_look_the_same(
    serve: Callable[..., Participants],
    provider: OAuthProvider,
    listeners: Callable[..., Listener],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    garbage = listeners(sends(b"SSH-2.0-OpenSSH_9.6\r\n"))
    html = listeners(sends(http("500 Internal Server Error", f"<h1>{BANNER}</h1>".encode())))
    hangs_up = listeners(lambda conn: None)
    silent = listeners(lambda conn: time.sleep(3))
    closed = closed_port()
    open_ports = [garbage.port, html.port, hangs_up.port, silent.port]
    room = serve(egress_allow=allowed(closed, *open_ports), oauth_http_timeout=1.0)
    seen = {}
    for port in (closed, *open_ports):
        err = attack(room, **inline(provider, f"http://127.0.0.1:{port}/token"))
        seen[port] = (err.code(), err.details(), error_reason(err))
    assert len(set(seen.values())) == 1, seen
    code, details, reason = seen[closed]
    assert code == Code.UNAVAILABLE and reason == "OAUTH_PROVIDER_UNAVAILABLE"
    assert details == "oauth.token_endpoint: the endpoint could not be reached or gave no usable answer"
    # Refused destinations alike: the same answer whether anything listens there or not.
    other_open, other_closed = listeners(), closed_port()
    denied = {
        port: str(attack(room, **inline(provider, f"http://localhost:{port}/token")).details())
        for port in (other_open.port, other_closed)
    }
    assert len(set(denied.values())) == 1 and "resolves to a loopback address" in denied[other_closed]
    assert other_open.untouched()
    # The operator's log says what kind of failure it was; never the code, secret or an answer.
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "outbound call for oauth.token_endpoint failed: ConnectError" in logged
    assert not [s for s in (CLIENT_SECRET, "attacker-code", BANNER) if s in logged]


@pytest.mark.parametrize(
    ("respond", "code", "reason", "says"),
    [
        (oauth_error("invalid_grant"), Code.FAILED_PRECONDITION, "OAUTH_PROVIDER_ERROR", ": invalid_grant"),
        (oauth_error(BANNER), Code.FAILED_PRECONDITION, "OAUTH_PROVIDER_ERROR", ": invalid_response"),
        (
            oauth_error(["invalid_grant"]),
            Code.FAILED_PRECONDITION,
            "OAUTH_PROVIDER_ERROR",
            ": invalid_response",
        ),
        (
            sends(http("200 OK", json.dumps({"error": "access_denied", "detail": BANNER}).encode())),
            Code.FAILED_PRECONDITION,
            "OAUTH_PROVIDER_ERROR",
            ": access_denied",
        ),
        (
            sends(http("503 Service Unavailable", json.dumps({"error": BANNER}).encode())),
            Code.UNAVAILABLE,
            "OAUTH_PROVIDER_UNAVAILABLE",
            "could not be reached or gave no usable answer",
        ),
    ],
)
def test_only_a_standard_error_code_of_the_provider_reaches_the_caller(
    serve: Callable[..., Participants],
    provider: OAuthProvider,
    listeners: Callable[..., Listener],
    respond: Respond,
    code: Code,
    reason: str,
    says: str,
) -> None:
    endpoint = listeners(respond)
    room = serve(egress_allow=allowed(endpoint.port))
    err = attack(room, **inline(provider, f"http://127.0.0.1:{endpoint.port}/token"))
    assert (err.code(), error_reason(err)) == (code, reason), err.details()
    assert str(err.details()).endswith(says) and BANNER not in str(err.details())
    assert CLIENT_SECRET not in str(err.details())


TOKEN = json.dumps({"access_token": "at-egress-1", "token_type": "Bearer", "expires_in": 3600}).encode()


def drip(conn: socket.socket) -> None:
    """A valid head, then one byte of body every 0.1 s (each read is quick; the whole is not)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    end = time.monotonic() + 20
    while time.monotonic() < end:
        conn.sendall(b" ")
        time.sleep(0.1)


def until_closed(body: bytes) -> Respond:
    """No Content-Length: the body runs until the connection closes."""
    return sends(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + body)


@pytest.mark.parametrize(
    "respond",
    [
        pytest.param(
            sends(http("200 OK", TOKEN[:-1] + b', "pad": "' + b"x" * 1024 * 1024 + b'"}')), id="large"
        ),
        pytest.param(
            until_closed(TOKEN[:-1] + b', "pad": "' + b"x" * 1024 * 1024 + b'"}'), id="large-unsized"
        ),
        pytest.param(drip, id="slow"),
        pytest.param(
            sends(
                http(
                    "200 OK", gzip.compress(TOKEN), "Content-Type: application/json", "Content-Encoding: gzip"
                )
            ),
            id="compressed",
        ),
    ],
)
def test_an_answer_is_bounded_in_size_and_time(
    serve: Callable[..., Participants],
    provider: OAuthProvider,
    listeners: Callable[..., Listener],
    respond: Respond,
) -> None:
    endpoint = listeners(respond)
    room = serve(egress_allow=allowed(endpoint.port), oauth_http_timeout=1.5)
    started = time.monotonic()
    err = attack(room, **inline(provider, f"http://127.0.0.1:{endpoint.port}/token"))
    assert err.code() == Code.UNAVAILABLE, err.details()
    assert time.monotonic() - started < 6


def test_a_redirect_is_not_followed(
    serve: Callable[..., Participants], provider: OAuthProvider, listeners: Callable[..., Listener]
) -> None:
    redirect = listeners(sends(http("307 Temporary Redirect", b"", f"Location: {provider.token_endpoint}")))
    room = serve(egress_allow=(*allowed(redirect.port), *provider_allowed(provider)))
    err = attack(room, **inline(provider, f"http://127.0.0.1:{redirect.port}/token"))
    assert err.code() == Code.UNAVAILABLE and redirect.connections == 1
    assert provider.token_requests["authorization_code"] == 0


# -- finding 3: the state is mandatory and single-use ---------------------------------------------
class Pending:
    """alice asks bob (watching) for a token; the provider's user agent gets a code."""

    def __init__(self, room: Participants, provider: OAuthProvider) -> None:
        self.room = room
        self.watcher = Watcher(room, "bob")
        request = pb.RequestOAuthTokenRequest(
            oauth=client_config(provider), from_participant_id="bob", redirect_uri=REDIRECT, timeout=60
        )
        self.future = room.stub.RequestOAuthToken.future(request, metadata=room.auth("alice"), timeout=70)
        self.prompt = self.watcher.wait_for(lambda e: e.HasField("oauth_request"), timeout=10).oauth_request
        self.code, self.state = provider.authorize(self.prompt.authorization_url)

    def provide(self, state: str | None = None, code: str | None = None) -> None:
        self.room.stub.ProvideOAuthAuthorization(
            pb.ProvideOAuthAuthorizationRequest(
                request_id=self.prompt.request_id,
                code=self.code if code is None else code,
                state=self.state if state is None else state,
            ),
            metadata=self.room.auth("bob"),
            timeout=30,
        )

    def close(self) -> None:
        self.future.cancel()  # type: ignore[no-untyped-call]
        self.watcher.cancel()


@pytest.fixture
def pending(room: Participants, provider: OAuthProvider) -> Iterator[Pending]:
    asked = Pending(room, provider)
    yield asked
    asked.close()


def test_an_answer_without_the_state_is_refused_and_the_request_stays_pending(
    pending: Pending, provider: OAuthProvider, data_dir: Path
) -> None:
    for state, says in [("", "state: is required"), ("forged-state", "state: does not match")]:
        err = fails(lambda s=state: pending.provide(state=s), Code.INVALID_ARGUMENT)  # type: ignore[misc]
        assert violations(err) == ["state"] and says in str(err.details())
        assert pending.state not in str(err.details())
    assert provider.token_requests["authorization_code"] == 0, "a code was exchanged without the state"
    assert not pending.future.done()
    pending.provide()  # still pending: the right state completes it
    reply = pending.future.result(timeout=20)
    assert reply.access_token == provider.issued_tokens[-1]["access_token"]
    # A closed request accepts its state no more.
    err = fails(pending.provide, Code.FAILED_PRECONDITION)
    assert error_reason(err) == "REQUEST_NOT_PENDING"
    pending.room.server.stop()  # flushes the audit log
    outcomes = [json.loads(line).get("outcome") for line in (data_dir / "audit.log").read_text().splitlines()]
    assert "state_missing" in outcomes and "state_mismatch" in outcomes


def test_concurrent_answers_make_one_exchange(pending: Pending, provider: OAuthProvider) -> None:
    provider.code_delay = 1.0  # the first exchange is still at the provider when the second comes

    def answer(_: int) -> str:
        try:
            pending.provide()
        except grpc.RpcError as err:
            return error_reason(err)
        return "OK"

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(answer, range(2)))
    assert provider.token_requests["authorization_code"] == 1
    assert outcomes.count("OK") == 1, outcomes
    assert {"OAUTH_EXCHANGE_IN_PROGRESS", "REQUEST_NOT_PENDING"} & set(outcomes), outcomes
    assert pending.future.result(timeout=20).access_token


def test_a_bad_code_leaves_the_request_pending_for_a_new_one(
    pending: Pending, provider: OAuthProvider
) -> None:
    err = fails(lambda: pending.provide(code="not-a-code"), Code.FAILED_PRECONDITION)
    assert error_reason(err) == "OAUTH_PROVIDER_ERROR" and "invalid_grant" in str(err.details())
    pending.provide()
    assert pending.future.result(timeout=20).access_token


# -- the allow-list --------------------------------------------------------------------------------
def test_an_invalid_allow_list_entry_refuses_to_start(tmp_path: Path) -> None:
    for entry, says in [
        ("10.0.0.1/8", "has host bits set"),
        ("localhost:0", "port '0'"),
        ("*.internal", "wildcards"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        ("2130706433", "dotted-decimal"),
        ("", "empty"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            Settings(data_dir=tmp_path, egress_allow=(entry,)).check()
        with pytest.raises(ValueError, match=re.escape(f"egress_allow entry {entry!r}")):
            ServerThread(test_settings(tmp_path / "data", egress_allow=(entry,))).start()
    done = run("serve", "--data-dir", str(tmp_path / "cli"), "--egress-allow", "10.0.0.1/8")
    assert done.returncode == 2
    assert "egress_allow entry '10.0.0.1/8'" in stderr_line(done)


def test_egress_allow_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = ["serve", "--egress-allow", "10.0.0.0/8", "--egress-allow", "tokens.internal:8443"]
    assert settings_from_args(build_parser().parse_args(flags)).egress_allow == (
        "10.0.0.0/8",
        "tokens.internal:8443",
    )
    monkeypatch.setenv("ROOMSECRETS_EGRESS_ALLOW", "127.0.0.1:9000, [::1]:9000,,fd00::/8")
    from_env = settings_from_args(build_parser().parse_args(["serve"]))
    assert from_env.egress_allow == ("127.0.0.1:9000", "[::1]:9000", "fd00::/8")
    from_env.check()


def test_the_server_resolves_and_contacts_nothing_on_its_own(
    serve: Callable[..., Participants], listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[object] = []
    real = socket.getaddrinfo

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    room = serve(
        egress_allow=("tokens.never-resolved.test", "tokens.never-resolved.test:443", *allowed(listener.port))
    )
    room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("alice"))
    time.sleep(0.5)
    assert not [h for h in looked_up if "never-resolved" in str(h)]
    assert listener.untouched()


# -- the policy itself: pinning, TLS, proxies (white-box, no server) -------------------------------
@pytest.fixture
def egress() -> ModuleType:
    """roomsecrets_server.egress, imported here rather than at the top, so that this file's
    server-level tests also run (and fail) against the code from before the module existed."""
    return importlib.import_module("roomsecrets_server.egress")


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address judged, nothing bound
        ("255.255.255.255", "broadcast"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
        ("::127.0.0.1", "IPv4-compatible (deprecated)"),
        ("64:ff9b::a00:1", "NAT64 private"),
        ("64:ff9b:1::1", "local-use NAT64"),
        ("2002:7f00:1::1", "6to4 loopback"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo loopback"),  # client 127.0.0.1, obfuscated
        ("fc00::1", "private (unique local)"),
        ("fd12:3456::1", "private (unique local)"),
        ("fe80::1", "link-local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("100::1", "reserved"),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_classify(egress: ModuleType, address: str, what: str | None) -> None:
    assert egress.classify(ipaddress.ip_address(address)) == what


def test_allow_entries_open_exactly_what_they_name(egress: ModuleType) -> None:
    policy = egress.EgressPolicy(
        ["127.0.0.1:8080", "10.0.0.0/8", "tokens.internal", "idp.internal:8443", "[::1]:9"]
    )
    loopback, private, ten = (ipaddress.ip_address(a) for a in ("127.0.0.1", "192.168.1.1", "10.9.8.7"))
    assert policy.refusal("x", loopback, 8080) is None and policy.refusal("x", loopback, 8081) == "loopback"
    assert policy.refusal("x", ipaddress.ip_address("::ffff:127.0.0.1"), 8080) is None
    assert policy.refusal("x", ten, 1) is None and policy.refusal("x", private, 1) == "private"
    assert policy.refusal("Tokens.Internal.", private, 1) is None  # the name, whatever its address
    assert policy.refusal("other.internal", private, 1) == "private"
    assert policy.refusal("idp.internal", private, 8443) is None and policy.refusal(
        "idp.internal", private, 443
    )
    assert policy.refusal("x", ipaddress.ip_address("::1"), 9) is None
    assert policy.refusal("x", ipaddress.ip_address("::1"), 10) == "loopback"


class Pki:
    """A CA and server certificates for host names, and a client context trusting the CA."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca.public_bytes(serialization.Encoding.PEM).decode())
        return context

    def server_context(self, host: str, tmp_path: Path, seen_sni: list[str | None]) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = tmp_path / f"{host}.pem", tmp_path / f"{host}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
        return context


class Resolver:
    """Stands in for DNS (there is none here): answers from a table, and counts the lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self._answers = list(answers)
        self.lookups: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        return self._answers[min(len(self.lookups), len(self._answers)) - 1]


def fetch(egress: ModuleType, policy: Any, url: str) -> Any:
    import httpx2  # noqa: PLC0415 - the HTTP stack the policy configures

    async def get() -> Any:
        async with (
            policy.guard("test.url", unavailable_reason="TEST_UNAVAILABLE"),
            httpx2.AsyncClient(**policy.client_options("test.url")) as client,
        ):
            return (await client.get(url)).json()

    try:
        return asyncio.run(get())
    except egress.EgressDenied as denied:
        return denied
    except Exception as error:  # the guard's Unavailable
        return error


def test_the_connection_goes_to_the_address_judged_and_tls_checks_the_name(
    egress: ModuleType, listeners: Callable[..., Listener], tmp_path: Path
) -> None:
    pki, seen_sni = Pki(), list[str | None]()
    ok = sends(http("200 OK", b'{"ok": true}', "Content-Type: application/json"))
    right = listeners(ok, host="127.0.0.2", tls=pki.server_context("tokens.test", tmp_path, seen_sni))
    # Resolved once (a second answer would rebind to another address), connected to that address.
    resolver = Resolver(["127.0.0.2"], ["127.0.0.3"])
    policy = egress.EgressPolicy(["127.0.0.2"], ssl_context=pki.client_context(), resolver=resolver)
    assert fetch(egress, policy, f"https://tokens.test:{right.port}/") == {"ok": True}
    assert resolver.lookups == [("tokens.test", right.port)] and seen_sni == ["tokens.test"]
    # A certificate for another name fails, though the address is the one judged.
    wrong = listeners(ok, host="127.0.0.2", tls=pki.server_context("other.test", tmp_path, seen_sni))
    policy = egress.EgressPolicy(
        ["127.0.0.2"], ssl_context=pki.client_context(), resolver=Resolver(["127.0.0.2"])
    )
    failed = fetch(egress, policy, f"https://tokens.test:{wrong.port}/")
    assert getattr(failed, "reason", "") == "TEST_UNAVAILABLE" and wrong.connections == 1
    assert "test.url: the endpoint could not be reached" in str(failed)


def test_every_address_a_name_resolves_to_must_pass(
    egress: ModuleType, listeners: Callable[..., Listener]
) -> None:
    target = listeners(sends(http("200 OK", b"{}")), host="127.0.0.2")
    policy = egress.EgressPolicy(["127.0.0.2"], resolver=Resolver(["127.0.0.2", "10.1.2.3"]))
    denied = fetch(egress, policy, f"http://tokens.test:{target.port}/")
    assert isinstance(denied, egress.EgressDenied)
    assert "test.url: tokens.test resolves to a private address" in str(denied)
    assert target.untouched()


def test_proxy_environment_variables_are_ignored(
    egress: ModuleType, listeners: Callable[..., Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = listeners(sends(http("200 OK", b'{"via": "proxy"}')))
    target = listeners(sends(http("200 OK", b'{"via": "direct"}')), host="127.0.0.2")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    policy = egress.EgressPolicy(["127.0.0.2"], resolver=Resolver(["127.0.0.2"]))
    assert fetch(egress, policy, f"http://tokens.test:{target.port}/") == {"via": "direct"}
    assert proxy.untouched()


def test_a_refused_destination_sends_nothing_at_all(egress: ModuleType, listener: Listener) -> None:
    policy = egress.EgressPolicy([])
    for url in (f"http://127.0.0.1:{listener.port}/", f"http://localhost:{listener.port}/"):
        denied = fetch(egress, policy, url)
        assert isinstance(denied, egress.EgressDenied) and "loopback" in str(denied)
    assert listener.untouched()


@pytest.mark.parametrize("expires_in", [1e308, 10**30], ids=["1e308", "10^30"])
def test_an_absurd_expiry_from_the_provider_is_bounded(
    serve: Callable[..., Participants],
    provider: OAuthProvider,
    listeners: Callable[..., Listener],
    expires_in: float,
) -> None:
    """A provider answering expires_in 1e308 left a stored token whose every read was INTERNAL
    (no Timestamp holds that time); the expiry is capped at ten years."""
    body = json.dumps({"access_token": "at-absurd", "token_type": "Bearer", "expires_in": expires_in})
    endpoint = listeners(sends(http("200 OK", body.encode(), "Content-Type: application/json")))
    room = serve(egress_allow=allowed(endpoint.port))
    client = inline(provider, f"http://127.0.0.1:{endpoint.port}/token")
    md = room.auth("mallory")
    watcher = Watcher(room, "mallory")
    try:
        request = pb.RequestOAuthTokenRequest(
            from_participant_id="mallory", redirect_uri=REDIRECT, delegate_to="mallory", timeout=30, **client
        )
        future = room.stub.RequestOAuthToken.future(request, metadata=md, timeout=40)
        prompt = watcher.wait_for(lambda e: e.HasField("oauth_request")).oauth_request
        answer = pb.ProvideOAuthAuthorizationRequest(
            request_id=prompt.request_id, code="c", state=prompt.state
        )
        room.stub.ProvideOAuthAuthorization(answer, metadata=md, timeout=30)
        assert future.result(timeout=10).access_token == "at-absurd"
        offline = room.stub.GetOfflineOAuthToken(
            pb.GetOfflineOAuthTokenRequest(delegated_to="mallory", **client), metadata=md
        )
        assert offline.access_token == "at-absurd"
        assert offline.expire_time.seconds <= time.time() + 10 * 366 * 86400
    finally:
        watcher.cancel()
