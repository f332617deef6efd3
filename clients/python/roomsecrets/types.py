"""The client's data types (named after the reference SDK's) and their protobuf conversions.

No type here ever shows a secret value in its repr: `FileContent.data` is left out of it, so a
logged or printed result does not leak the value.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp

from .v1 import oauth_connectors_pb2 as cpb
from .v1 import room_secrets_pb2 as pb

__all__ = [
    "ConnectorInfo",
    "ConnectorRef",
    "FileContent",
    "OAuthClientConfig",
    "OAuthTokenRequest",
    "RequestClosed",
    "RequestEvent",
    "RequestState",
    "SecretInfo",
    "SecretRequest",
    "WatchReady",
]


def _time(ts: Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """Metadata of a stored secret; never its value.

    `delegated_to` is the identity allowed to use the secret on the owner's behalf (None when not
    delegated); `delegated_by` is set when another participant owns the secret and delegated it to
    the caller. Pass `etag` back to set_secret/delete_secret for check-and-set.
    """

    id: str
    type: str
    name: str
    delegated_to: str | None = None
    delegated_by: str | None = None
    etag: str = ""
    data_crc32c: int = 0
    size: int = 0
    update_time: datetime | None = None

    @classmethod
    def from_pb(cls, message: pb.SecretInfo) -> SecretInfo:
        return cls(
            id=message.id,
            type=message.type,
            name=message.name,
            delegated_to=message.delegated_to or None,
            delegated_by=message.delegated_by or None,
            etag=message.etag,
            data_crc32c=int(message.data_crc32c),
            size=int(message.size),
            update_time=_time(message.update_time),
        )


@dataclass(frozen=True, slots=True)
class FileContent:
    """A secret's value as returned by get_secret: `data`, `name`, and `mime_type` (its type).

    `info` holds the full metadata (etag, delegation, ...). `data` is kept out of the repr.
    """

    data: bytes = field(repr=False)
    name: str
    mime_type: str
    info: SecretInfo | None = None


class RequestState(enum.Enum):
    """Where a request stands. Every request ends in exactly one of the terminal states."""

    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    PROVIDED = "provided"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @classmethod
    def from_pb(cls, value: int) -> RequestState:
        return _STATES.get(value, cls.UNSPECIFIED)


_STATES: dict[int, RequestState] = {
    pb.REQUEST_STATE_PENDING: RequestState.PENDING,
    pb.REQUEST_STATE_PROVIDED: RequestState.PROVIDED,
    pb.REQUEST_STATE_REJECTED: RequestState.REJECTED,
    pb.REQUEST_STATE_EXPIRED: RequestState.EXPIRED,
    pb.REQUEST_STATE_CANCELLED: RequestState.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class SecretRequest:
    """An inbound request for a secret (what a `secret_request_handler` receives).

    `requested_by` is the identity who asked; `deadline` when the request expires.
    """

    request_id: str
    url: str
    type: str
    delegate_to: str | None = None
    requested_by: str = ""
    deadline: datetime | None = None

    @classmethod
    def from_pb(cls, message: pb.SecretRequest) -> SecretRequest:
        return cls(
            request_id=message.request_id,
            url=message.url,
            type=message.type,
            delegate_to=message.delegate_to or None,
            requested_by=message.requested_by,
            deadline=_time(message.deadline),
        )


@dataclass(frozen=True, slots=True)
class OAuthTokenRequest:
    """An inbound request to authorize an OAuth client (what an `oauth_token_request_handler`
    receives). Open `authorization_url`, let the user consent, and return the code from the
    redirect. Never carries a client secret."""

    request_id: str
    authorization_url: str = ""
    authorization_endpoint: str = ""
    token_endpoint: str = ""
    client_id: str = ""
    scopes: tuple[str, ...] = ()
    challenge: str | None = None
    redirect_uri: str = ""
    state: str = ""
    delegate_to: str | None = None
    requested_by: str = ""
    deadline: datetime | None = None

    @classmethod
    def from_pb(cls, message: pb.OAuthRequest) -> OAuthTokenRequest:
        return cls(
            request_id=message.request_id,
            authorization_url=message.authorization_url,
            authorization_endpoint=message.authorization_endpoint,
            token_endpoint=message.token_endpoint,
            client_id=message.client_id,
            scopes=tuple(message.scopes),
            challenge=message.challenge or None,
            redirect_uri=message.redirect_uri,
            state=message.state,
            delegate_to=message.delegate_to or None,
            requested_by=message.requested_by,
            deadline=_time(message.deadline),
        )


@dataclass(frozen=True, slots=True)
class RequestClosed:
    """A request addressed to the caller left the pending state (answered, expired, ...)."""

    request_id: str
    state: RequestState
    reason: str = ""

    @classmethod
    def from_pb(cls, message: pb.RequestClosed) -> RequestClosed:
        return cls(
            request_id=message.request_id, state=RequestState.from_pb(message.state), reason=message.reason
        )


@dataclass(frozen=True, slots=True)
class WatchReady:
    """Sent once per stream after the replay of pending requests: the stream is live."""

    pending: int


RequestEvent: TypeAlias = SecretRequest | OAuthTokenRequest | RequestClosed | WatchReady


def event_from_pb(message: pb.WatchRequestsResponse) -> RequestEvent | None:
    """The typed event, or None for an event kind this client does not know (newer server)."""
    kind = message.WhichOneof("event")
    if kind == "secret_request":
        return SecretRequest.from_pb(message.secret_request)
    if kind == "oauth_request":
        return OAuthTokenRequest.from_pb(message.oauth_request)
    if kind == "request_closed":
        return RequestClosed.from_pb(message.request_closed)
    if kind == "ready":
        return WatchReady(pending=int(message.ready.pending))
    return None


@dataclass(frozen=True, slots=True)
class OAuthClientConfig:
    """An OAuth 2.0 client given inline. The client secret is sent to the server only (which does
    the code exchange); it never reaches the participant asked to authorize."""

    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    authorization_endpoint: str = ""
    token_endpoint: str = ""
    scopes: tuple[str, ...] | list[str] = ()
    no_pkce: bool = False
    # Extra authorization-URL parameters, e.g. {"access_type": "offline", "prompt": "consent"}.
    extra_params: Mapping[str, str] = field(default_factory=dict)
    # "client_secret_basic" (default with a secret), "client_secret_post", or "none".
    token_endpoint_auth_method: str = ""

    def to_pb(self) -> pb.OAuthClientConfig:
        return pb.OAuthClientConfig(
            client_id=self.client_id,
            client_secret=self.client_secret,
            authorization_endpoint=self.authorization_endpoint,
            token_endpoint=self.token_endpoint,
            scopes=list(self.scopes),
            no_pkce=self.no_pkce,
            extra_params=dict(self.extra_params),
            token_endpoint_auth_method=self.token_endpoint_auth_method,
        )


@dataclass(frozen=True, slots=True)
class ConnectorInfo:
    """An OAuth connector as the server describes it: never its client secret."""

    name: str
    client_id: str
    authorization_endpoint: str
    token_endpoint: str
    scopes: tuple[str, ...] = ()
    no_pkce: bool = False
    extra_params: Mapping[str, str] = field(default_factory=dict)
    token_endpoint_auth_method: str = ""
    has_client_secret: bool = False
    update_time: datetime | None = None

    @classmethod
    def from_pb(cls, message: cpb.ConnectorInfo) -> ConnectorInfo:
        return cls(
            name=message.name,
            client_id=message.client_id,
            authorization_endpoint=message.authorization_endpoint,
            token_endpoint=message.token_endpoint,
            scopes=tuple(message.scopes),
            no_pkce=message.no_pkce,
            extra_params=dict(message.extra_params),
            token_endpoint_auth_method=message.token_endpoint_auth_method,
            has_client_secret=message.has_client_secret,
            update_time=_time(message.update_time),
        )


@dataclass(frozen=True, slots=True)
class ConnectorRef:
    """A reference to an OAuth client registration held server-side."""

    name: str = ""
    client_secret_id: str = ""
    server_url: str = ""

    def to_pb(self) -> pb.ConnectorRef:
        return pb.ConnectorRef(
            name=self.name, client_secret_id=self.client_secret_id, server_url=self.server_url
        )
