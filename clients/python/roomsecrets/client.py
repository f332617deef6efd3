"""`SecretsClient`: the room Secrets API over a synchronous gRPC channel.

Method names and keyword arguments follow the reference SDK's Python `SecretsClient`
(list_secrets, exists, set_secret, get_secret, delete_secret, delete_requested_secret,
request_secret, provide_secret, reject_secret, the OAuth methods) plus `watch_requests`, the
inbound stream, and `serve_requests`, the handler API on top of it.

    with SecretsClient("127.0.0.1:50051", token) as client:
        client.set_secret(secret_id="db", type="text/plain", data=b"postgres://...")
        content = client.get_secret(secret_id="db")  # FileContent, or None when missing

Every failure raises a typed `roomsecrets.errors.SecretsError`. Values travel with a CRC32C:
the client sends one with every value and verifies the one it receives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeAlias, TypeVar

import google_crc32c
import grpc

from .errors import ChecksumMismatchError, NotFoundError, error_from_rpc
from .handlers import OAuthTokenRequestHandler, RequestHandlerThread, SecretRequestHandler
from .types import (
    ConnectorInfo,
    ConnectorRef,
    FileContent,
    OAuthClientConfig,
    RequestEvent,
    SecretInfo,
    event_from_pb,
)
from .v1 import oauth_connectors_pb2 as cpb
from .v1 import oauth_connectors_pb2_grpc as cpb_grpc
from .v1 import room_secrets_pb2 as pb
from .v1 import room_secrets_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_CALL_TIMEOUT",
    "REQUEST_DEADLINE_MARGIN",
    "RequestStream",
    "SecretsClient",
    "TokenSource",
    "channel_credentials",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Deadline of every unary call except the waiting ones (request_secret, request_oauth_token).
DEFAULT_CALL_TIMEOUT = 30.0
# request_secret's gRPC deadline is its `timeout` plus this much, so the server's own answer
# (DEADLINE_EXCEEDED with reason REQUEST_EXPIRED) normally arrives before the local deadline.
REQUEST_DEADLINE_MARGIN = 5.0
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)
DEFAULT_TYPE = "application/octet-stream"

# A bearer token, or a function returning the current one (called before every call, so a
# long-lived client can refresh its token).
TokenSource: TypeAlias = str | Callable[[], str] | None

Req = TypeVar("Req")
Resp = TypeVar("Resp")


# -- shared by the sync and asyncio clients -------------------------------------------------------
def channel_credentials(
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS option is given (mutual TLS with a key and chain), else None."""
    if not (tls or root_certificates or private_key or certificate_chain):
        return None
    if bool(private_key) != bool(certificate_chain):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    given = {name for name, _ in options}
    return [*options, *(o for o in DEFAULT_OPTIONS if o[0] not in given)]


def open_channel(
    address: str | None, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    """A channel to `address` (default 127.0.0.1:50051): TLS with `credentials`, else plaintext."""
    target, opts = address or DEFAULT_ADDRESS, channel_options(options)
    if credentials is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, credentials, options=opts)


def auth_metadata(token: TokenSource) -> tuple[tuple[str, str], ...]:
    value = token() if callable(token) else token
    return (("authorization", f"Bearer {value}"),) if value else ()


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


def as_bytes(data: object, what: str = "data") -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be bytes, not {type(data).__name__}")


def verified(data: bytes, checksum: int, what: str) -> bytes:
    if crc32c(data) != checksum:
        raise ChecksumMismatchError(
            grpc.StatusCode.DATA_LOSS,
            f"{what}: the received value does not match its CRC32C",
            "CLIENT_CHECKSUM_MISMATCH",
        )
    return data


def request_deadline(timeout: float) -> tuple[int, float]:
    """(whole seconds for the wire, gRPC deadline) for a waiting call's `timeout`."""
    if timeout <= 0:
        raise ValueError("timeout must be positive (seconds)")
    seconds = math.ceil(timeout)
    return seconds, seconds + REQUEST_DEADLINE_MARGIN


def set_secret_request(
    *,
    secret_id: str | None,
    type: str | None,
    name: str | None,
    data: object,
    delegated_to: str | None,
    for_identity: str | None,
    etag: str | None,
) -> pb.SetSecretRequest:
    if data is None:
        raise ValueError("secret data is required")
    value = as_bytes(data)
    return pb.SetSecretRequest(
        secret_id=secret_id or "",
        type=type or "",
        name=name or "",
        data=value,
        delegated_to=delegated_to or "",
        for_identity=for_identity or "",
        etag=etag or "",
        data_crc32c=crc32c(value),
    )


def get_secret_request(
    *,
    secret_id: str | None,
    type: str | None,
    name: str | None,
    delegated_to: str | None,
    delegated_by: str | None,
) -> pb.GetSecretRequest:
    return pb.GetSecretRequest(
        secret_id=secret_id or "",
        type=type or "",
        name=name or "",
        delegated_to=delegated_to or "",
        delegated_by=delegated_by or "",
    )


def file_content(reply: pb.GetSecretResponse) -> FileContent:
    data = verified(reply.data, int(reply.data_crc32c), f"secret {reply.secret.id!r}")
    info = SecretInfo.from_pb(reply.secret)
    return FileContent(data=data, name=info.name, mime_type=info.type, info=info)


def delete_secret_request(
    secret_id: str | None, *, delegated_to: str | None, etag: str | None, id: str | None
) -> pb.DeleteSecretRequest:
    chosen = secret_id or id
    if not chosen:
        raise TypeError("delete_secret needs secret_id (or the reference's `id`)")
    return pb.DeleteSecretRequest(secret_id=chosen, delegated_to=delegated_to or "", etag=etag or "")


def request_secret_request(
    from_participant_id: str, url: str, *, type: str, seconds: int, delegate_to: str | None
) -> pb.RequestSecretRequest:
    return pb.RequestSecretRequest(
        from_participant_id=from_participant_id,
        url=url,
        type=type or DEFAULT_TYPE,
        timeout=seconds,
        delegate_to=delegate_to or "",
    )


def provide_secret_request(request_id: str, data: object) -> pb.ProvideSecretRequest:
    value = as_bytes(data)
    return pb.ProvideSecretRequest(request_id=request_id, data=value, data_crc32c=crc32c(value))


def _provider(
    oauth: OAuthClientConfig | None, connector: ConnectorRef | None
) -> dict[str, pb.OAuthClientConfig | pb.ConnectorRef]:
    if oauth is not None and connector is not None:
        raise ValueError("give either oauth or connector, not both")
    if oauth is not None:
        return {"oauth": oauth.to_pb()}
    if connector is not None:
        return {"connector": connector.to_pb()}
    return {}


def request_oauth_token_request(
    *,
    oauth: OAuthClientConfig | None,
    connector: ConnectorRef | None,
    from_participant_id: str,
    redirect_uri: str,
    delegate_to: str | None,
    seconds: int,
) -> pb.RequestOAuthTokenRequest:
    return pb.RequestOAuthTokenRequest(
        from_participant_id=from_participant_id,
        redirect_uri=str(redirect_uri),
        delegate_to=delegate_to or "",
        timeout=seconds,
        **_provider(oauth, connector),  # type: ignore[arg-type]
    )


def offline_oauth_token_request(
    *,
    oauth: OAuthClientConfig | None,
    connector: ConnectorRef | None,
    delegated_to: str | None,
    delegated_by: str | None,
) -> pb.GetOfflineOAuthTokenRequest:
    return pb.GetOfflineOAuthTokenRequest(
        delegated_to=delegated_to or "",
        delegated_by=delegated_by or "",
        **_provider(oauth, connector),  # type: ignore[arg-type]
    )


def access_token(reply: pb.RequestOAuthTokenResponse | pb.GetOfflineOAuthTokenResponse) -> str | None:
    return reply.access_token if reply.HasField("access_token") and reply.access_token else None


# -- the synchronous client -----------------------------------------------------------------------
class RequestStream(Iterator[RequestEvent]):
    """The WatchRequests stream as typed events. `cancel()` (or leaving a `with` block) ends it;
    iteration then simply stops. Other failures raise typed errors."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> RequestEvent:
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as err:
                if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise error_from_rpc(err) from err
            event = event_from_pb(message)
            if event is not None:
                return event

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    close = cancel

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.cancel()


class SecretsClient:
    """The room Secrets API, synchronous.

    Give `address` ("host:port") and `token` (a participant JWT, sent as `authorization: Bearer`
    on every call; or a function returning the current token). TLS: `tls=True` (system roots),
    `root_certificates`, mutual TLS with `private_key` + `certificate_chain`, or ready
    `credentials`. Or pass an existing `channel` (it is not closed by `close()`).

    `secret_request_handler` / `oauth_token_request_handler`, as in the reference SDK, answer
    inbound requests while the client is open as a context manager (see `serve_requests`).
    """

    def __init__(
        self,
        address: str | None = None,
        token: TokenSource = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        options: Sequence[tuple[str, Any]] = (),
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
        secret_request_handler: SecretRequestHandler | None = None,
        oauth_token_request_handler: OAuthTokenRequestHandler | None = None,
    ) -> None:
        self._token = token
        self.call_timeout = call_timeout
        self._own_channel = channel is None
        if channel is None:
            creds = credentials or channel_credentials(
                tls=tls,
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            channel = open_channel(address, creds, options)
        self._channel = channel
        self._stub = pb_grpc.RoomSecretsStub(channel)
        self._connectors = cpb_grpc.OAuthConnectorsStub(channel)
        self._secret_request_handler = secret_request_handler
        self._oauth_token_request_handler = oauth_token_request_handler
        self._handlers: list[RequestHandlerThread] = []
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        """Stop request handlers started by this client, then close the channel (if it is ours)."""
        if self._closed:
            return
        self._closed = True
        for handler in self._handlers:
            handler.stop()
        self._handlers.clear()
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        if self._secret_request_handler or self._oauth_token_request_handler:
            self.serve_requests()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(
                request,
                metadata=auth_metadata(self._token),
                timeout=self.call_timeout if timeout is None else timeout,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    # -- storage ------------------------------------------------------------------------------
    def list_secrets(self, *, page_size: int = 0) -> list[SecretInfo]:
        """Every secret the caller owns in the room, and those delegated to it (all pages)."""
        out: list[SecretInfo] = []
        token = ""
        while True:
            reply: pb.ListSecretsResponse = self._call(
                self._stub.ListSecrets, pb.ListSecretsRequest(page_size=page_size, page_token=token)
            )
            out.extend(SecretInfo.from_pb(s) for s in reply.secrets)
            token = reply.next_page_token
            if not token:
                return out

    def exists(
        self, secret_id: str, *, delegated_to: str | None = None, for_identity: str | None = None
    ) -> bool:
        reply: pb.ExistsResponse = self._call(
            self._stub.Exists,
            pb.ExistsRequest(
                secret_id=secret_id, delegated_to=delegated_to or "", for_identity=for_identity or ""
            ),
        )
        return bool(reply.exists)

    def set_secret(
        self,
        secret_id: str | None = None,
        *,
        type: str | None = None,
        name: str | None = None,
        data: bytes,
        delegated_to: str | None = None,
        for_identity: str | None = None,
        etag: str | None = None,
    ) -> SecretInfo:
        """Create or replace a secret, by `secret_id` or by (`type`, `name`). With `etag`, only if
        the secret is still at that version (EtagMismatchError otherwise)."""
        request = set_secret_request(
            secret_id=secret_id,
            type=type,
            name=name,
            data=data,
            delegated_to=delegated_to,
            for_identity=for_identity,
            etag=etag,
        )
        reply: pb.SetSecretResponse = self._call(self._stub.SetSecret, request)
        return SecretInfo.from_pb(reply.secret)

    def get_secret(
        self,
        secret_id: str | None = None,
        *,
        type: str | None = None,
        name: str | None = None,
        delegated_to: str | None = None,
        delegated_by: str | None = None,
    ) -> FileContent | None:
        """The value and metadata, or None when there is no such secret."""
        request = get_secret_request(
            secret_id=secret_id, type=type, name=name, delegated_to=delegated_to, delegated_by=delegated_by
        )
        try:
            reply: pb.GetSecretResponse = self._call(self._stub.GetSecret, request)
        except NotFoundError:
            return None
        return file_content(reply)

    def delete_secret(
        self,
        secret_id: str | None = None,
        *,
        delegated_to: str | None = None,
        etag: str | None = None,
        id: str | None = None,
    ) -> None:
        """Delete a secret (`id` is the reference SDK's name for `secret_id`)."""
        self._call(
            self._stub.DeleteSecret,
            delete_secret_request(secret_id, delegated_to=delegated_to, etag=etag, id=id),
        )

    def delete_requested_secret(self, url: str, type: str, *, delegated_to: str | None = None) -> None:
        self._call(
            self._stub.DeleteRequestedSecret,
            pb.DeleteRequestedSecretRequest(url=url, type=type, delegated_to=delegated_to or ""),
        )

    # -- secret requests ----------------------------------------------------------------------
    def request_secret(
        self,
        from_participant_id: str,
        url: str,
        *,
        type: str = DEFAULT_TYPE,
        timeout: float = 300,
        delegate_to: str | None = None,
    ) -> bytes:
        """Ask `from_participant_id` for a secret and wait (up to `timeout` seconds) for it.

        Raises RequestRejectedError, DeadlineExceededError, NotListeningError (nobody is
        watching requests for that identity), RequestCancelledError. Interrupting the wait
        (Ctrl-C) cancels the request.
        """
        seconds, deadline = request_deadline(timeout)
        request = request_secret_request(
            from_participant_id, url, type=type, seconds=seconds, delegate_to=delegate_to
        )
        future = self._stub.RequestSecret.future(
            request, metadata=auth_metadata(self._token), timeout=deadline
        )
        try:
            reply: pb.RequestSecretResponse = future.result()
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        except BaseException:
            future.cancel()  # type: ignore[no-untyped-call]
            raise
        return verified(reply.data, int(reply.data_crc32c), f"request {reply.request_id}")

    def provide_secret(self, request_id: str, data: bytes) -> None:
        """Answer an inbound request with the value (stored as your secret, delegated as asked)."""
        self._call(self._stub.ProvideSecret, provide_secret_request(request_id, data))

    def reject_secret(self, request_id: str, error: str) -> None:
        """Refuse an inbound request; `error` is passed to the requester."""
        self._call(self._stub.RejectSecret, pb.RejectSecretRequest(request_id=request_id, error=error))

    # -- OAuth --------------------------------------------------------------------------------
    def request_oauth_token(
        self,
        *,
        oauth: OAuthClientConfig | None = None,
        connector: ConnectorRef | None = None,
        from_participant_id: str,
        redirect_uri: str,
        delegate_to: str | None = None,
        timeout: float = 300,
    ) -> str | None:
        seconds, deadline = request_deadline(timeout)
        request = request_oauth_token_request(
            oauth=oauth,
            connector=connector,
            from_participant_id=from_participant_id,
            redirect_uri=redirect_uri,
            delegate_to=delegate_to,
            seconds=seconds,
        )
        reply: pb.RequestOAuthTokenResponse = self._call(self._stub.RequestOAuthToken, request, deadline)
        return access_token(reply)

    def provide_oauth_authorization(self, request_id: str, code: str, *, state: str | None = None) -> None:
        self._call(
            self._stub.ProvideOAuthAuthorization,
            pb.ProvideOAuthAuthorizationRequest(request_id=request_id, code=code, state=state or ""),
        )

    def reject_oauth_authorization(self, request_id: str, error: str) -> None:
        self._call(
            self._stub.RejectOAuthAuthorization,
            pb.RejectOAuthAuthorizationRequest(request_id=request_id, error=error),
        )

    def get_offline_oauth_token(
        self,
        *,
        oauth: OAuthClientConfig | None = None,
        connector: ConnectorRef | None = None,
        delegated_to: str | None = None,
        delegated_by: str | None = None,
    ) -> str | None:
        request = offline_oauth_token_request(
            oauth=oauth, connector=connector, delegated_to=delegated_to, delegated_by=delegated_by
        )
        reply: pb.GetOfflineOAuthTokenResponse = self._call(self._stub.GetOfflineOAuthToken, request)
        return access_token(reply)

    # -- OAuth connectors (room admins keep client registrations server-side) ----------------
    def set_connector(self, name: str, client: OAuthClientConfig) -> ConnectorInfo:
        """Create or replace a connector (room admin). An empty client_secret keeps the stored one."""
        reply: cpb.SetConnectorResponse = self._call(
            self._connectors.SetConnector, cpb.SetConnectorRequest(name=name, client=client.to_pb())
        )
        return ConnectorInfo.from_pb(reply.connector)

    def get_connector(self, name: str) -> ConnectorInfo | None:
        """A connector without its client secret; None when there is none by that name."""
        try:
            reply: cpb.GetConnectorResponse = self._call(
                self._connectors.GetConnector, cpb.GetConnectorRequest(name=name)
            )
        except NotFoundError:
            return None
        return ConnectorInfo.from_pb(reply.connector)

    def list_connectors(self) -> list[ConnectorInfo]:
        reply: cpb.ListConnectorsResponse = self._call(
            self._connectors.ListConnectors, cpb.ListConnectorsRequest()
        )
        return [ConnectorInfo.from_pb(c) for c in reply.connectors]

    def delete_connector(self, name: str) -> None:
        self._call(self._connectors.DeleteConnector, cpb.DeleteConnectorRequest(name=name))

    # -- the inbound side ---------------------------------------------------------------------
    def watch_requests(self) -> RequestStream:
        """Requests addressed to the caller: first the pending ones, then `WatchReady`, then new
        requests and `RequestClosed` events. Iterate it; `cancel()` ends it."""
        call = self._stub.WatchRequests(pb.WatchRequestsRequest(), metadata=auth_metadata(self._token))
        return RequestStream(call)

    def serve_requests(
        self,
        secret_request_handler: SecretRequestHandler | None = None,
        *,
        oauth_token_request_handler: OAuthTokenRequestHandler | None = None,
        max_workers: int = 4,
        reconnect: bool = True,
        ready_timeout: float | None = 10.0,
    ) -> RequestHandlerThread:
        """Answer inbound requests with handlers, on a background thread; returns its handle
        (`stop()` it, or use it as a context manager).

        `secret_request_handler(request)` returns the value (bytes) to provide it, or None to
        decline; if it raises, the request is rejected with the error's text (a `RejectRequest`
        carries a reason meant for the requester). Requests for which no handler is given are
        rejected at once, so an asker is never left waiting. With `ready_timeout`, waits until
        the stream is live (raising the error if it cannot be opened).
        """
        if self._closed:
            raise RuntimeError("the client is closed")
        handler = RequestHandlerThread(
            self,
            secret_request_handler=secret_request_handler or self._secret_request_handler,
            oauth_token_request_handler=oauth_token_request_handler or self._oauth_token_request_handler,
            max_workers=max_workers,
            reconnect=reconnect,
        )
        self._handlers.append(handler)
        handler.start()
        if ready_timeout is not None:
            try:
                handler.wait_ready(ready_timeout)
            except BaseException:
                handler.stop()
                self._handlers.remove(handler)
                raise
        return handler
