"""The Python client (roomsecrets.client / roomsecrets.aio) against the real server: every method,
typed errors, the watch stream and the handler API, sync and asyncio."""

from __future__ import annotations

import asyncio
import importlib.util
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import roomsecrets
from roomsecrets import errors
from roomsecrets.aio import AsyncSecretsClient
from roomsecrets.client import SecretsClient, verified
from roomsecrets.handlers import RejectRequest, RequestHandlerThread
from roomsecrets.types import (
    ConnectorRef,
    FileContent,
    OAuthClientConfig,
    RequestClosed,
    RequestEvent,
    RequestState,
    SecretInfo,
    SecretRequest,
    WatchReady,
)

from .harness import Participants, ServerThread, test_settings
from .test_tls import Pki

URL = "https://git.example/repo.git"
ClientFactory = Callable[..., SecretsClient]

# The server learns that a stream closed when the client's cancellation reaches it; a request
# sent just before that is accepted and then cancelled because the participant stopped listening.
STOPPED_LISTENING = (errors.NotListeningError, errors.RequestCancelledError)


@pytest.fixture
def connect(room: Participants) -> Iterator[ClientFactory]:
    """connect(identity, **token_kwargs) -> a SecretsClient for that participant (closed after)."""
    opened: list[SecretsClient] = []

    def make(identity: str, **kwargs: object) -> SecretsClient:
        client = SecretsClient(room.server.address, room.token(identity, **kwargs))
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


@pytest.fixture
def alice(connect: ClientFactory) -> SecretsClient:
    return connect("alice")


@pytest.fixture
def bob(connect: ClientFactory) -> SecretsClient:
    return connect("bob")


class EventReader:
    """A sync watch_requests stream read on a thread into a queue."""

    def __init__(self, client: SecretsClient) -> None:
        self.stream = client.watch_requests()
        self.events: queue.Queue[RequestEvent | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.put(event)
        except BaseException as error:
            self.events.put(error)

    def next(self, timeout: float = 5) -> RequestEvent:
        item = self.events.get(timeout=timeout)
        assert not isinstance(item, BaseException), item
        return item

    def close(self) -> bool:
        self.stream.cancel()
        self._thread.join(5)
        return not self._thread.is_alive()


def ask_in_background(client: SecretsClient, **kwargs: object) -> tuple[threading.Thread, list[object]]:
    """request_secret on a thread; the list receives the bytes or the raised error."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(client.request_secret("bob", URL, **kwargs))  # type: ignore[arg-type]
        except errors.SecretsError as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# -- storage --------------------------------------------------------------------------------------
def test_set_get_exists_list_delete(alice: SecretsClient) -> None:
    info = alice.set_secret(secret_id="openai", type="text/plain", name="OpenAI key", data=b"sk-123")
    assert isinstance(info, SecretInfo)
    assert (info.id, info.type, info.name, info.size) == ("openai", "text/plain", "OpenAI key", 6)
    assert info.etag and info.data_crc32c and info.delegated_to is None and info.update_time is not None

    content = alice.get_secret("openai")
    assert isinstance(content, FileContent)
    assert (content.data, content.name, content.mime_type) == (b"sk-123", "OpenAI key", "text/plain")
    assert content.info is not None and content.info.etag == info.etag
    assert "sk-123" not in repr(content), "a FileContent's repr must not show the value"

    assert alice.exists("openai") is True
    assert [s.id for s in alice.list_secrets()] == ["openai"]
    alice.delete_secret("openai")
    assert alice.exists("openai") is False
    assert alice.get_secret(secret_id="openai") is None
    assert alice.list_secrets() == []


def test_get_of_a_missing_secret_is_none(alice: SecretsClient) -> None:
    assert alice.get_secret("nope") is None
    assert alice.get_secret(type="git", name="nothing") is None


def test_address_by_type_and_name_and_the_reference_id_keyword(alice: SecretsClient) -> None:
    info = alice.set_secret(type="git", name=URL, data=b"token-1")
    assert info.id and info.id != URL, "the server assigns an id"
    again = alice.set_secret(type="git", name=URL, data=b"token-2")
    assert again.id == info.id, "(type, name) addresses the same secret"
    content = alice.get_secret(type="git", name=URL)
    assert content is not None and content.data == b"token-2"
    alice.delete_secret(id=info.id)  # the reference SDK calls the parameter `id`
    assert alice.get_secret(type="git", name=URL) is None


def test_list_secrets_reads_every_page(alice: SecretsClient) -> None:
    for n in range(5):
        alice.set_secret(secret_id=f"s{n}", data=b"x")
    listed = alice.list_secrets(page_size=2)
    assert sorted(s.id for s in listed) == [f"s{n}" for n in range(5)]


def test_delegation(alice: SecretsClient, bob: SecretsClient) -> None:
    alice.set_secret(secret_id="shared", data=b"for-bob", delegated_to="bob")
    assert alice.exists("shared", delegated_to="bob")
    assert not alice.exists("shared")
    content = bob.get_secret("shared", delegated_by="alice")
    assert content is not None and content.data == b"for-bob"
    [seen] = bob.list_secrets()
    assert (seen.id, seen.delegated_by, seen.delegated_to) == ("shared", "alice", "bob")
    assert bob.get_secret("shared") is None, "bob owns no secret of that id"
    alice.delete_secret("shared", delegated_to="bob")
    assert bob.get_secret("shared", delegated_by="alice") is None


def test_for_identity_needs_the_admin_grant(connect: ClientFactory) -> None:
    plain = connect("carol")
    with pytest.raises(errors.PermissionDeniedError) as denied:
        plain.set_secret(secret_id="x", data=b"v", for_identity="dave")
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "admin" in denied.value.message
    admin = connect("carol", admin=True)
    admin.set_secret(secret_id="x", data=b"v", for_identity="dave")
    assert admin.exists("x", for_identity="dave")
    content = connect("dave").get_secret("x")
    assert content is not None and content.data == b"v"


def test_stale_etag_is_aborted(alice: SecretsClient) -> None:
    first = alice.set_secret(secret_id="cas", data=b"v1")
    second = alice.set_secret(secret_id="cas", data=b"v2", etag=first.etag)
    assert second.etag != first.etag
    with pytest.raises(errors.EtagMismatchError) as stale:
        alice.set_secret(secret_id="cas", data=b"v3", etag=first.etag)
    assert isinstance(stale.value, errors.AbortedError)
    assert (stale.value.code, stale.value.reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    with pytest.raises(errors.EtagMismatchError):
        alice.delete_secret("cas", etag=first.etag)
    alice.delete_secret("cas", etag=second.etag)
    assert not alice.exists("cas")


def test_bad_or_missing_token_is_unauthenticated(server: ServerThread) -> None:
    for token in ("not-a-jwt", None):
        with (
            SecretsClient(server.address, token) as client,
            pytest.raises(errors.UnauthenticatedError) as err,
        ):
            client.list_secrets()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert str(err.value).startswith("UNAUTHENTICATED: ")


def test_token_without_the_secrets_grant_is_denied(connect: ClientFactory) -> None:
    with pytest.raises(errors.PermissionDeniedError) as denied:
        connect("alice", secrets_grant=False).list_secrets()
    assert not isinstance(denied.value, errors.RequestRejectedError)
    assert "secrets" in denied.value.message


def test_invalid_argument_names_the_field(alice: SecretsClient) -> None:
    with pytest.raises(errors.InvalidArgumentError) as bad:
        alice.set_secret(secret_id="has space", data=b"v")
    assert (bad.value.code, bad.value.field, bad.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "secret_id",
        "INVALID_ARGUMENT",
    )
    with pytest.raises(errors.InvalidArgumentError) as big:
        alice.set_secret(secret_id="big", data=b"x" * (1024 * 1024 + 1))
    assert big.value.field == "data"
    with pytest.raises(errors.NotFoundError) as missing:
        alice.delete_secret("never-was")
    assert str(missing.value) == "NOT_FOUND: secret 'never-was' not found"


def test_client_side_checks(alice: SecretsClient) -> None:
    with pytest.raises(TypeError):
        alice.set_secret(secret_id="s", data="text is not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        alice.request_secret("bob", URL, timeout=0)
    with pytest.raises(TypeError):
        alice.delete_secret()
    assert verified(b"abc", 0x364B3FB7, "x") == b"abc"  # CRC32C("abc")
    with pytest.raises(errors.ChecksumMismatchError) as corrupt:
        verified(b"abd", 0x364B3FB7, "secret 's'")
    assert corrupt.value.code == grpc.StatusCode.DATA_LOSS
    assert "abd" not in str(corrupt.value)


def test_existing_channel_and_token_function(server: ServerThread, room: Participants) -> None:
    channel = grpc.insecure_channel(server.address)
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        return room.token("alice")

    with SecretsClient(channel=channel, token=token) as client:
        client.set_secret(secret_id="via-channel", data=b"v")
    assert len(calls) == 1, "the token function is called for each call"
    # The client did not close a channel it did not open.
    with SecretsClient(channel=channel, token=room.token("alice")) as client:
        assert client.exists("via-channel")
    channel.close()


def test_mutual_tls(tmp_path: Path, data_dir: Path) -> None:
    pki = Pki(tmp_path / "pki")
    settings = test_settings(
        data_dir, tls_cert=pki.files["server"], tls_key=pki.files["server-key"], tls_client_ca=pki.files["ca"]
    )
    running = ServerThread(settings).start()
    try:
        token = Participants(running).token("alice")
        cert, key = pki.pem["client"]
        with SecretsClient(
            running.address, token, root_certificates=pki.ca, private_key=key, certificate_chain=cert
        ) as client:
            client.set_secret("over-mtls", data=b"v")
            assert client.exists("over-mtls")
        with (
            SecretsClient(running.address, token, root_certificates=pki.ca) as no_cert,
            pytest.raises(errors.UnavailableError),
        ):
            no_cert.exists("over-mtls")
        with pytest.raises(ValueError, match="both"):
            SecretsClient(running.address, token, private_key=key)
    finally:
        running.stop()


# -- requests -------------------------------------------------------------------------------------
def test_request_answered_by_a_sync_handler(alice: SecretsClient, bob: SecretsClient) -> None:
    seen: list[SecretRequest] = []

    def answer(request: SecretRequest) -> bytes:
        seen.append(request)
        return b"hunter2"

    with bob.serve_requests(secret_request_handler=answer) as handler:
        assert handler.ready
        value = alice.request_secret("bob", URL, type="git", timeout=10, delegate_to="alice")
        assert value == b"hunter2"
        [request] = seen
        assert (request.url, request.type, request.delegate_to, request.requested_by) == (
            URL,
            "git",
            "alice",
            "alice",
        )
        assert request.deadline is not None
        # Stored as bob's secret, delegated to alice: asked again, it comes from storage.
        assert alice.request_secret("bob", URL, type="git", timeout=10, delegate_to="alice") == b"hunter2"
        assert len(seen) == 1
        alice.delete_requested_secret(URL, "git", delegated_to="alice")
        assert alice.request_secret("bob", URL, type="git", timeout=10, delegate_to="alice") == b"hunter2"
        assert len(seen) == 2, "after delete_requested_secret the next request prompts again"
    assert not handler.running
    assert handler.provided == 2  # counted once the answer went out; stop() waits for that


def test_handler_given_to_the_constructor_serves_while_open(room: Participants, alice: SecretsClient) -> None:
    with SecretsClient(
        room.server.address, room.token("bob"), secret_request_handler=lambda r: r.url.encode()[::-1]
    ):
        assert alice.request_secret("bob", "abc", timeout=10) == b"cba"
    with pytest.raises(STOPPED_LISTENING):
        alice.request_secret("bob", "abc", timeout=10)


def test_raising_handler_rejects_without_leaving_the_asker_waiting(
    alice: SecretsClient, bob: SecretsClient
) -> None:
    def broken(request: SecretRequest) -> bytes:
        raise RuntimeError("vault is sealed\nline two")

    with bob.serve_requests(secret_request_handler=broken) as handler:
        started = time.monotonic()
        with pytest.raises(errors.RequestRejectedError) as rejected:
            alice.request_secret("bob", URL, timeout=30)
        assert time.monotonic() - started < 20  # at once, not after the 30 s timeout
        assert rejected.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert rejected.value.reason == "REQUEST_REJECTED"
        assert "RuntimeError: vault is sealed line two" in rejected.value.message
    assert handler.rejected == 1 and handler.provided == 0


def test_handler_declining_or_raising_reject_request(alice: SecretsClient, bob: SecretsClient) -> None:
    def decide(request: SecretRequest) -> bytes | None:
        if request.url == "decline":
            return None
        raise RejectRequest("not for you")

    with bob.serve_requests(secret_request_handler=decide):
        with pytest.raises(errors.RequestRejectedError) as declined:
            alice.request_secret("bob", "decline", timeout=10)
        assert declined.value.message.endswith(": declined")
        with pytest.raises(errors.RequestRejectedError) as refused:
            alice.request_secret("bob", "other", timeout=10)
        assert refused.value.message.endswith(": not for you")


def test_watch_requests_provide_and_reject_by_hand(alice: SecretsClient, bob: SecretsClient) -> None:
    reader = EventReader(bob)
    assert reader.next() == WatchReady(pending=0)

    thread, outcome = ask_in_background(alice, timeout=10)
    request = reader.next()
    assert isinstance(request, SecretRequest) and request.url == URL
    with pytest.raises(errors.PermissionDeniedError):
        alice.provide_secret(request.request_id, b"forged")  # only the asked participant answers
    bob.provide_secret(request.request_id, b"by-hand")
    thread.join(10)
    assert outcome == [b"by-hand"]
    assert reader.next() == RequestClosed(request.request_id, RequestState.PROVIDED, "")
    with pytest.raises(errors.RequestNotPendingError) as late:
        bob.provide_secret(request.request_id, b"again")
    assert late.value.code == grpc.StatusCode.FAILED_PRECONDITION

    thread, outcome = ask_in_background(alice, timeout=10)
    request = reader.next()
    assert isinstance(request, SecretRequest)
    bob.reject_secret(request.request_id, "not now")
    thread.join(10)
    [error] = outcome
    assert isinstance(error, errors.RequestRejectedError) and "not now" in error.message
    closed = reader.next()
    assert isinstance(closed, RequestClosed) and closed.state is RequestState.REJECTED
    assert reader.close(), "cancel() ends the iteration"


def test_nobody_listening_fails_fast(alice: SecretsClient) -> None:
    started = time.monotonic()
    with pytest.raises(errors.NotListeningError) as err:
        alice.request_secret("bob", URL, timeout=60)
    assert time.monotonic() - started < 20, "fails after the 0.5 s listener grace, not the 60 s timeout"
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_LISTENING")


def test_short_timeout_is_deadline_exceeded(alice: SecretsClient, bob: SecretsClient) -> None:
    release = threading.Event()

    def slow(request: SecretRequest) -> bytes:
        release.wait(10)
        return b"too-late"

    handler: RequestHandlerThread = bob.serve_requests(secret_request_handler=slow)
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceededError) as err:
        alice.request_secret("bob", URL, timeout=1)
    elapsed = time.monotonic() - started
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 <= elapsed < 4, elapsed
    release.set()
    handler.stop()
    assert handler.provided == 0, "the late answer found the request expired"


def test_handler_reconnects_after_a_server_restart(data_dir: Path) -> None:
    first = ServerThread(test_settings(data_dir)).start()
    address = first.address
    participants = Participants(first)
    fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]
    bob = SecretsClient(address, participants.token("bob"), options=fast_reconnect)
    alice = SecretsClient(address, participants.token("alice"), options=fast_reconnect)
    second: ServerThread | None = None
    try:
        handler = bob.serve_requests(secret_request_handler=lambda r: b"still-here")
        assert alice.request_secret("bob", URL, timeout=10) == b"still-here"
        first.stop()
        participants.close()
        assert not handler.ready
        second = ServerThread(test_settings(data_dir, listen=address)).start()
        deadline = time.monotonic() + 10
        while not handler.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handler.ready, "the handler reopened its stream on the restarted server"
        assert alice.request_secret("bob", "after-restart", timeout=10) == b"still-here"
        handler.stop()
        assert handler.error is None and handler.provided == 2
    finally:
        bob.close()
        alice.close()
        if second is not None:
            second.stop()


def test_oauth_methods_map_errors_and_never_print_the_client_secret(alice: SecretsClient) -> None:
    oauth = OAuthClientConfig(
        client_id="cid",
        client_secret="do-not-print",
        authorization_endpoint="https://idp.example/authorize",
        token_endpoint="https://idp.example/token",
        scopes=["repo", "user"],
    )
    assert "do-not-print" not in repr(oauth)
    # Nobody stored a token: None, as in the reference.
    assert alice.get_offline_oauth_token(oauth=oauth, delegated_by="bob") is None
    with pytest.raises(errors.NotFoundError):
        alice.get_offline_oauth_token(connector=ConnectorRef(name="github"), delegated_by="bob")
    with pytest.raises(errors.FailedPreconditionError) as err:
        alice.request_oauth_token(
            oauth=oauth, from_participant_id="bob", redirect_uri="https://cb", timeout=5
        )
    assert "not listening" in str(err.value) and "do-not-print" not in str(err.value)
    with pytest.raises(errors.NotFoundError):
        alice.provide_oauth_authorization("r1", "code")
    with pytest.raises(errors.NotFoundError):
        alice.reject_oauth_authorization("r1", "no")
    with pytest.raises(ValueError, match="either"):
        alice.get_offline_oauth_token(oauth=oauth, connector=ConnectorRef(name="x"))


def test_public_exports() -> None:
    package: ModuleType = roomsecrets
    if not hasattr(package, "SecretsClient"):
        # An editable install made before __init__.py existed maps `roomsecrets` as a namespace
        # package; load the real __init__ (its submodules are the ones already imported).
        init = Path(errors.__file__).with_name("__init__.py")
        spec = importlib.util.spec_from_file_location(
            "roomsecrets", init, submodule_search_locations=[str(init.parent)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(package)
    for name in package.__all__:
        assert hasattr(package, name), name
    assert package.SecretsClient is SecretsClient
    assert package.AsyncSecretsClient is AsyncSecretsClient
    assert package.NotFoundError is errors.NotFoundError
    assert issubclass(package.RequestRejectedError, package.PermissionDeniedError)
    assert issubclass(package.NotListeningError, package.FailedPreconditionError)


# -- asyncio --------------------------------------------------------------------------------------
async def test_async_client_storage_and_errors(room: Participants) -> None:
    async with AsyncSecretsClient(room.server.address, room.token("alice")) as alice:
        info = await alice.set_secret(secret_id="a1", type="text/plain", data=b"async-value")
        content = await alice.get_secret("a1")
        assert content is not None and (content.data, content.mime_type) == (b"async-value", "text/plain")
        assert await alice.get_secret("missing") is None
        assert await alice.exists("a1")
        assert [s.id for s in await alice.list_secrets(page_size=1)] == ["a1"]
        with pytest.raises(errors.EtagMismatchError):
            await alice.set_secret(secret_id="a1", data=b"x", etag="stale")
        await alice.delete_secret("a1", etag=info.etag)
        assert not await alice.exists("a1")
        with pytest.raises(errors.NotListeningError):
            await alice.request_secret("bob", URL, timeout=5)
        with pytest.raises(errors.InvalidArgumentError):
            await alice.get_offline_oauth_token()  # neither oauth nor connector
    async with AsyncSecretsClient(room.server.address, "bad-token") as anonymous:
        with pytest.raises(errors.UnauthenticatedError):
            await anonymous.list_secrets()


async def test_async_handler_answers_and_a_raising_one_rejects(room: Participants) -> None:
    async def answer(request: SecretRequest) -> bytes:
        await asyncio.sleep(0.05)
        if request.url == "explode":
            raise KeyError("no such entry")
        return b"async-" + request.url.encode()

    async with (
        AsyncSecretsClient(room.server.address, room.token("alice")) as alice,
        AsyncSecretsClient(room.server.address, room.token("bob")) as bob,
    ):
        handler = await bob.serve_requests(secret_request_handler=answer)
        assert handler.ready
        assert await alice.request_secret("bob", "u1", timeout=10) == b"async-u1"
        with pytest.raises(errors.RequestRejectedError) as rejected:
            await alice.request_secret("bob", "explode", timeout=10)
        assert "KeyError" in rejected.value.message
        await handler.stop()
        assert (handler.provided, handler.rejected) == (1, 1)
        with pytest.raises(STOPPED_LISTENING):
            await alice.request_secret("bob", "u2", timeout=10)


async def test_async_watch_requests_stream(room: Participants) -> None:
    async with (
        AsyncSecretsClient(room.server.address, room.token("alice")) as alice,
        AsyncSecretsClient(room.server.address, room.token("bob")) as bob,
    ):
        stream = bob.watch_requests()
        assert await anext(stream) == WatchReady(pending=0)
        asking = asyncio.create_task(alice.request_secret("bob", URL, timeout=10))
        request = await asyncio.wait_for(anext(stream), 5)
        assert isinstance(request, SecretRequest) and request.requested_by == "alice"
        await bob.provide_secret(request.request_id, b"from-the-stream")
        assert await asyncio.wait_for(asking, 5) == b"from-the-stream"
        closed = await asyncio.wait_for(anext(stream), 5)
        assert closed == RequestClosed(request.request_id, RequestState.PROVIDED, "")
        stream.cancel()
        with pytest.raises(StopAsyncIteration):
            await anext(stream)


async def test_async_task_form_and_cancelling_a_handler_whose_request_expired(room: Participants) -> None:
    cancelled = asyncio.Event()

    async def never_answers(request: SecretRequest) -> bytes:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"unreachable"

    async with (
        AsyncSecretsClient(room.server.address, room.token("alice")) as alice,
        AsyncSecretsClient(room.server.address, room.token("bob")) as bob,
    ):
        task = asyncio.create_task(bob.run_request_handlers(never_answers))
        await asyncio.sleep(0.3)  # the stream opens; a request within the grace would still find it
        with pytest.raises(errors.DeadlineExceededError):
            await alice.request_secret("bob", URL, timeout=1)
        await asyncio.wait_for(cancelled.wait(), 5)  # the expiry reached bob's stream
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(STOPPED_LISTENING):
            await alice.request_secret("bob", URL, timeout=5)


async def test_async_handlers_from_the_constructor(room: Participants) -> None:
    async with (
        AsyncSecretsClient(room.server.address, room.token("alice")) as alice,
        AsyncSecretsClient(
            room.server.address, room.token("bob"), secret_request_handler=lambda r: b"plain-function"
        ),
    ):
        assert await alice.request_secret("bob", URL, timeout=10) == b"plain-function"
