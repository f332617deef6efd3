"""roomsecrets.v1.RoomSecrets: each handler authenticates, calls one domain method and builds the
reply. Errors are turned into statuses by the decorators, through the table in errors.py."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc as pb_grpc

from ..auth.principal import Principal
from ..errors import DomainError, InvalidArgument
from ..oauth.service import OAuthService
from ..requests.notifier import RequestClosed, RequestOpened
from ..requests.service import OAUTH, RequestService, WatchReady
from ..secrets.service import SecretsService
from ..store import RequestRecord, RequestState, SecretRecord
from .convert import access_token_fields, client_ref, oauth_request, timestamp
from .errors import to_status
from .gate import Gate
from .registry import Unparsable

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Principal, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]

_STATES = {
    RequestState.PENDING: pb.REQUEST_STATE_PENDING,
    RequestState.PROVIDED: pb.REQUEST_STATE_PROVIDED,
    RequestState.REJECTED: pb.REQUEST_STATE_REJECTED,
    RequestState.EXPIRED: pb.REQUEST_STATE_EXPIRED,
    RequestState.CANCELLED: pb.REQUEST_STATE_CANCELLED,
}


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    if isinstance(error, DomainError):
        await context.abort_with_status(to_status(error))  # type: ignore[attr-defined]  # missing in grpc-stubs
    log.exception("unexpected error in %s", type(error).__name__, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def unparsable(request: Unparsable) -> InvalidArgument:
    return InvalidArgument("request", f"is not a valid {request.message} message")


def unary(
    method: Handler[Req, Resp],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    @functools.wraps(method)
    async def handler(
        self: RoomSecretsServicer, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Resp:
        principal: Principal | None = None
        try:
            principal = self.gate.authenticate(context)
            if isinstance(request, Unparsable):
                raise unparsable(request)
            return await method(self, request, principal, context)
        except Exception as error:
            await self.gate.refused(method.__name__, request, principal, error)
            await _abort(context, error)
            raise  # unreachable: abort raises

    return handler


def secret_info(record: SecretRecord, caller: str) -> pb.SecretInfo:
    info = pb.SecretInfo()
    _fill_secret_info(info, record, caller)
    return info


# SecretInfo messages recently sent, by what determines them: a secret's (key, etag) fixes its
# metadata (every write draws a new etag), and the caller decides delegated_by. Copying a kept
# message into a reply costs a third of filling it field by field (GetSecret hot path).
_INFO_CACHE_SIZE = 4096
_infos: dict[tuple[Any, str, str], pb.SecretInfo] = {}


def _copy_secret_info(into: pb.SecretInfo, record: SecretRecord, caller: str) -> None:
    cache_key = (record.key, record.etag, caller)
    info = _infos.get(cache_key)
    if info is None:
        if len(_infos) >= _INFO_CACHE_SIZE:
            _infos.clear()
        info = _infos[cache_key] = secret_info(record, caller)
    into.CopyFrom(info)


def _fill_secret_info(info: pb.SecretInfo, record: SecretRecord, caller: str) -> None:
    # Filled in place: on the GetSecret hot path this saves building a SecretInfo and copying it.
    key = record.key
    info.id = key.secret_id
    info.type = record.type
    info.name = record.name
    info.delegated_to = key.delegated_to
    info.etag = record.etag
    if key.owner != caller and key.delegated_to == caller:
        # Only for a secret another participant delegated to the caller (not, say, one an
        # admin wrote for someone else with for_identity).
        info.delegated_by = key.owner
    info.data_crc32c = record.crc32c
    info.size = record.size
    whole = int(record.update_time)
    info.update_time.seconds = whole
    info.update_time.nanos = int((record.update_time - whole) * 1e9)


def secret_request(record: RequestRecord) -> pb.SecretRequest:
    return pb.SecretRequest(
        request_id=record.request_id,
        url=record.url,
        type=record.type,
        delegate_to=record.delegate_to,
        requested_by=record.requested_by,
        deadline=timestamp(record.deadline),
    )


def _crc(message: Any) -> int | None:
    return int(message.data_crc32c) if message.HasField("data_crc32c") else None


class RoomSecretsServicer(pb_grpc.RoomSecretsServicer):
    def __init__(
        self, gate: Gate, secrets: SecretsService, requests: RequestService, oauth: OAuthService
    ) -> None:
        self.gate = gate
        self.secrets = secrets
        self.requests = requests
        self.oauth = oauth

    # -- storage ------------------------------------------------------------------------------
    @unary
    async def ListSecrets(
        self, request: pb.ListSecretsRequest, p: Principal, _: Any
    ) -> pb.ListSecretsResponse:
        records, next_token = await self.secrets.list_secrets(
            p, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListSecretsResponse(
            secrets=[secret_info(r, p.identity) for r in records], next_page_token=next_token
        )

    @unary
    async def Exists(self, request: pb.ExistsRequest, p: Principal, _: Any) -> pb.ExistsResponse:
        found = await self.secrets.exists(
            p,
            secret_id=request.secret_id,
            delegated_to=request.delegated_to,
            for_identity=request.for_identity,
        )
        return pb.ExistsResponse(exists=found)

    @unary
    async def SetSecret(self, request: pb.SetSecretRequest, p: Principal, _: Any) -> pb.SetSecretResponse:
        record = await self.secrets.set_secret(
            p,
            secret_id=request.secret_id,
            type_=request.type,
            name=request.name,
            data=request.data,
            delegated_to=request.delegated_to,
            for_identity=request.for_identity,
            etag=request.etag,
            data_crc32c=_crc(request),
        )
        return pb.SetSecretResponse(secret=secret_info(record, p.identity))

    @unary
    async def GetSecret(self, request: pb.GetSecretRequest, p: Principal, _: Any) -> pb.GetSecretResponse:
        value = await self.secrets.get_secret(
            p,
            secret_id=request.secret_id,
            type_=request.type,
            name=request.name,
            delegated_to=request.delegated_to,
            delegated_by=request.delegated_by,
        )
        reply = pb.GetSecretResponse(data=value.data, data_crc32c=value.record.crc32c)
        _copy_secret_info(reply.secret, value.record, p.identity)
        return reply

    @unary
    async def DeleteSecret(
        self, request: pb.DeleteSecretRequest, p: Principal, _: Any
    ) -> pb.DeleteSecretResponse:
        await self.secrets.delete_secret(
            p, secret_id=request.secret_id, delegated_to=request.delegated_to, etag=request.etag
        )
        return pb.DeleteSecretResponse()

    @unary
    async def DeleteRequestedSecret(
        self, request: pb.DeleteRequestedSecretRequest, p: Principal, _: Any
    ) -> pb.DeleteRequestedSecretResponse:
        await self.secrets.delete_requested_secret(
            p, url=request.url, type_=request.type, delegated_to=request.delegated_to
        )
        return pb.DeleteRequestedSecretResponse()

    # -- secret requests ----------------------------------------------------------------------
    @unary
    async def RequestSecret(
        self, request: pb.RequestSecretRequest, p: Principal, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RequestSecretResponse:
        request_id, value = await self.requests.request_secret(
            p,
            target=request.from_participant_id,
            url=request.url,
            type_=request.type,
            timeout=request.timeout,
            delegate_to=request.delegate_to,
            call_time_remaining=context.time_remaining(),
        )
        return pb.RequestSecretResponse(
            data=value.data, data_crc32c=value.record.crc32c, request_id=request_id
        )

    @unary
    async def ProvideSecret(
        self, request: pb.ProvideSecretRequest, p: Principal, _: Any
    ) -> pb.ProvideSecretResponse:
        await self.requests.provide_secret(
            p, request_id=request.request_id, data=request.data, data_crc32c=_crc(request)
        )
        return pb.ProvideSecretResponse()

    @unary
    async def RejectSecret(
        self, request: pb.RejectSecretRequest, p: Principal, _: Any
    ) -> pb.RejectSecretResponse:
        await self.requests.reject(p, request_id=request.request_id, error=request.error, kind="secret")
        return pb.RejectSecretResponse()

    # -- OAuth -------------------------------------------------------------------------------
    @unary
    async def RequestOAuthToken(
        self, request: pb.RequestOAuthTokenRequest, p: Principal, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RequestOAuthTokenResponse:
        token = await self.oauth.request_oauth_token(
            p,
            client=client_ref(request),
            target=request.from_participant_id,
            redirect_uri=request.redirect_uri,
            delegate_to=request.delegate_to,
            timeout=request.timeout,
            call_time_remaining=context.time_remaining(),
        )
        return pb.RequestOAuthTokenResponse(request_id=token.request_id, **access_token_fields(token))  # type: ignore[arg-type]

    @unary
    async def ProvideOAuthAuthorization(
        self, request: pb.ProvideOAuthAuthorizationRequest, p: Principal, _: Any
    ) -> pb.ProvideOAuthAuthorizationResponse:
        await self.oauth.provide_oauth_authorization(
            p, request_id=request.request_id, code=request.code, state=request.state
        )
        return pb.ProvideOAuthAuthorizationResponse()

    @unary
    async def RejectOAuthAuthorization(
        self, request: pb.RejectOAuthAuthorizationRequest, p: Principal, _: Any
    ) -> pb.RejectOAuthAuthorizationResponse:
        await self.oauth.reject_oauth_authorization(p, request_id=request.request_id, error=request.error)
        return pb.RejectOAuthAuthorizationResponse()

    @unary
    async def GetOfflineOAuthToken(
        self, request: pb.GetOfflineOAuthTokenRequest, p: Principal, _: Any
    ) -> pb.GetOfflineOAuthTokenResponse:
        token = await self.oauth.get_offline_oauth_token(
            p,
            client=client_ref(request),
            delegated_to=request.delegated_to,
            delegated_by=request.delegated_by,
        )
        return pb.GetOfflineOAuthTokenResponse(
            needs_reauthorization=token.needs_reauthorization,
            **access_token_fields(token),  # type: ignore[arg-type]
        )

    # -- the inbound stream -------------------------------------------------------------------
    async def WatchRequests(
        self, request: pb.WatchRequestsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchRequestsResponse]:
        principal: Principal | None = None
        opened = False
        try:
            principal = self.gate.authenticate(context)
            if isinstance(request, Unparsable):
                raise unparsable(request)
            async for event in self.requests.watch(principal):
                opened = True
                message = self._watch_event(event)
                if message is not None:
                    yield message
        except Exception as error:
            if not opened:  # refused; a stream that ran and ends (shutdown, overflow) was not
                await self.gate.refused("WatchRequests", request, principal, error)
            await _abort(context, error)

    def _watch_event(
        self, event: RequestOpened | RequestClosed | WatchReady
    ) -> pb.WatchRequestsResponse | None:
        if isinstance(event, RequestOpened):
            if event.record.kind == OAUTH:
                try:
                    prompt = self.oauth.prompt(event.record)
                except DomainError as error:
                    # One unreadable request must not end the participant's stream: skip it
                    # (it expires by its deadline) and say so in the server log, without values.
                    log.warning("skipping OAuth request %s on the stream: %s", event.record.request_id, error)
                    return None
                return pb.WatchRequestsResponse(oauth_request=oauth_request(prompt))
            return pb.WatchRequestsResponse(secret_request=secret_request(event.record))
        if isinstance(event, RequestClosed):
            closed = pb.RequestClosed(
                request_id=event.request_id, state=_STATES[event.state], reason=event.reason
            )
            return pb.WatchRequestsResponse(request_closed=closed)
        return pb.WatchRequestsResponse(ready=pb.WatchReady(pending=event.pending))
