"""Protobuf <-> domain conversions shared by the RPC adapters."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from roomsecrets.v1 import room_secrets_pb2 as pb

from ..oauth.provider import ClientConfig
from ..oauth.service import AccessToken, ClientRef, OAuthPrompt


def timestamp(seconds: float) -> Timestamp:
    whole = int(seconds)
    return Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def client_config(message: pb.OAuthClientConfig) -> ClientConfig:
    return ClientConfig(
        client_id=message.client_id,
        client_secret=message.client_secret,
        authorization_endpoint=message.authorization_endpoint,
        token_endpoint=message.token_endpoint,
        scopes=tuple(message.scopes),
        pkce=not message.no_pkce,
        extra_params=tuple(message.extra_params.items()),
        auth_method=message.token_endpoint_auth_method,
    )


def client_ref(message: pb.RequestOAuthTokenRequest | pb.GetOfflineOAuthTokenRequest) -> ClientRef:
    which = message.WhichOneof("provider")
    if which == "oauth":
        return ClientRef(config=client_config(message.oauth))
    if which == "connector":
        ref = message.connector
        return ClientRef(connector=ref.name, client_secret_id=ref.client_secret_id, server_url=ref.server_url)
    return ClientRef()


def oauth_request(prompt: OAuthPrompt) -> pb.OAuthRequest:
    config = prompt.config
    return pb.OAuthRequest(
        request_id=prompt.request_id,
        authorization_url=prompt.authorization_url,
        authorization_endpoint=config.authorization_endpoint,
        token_endpoint=config.token_endpoint,
        client_id=config.client_id,
        scopes=config.scopes,
        challenge=prompt.challenge,
        redirect_uri=prompt.redirect_uri,
        state=prompt.state,
        delegate_to=prompt.delegate_to,
        requested_by=prompt.requested_by,
        deadline=timestamp(prompt.deadline),
    )


def access_token_fields(token: AccessToken) -> dict[str, object]:
    fields: dict[str, object] = {"scopes": token.scopes}
    if token.access_token is not None:
        fields["access_token"] = token.access_token
    if token.expires_at is not None:
        fields["expire_time"] = timestamp(token.expires_at)
    return fields
