"""`AsyncSecretsClient`: the room Secrets API over a grpc.aio channel (same names, arguments and
errors as `SecretsClient`; every method is a coroutine, `watch_requests` an async iterator).

    async with AsyncSecretsClient("127.0.0.1:50051", token) as client:
        await client.set_secret(secret_id="db", data=b"...")
        handler = await client.serve_requests(secret_request_handler=answer)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from .client import (
    DEFAULT_ADDRESS,
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_TYPE,
    TokenSource,
    access_token,
    auth_metadata,
    channel_credentials,
    channel_options,
    delete_secret_request,
    file_content,
    get_secret_request,
    offline_oauth_token_request,
    provide_secret_request,
    request_deadline,
    request_oauth_token_request,
    request_secret_request,
    set_secret_request,
    verified,
)
from .errors import NotFoundError, error_from_rpc
from .handlers import AsyncOAuthTokenRequestHandler, AsyncRequestHandler, AsyncSecretRequestHandler
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

__all__ = ["AsyncRequestStream", "AsyncSecretsClient"]


class AsyncRequestStream(AsyncIterator[RequestEvent]):
    """The WatchRequests stream as typed events. `cancel()` (or leaving an `async with` block)
    ends it; iteration then simply stops. Other failures raise typed errors."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._messages: AsyncIterator[pb.WatchRequestsResponse] = call.__aiter__()
        self._cancelled = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RequestEvent:
        while True:
            if self._cancelled:
                raise StopAsyncIteration
            try:
                message = await anext(self._messages)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._cancelled and (task is None or task.cancelling() == 0):
                    raise StopAsyncIteration from None  # our cancel(), not the task's
                raise
            except grpc.RpcError as err:
                if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:
                    raise StopAsyncIteration from None
                raise error_from_rpc(err) from err
            event = event_from_pb(message)
            if event is not None:
                return event

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cancel()


class AsyncSecretsClient:
    """The room Secrets API for asyncio. Constructor arguments as `SecretsClient`'s (an existing
    `channel` must be a grpc.aio channel). Handlers given here start answering requests when the
    client is entered with `async with`."""

    def __init__(
        self,
        address: str | None = None,
        token: TokenSource = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        options: Sequence[tuple[str, Any]] = (),
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
        secret_request_handler: AsyncSecretRequestHandler | None = None,
        oauth_token_request_handler: AsyncOAuthTokenRequestHandler | None = None,
    ) -> None:
        self._token = token
        self.call_timeout = call_timeout
        self._own_channel = channel is None
        if channel is None:
            target = address or DEFAULT_ADDRESS
            creds = credentials or channel_credentials(
                tls=tls,
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            opts = channel_options(options)
            if creds is None:
                channel = grpc.aio.insecure_channel(target, options=opts)
            else:
                channel = grpc.aio.secure_channel(target, creds, options=opts)
        self._channel = channel
        self._stub = pb_grpc.RoomSecretsStub(channel)
        self._connectors = cpb_grpc.OAuthConnectorsStub(channel)
        self._secret_request_handler = secret_request_handler
        self._oauth_token_request_handler = oauth_token_request_handler
        self._handlers: list[AsyncRequestHandler] = []
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        """Stop request handlers started by this client, then close the channel (if it is ours)."""
        if self._closed:
            return
        self._closed = True
        for handler in self._handlers:
            await handler.stop()
        self._handlers.clear()
        if self._own_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        if self._secret_request_handler or self._oauth_token_request_handler:
            await self.serve_requests()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(
                request,
                metadata=auth_metadata(self._token),
                timeout=self.call_timeout if timeout is None else timeout,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    # -- storage ------------------------------------------------------------------------------
    async def list_secrets(self, *, page_size: int = 0) -> list[SecretInfo]:
        out: list[SecretInfo] = []
        token = ""
        while True:
            reply: pb.ListSecretsResponse = await self._call(
                self._stub.ListSecrets, pb.ListSecretsRequest(page_size=page_size, page_token=token)
            )
            out.extend(SecretInfo.from_pb(s) for s in reply.secrets)
            token = reply.next_page_token
            if not token:
                return out

    async def exists(
        self, secret_id: str, *, delegated_to: str | None = None, for_identity: str | None = None
    ) -> bool:
        reply: pb.ExistsResponse = await self._call(
            self._stub.Exists,
            pb.ExistsRequest(
                secret_id=secret_id, delegated_to=delegated_to or "", for_identity=for_identity or ""
            ),
        )
        return bool(reply.exists)

    async def set_secret(
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
        request = set_secret_request(
            secret_id=secret_id,
            type=type,
            name=name,
            data=data,
            delegated_to=delegated_to,
            for_identity=for_identity,
            etag=etag,
        )
        reply: pb.SetSecretResponse = await self._call(self._stub.SetSecret, request)
        return SecretInfo.from_pb(reply.secret)

    async def get_secret(
        self,
        secret_id: str | None = None,
        *,
        type: str | None = None,
        name: str | None = None,
        delegated_to: str | None = None,
        delegated_by: str | None = None,
    ) -> FileContent | None:
        request = get_secret_request(
            secret_id=secret_id, type=type, name=name, delegated_to=delegated_to, delegated_by=delegated_by
        )
        try:
            reply: pb.GetSecretResponse = await self._call(self._stub.GetSecret, request)
        except NotFoundError:
            return None
        return file_content(reply)

    async def delete_secret(
        self,
        secret_id: str | None = None,
        *,
        delegated_to: str | None = None,
        etag: str | None = None,
        id: str | None = None,
    ) -> None:
        await self._call(
            self._stub.DeleteSecret,
            delete_secret_request(secret_id, delegated_to=delegated_to, etag=etag, id=id),
        )

    async def delete_requested_secret(self, url: str, type: str, *, delegated_to: str | None = None) -> None:
        await self._call(
            self._stub.DeleteRequestedSecret,
            pb.DeleteRequestedSecretRequest(url=url, type=type, delegated_to=delegated_to or ""),
        )

    # -- secret requests ----------------------------------------------------------------------
    async def request_secret(
        self,
        from_participant_id: str,
        url: str,
        *,
        type: str = DEFAULT_TYPE,
        timeout: float = 300,
        delegate_to: str | None = None,
    ) -> bytes:
        """Ask `from_participant_id` for a secret and wait for it. Cancelling the awaiting task
        cancels the request."""
        seconds, deadline = request_deadline(timeout)
        request = request_secret_request(
            from_participant_id, url, type=type, seconds=seconds, delegate_to=delegate_to
        )
        reply: pb.RequestSecretResponse = await self._call(self._stub.RequestSecret, request, deadline)
        return verified(reply.data, int(reply.data_crc32c), f"request {reply.request_id}")

    async def provide_secret(self, request_id: str, data: bytes) -> None:
        await self._call(self._stub.ProvideSecret, provide_secret_request(request_id, data))

    async def reject_secret(self, request_id: str, error: str) -> None:
        await self._call(self._stub.RejectSecret, pb.RejectSecretRequest(request_id=request_id, error=error))

    # -- OAuth --------------------------------------------------------------------------------
    async def request_oauth_token(
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
        reply: pb.RequestOAuthTokenResponse = await self._call(
            self._stub.RequestOAuthToken, request, deadline
        )
        return access_token(reply)

    async def provide_oauth_authorization(
        self, request_id: str, code: str, *, state: str | None = None
    ) -> None:
        await self._call(
            self._stub.ProvideOAuthAuthorization,
            pb.ProvideOAuthAuthorizationRequest(request_id=request_id, code=code, state=state or ""),
        )

    async def reject_oauth_authorization(self, request_id: str, error: str) -> None:
        await self._call(
            self._stub.RejectOAuthAuthorization,
            pb.RejectOAuthAuthorizationRequest(request_id=request_id, error=error),
        )

    async def get_offline_oauth_token(
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
        reply: pb.GetOfflineOAuthTokenResponse = await self._call(self._stub.GetOfflineOAuthToken, request)
        return access_token(reply)

    # -- OAuth connectors (room admins keep client registrations server-side) ----------------
    async def set_connector(self, name: str, client: OAuthClientConfig) -> ConnectorInfo:
        """Create or replace a connector (room admin). An empty client_secret keeps the stored one."""
        reply: cpb.SetConnectorResponse = await self._call(
            self._connectors.SetConnector, cpb.SetConnectorRequest(name=name, client=client.to_pb())
        )
        return ConnectorInfo.from_pb(reply.connector)

    async def get_connector(self, name: str) -> ConnectorInfo | None:
        """A connector without its client secret; None when there is none by that name."""
        try:
            reply: cpb.GetConnectorResponse = await self._call(
                self._connectors.GetConnector, cpb.GetConnectorRequest(name=name)
            )
        except NotFoundError:
            return None
        return ConnectorInfo.from_pb(reply.connector)

    async def list_connectors(self) -> list[ConnectorInfo]:
        reply: cpb.ListConnectorsResponse = await self._call(
            self._connectors.ListConnectors, cpb.ListConnectorsRequest()
        )
        return [ConnectorInfo.from_pb(c) for c in reply.connectors]

    async def delete_connector(self, name: str) -> None:
        await self._call(self._connectors.DeleteConnector, cpb.DeleteConnectorRequest(name=name))

    # -- the inbound side ---------------------------------------------------------------------
    def watch_requests(self) -> AsyncRequestStream:
        """Requests addressed to the caller, as an async iterator of typed events: first the
        pending ones, then `WatchReady`, then new requests and `RequestClosed` events."""
        call = self._stub.WatchRequests(pb.WatchRequestsRequest(), metadata=auth_metadata(self._token))
        return AsyncRequestStream(call)

    def request_handler(
        self,
        secret_request_handler: AsyncSecretRequestHandler | None = None,
        *,
        oauth_token_request_handler: AsyncOAuthTokenRequestHandler | None = None,
        reconnect: bool = True,
    ) -> AsyncRequestHandler:
        """A handler runner, not started: `await it.run()`, `it.start()`, or `async with it`."""
        handler = AsyncRequestHandler(
            self,
            secret_request_handler=secret_request_handler or self._secret_request_handler,
            oauth_token_request_handler=oauth_token_request_handler or self._oauth_token_request_handler,
            reconnect=reconnect,
        )
        self._handlers.append(handler)
        return handler

    async def serve_requests(
        self,
        secret_request_handler: AsyncSecretRequestHandler | None = None,
        *,
        oauth_token_request_handler: AsyncOAuthTokenRequestHandler | None = None,
        reconnect: bool = True,
        ready_timeout: float | None = 10.0,
    ) -> AsyncRequestHandler:
        """Start answering inbound requests in a background task and return its handle once the
        stream is live (`await handle.stop()` to end it; the client's close() also does).

        Handlers may be coroutines or plain functions; see `SecretsClient.serve_requests`.
        """
        if self._closed:
            raise RuntimeError("the client is closed")
        handler = self.request_handler(
            secret_request_handler,
            oauth_token_request_handler=oauth_token_request_handler,
            reconnect=reconnect,
        ).start()
        if ready_timeout is not None:
            try:
                await handler.wait_ready(ready_timeout)
            except BaseException:
                await handler.stop()
                self._handlers.remove(handler)
                raise
        return handler

    async def run_request_handlers(
        self,
        secret_request_handler: AsyncSecretRequestHandler | None = None,
        *,
        oauth_token_request_handler: AsyncOAuthTokenRequestHandler | None = None,
        reconnect: bool = True,
    ) -> None:
        """Answer inbound requests until cancelled (or until the stream fails for good, raising
        that error). The task form: `asyncio.create_task(client.run_request_handlers(fn))`."""
        handler = self.request_handler(
            secret_request_handler,
            oauth_token_request_handler=oauth_token_request_handler,
            reconnect=reconnect,
        )
        try:
            await handler.run()
        finally:
            if handler in self._handlers:
                self._handlers.remove(handler)
