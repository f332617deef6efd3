"""OAuth 2.0 clients and tokens: the client registration, the stored token set, and the calls to
an authorization server (authorization URL with state + PKCE S256, code exchange, refresh), all
through authlib over HTTP, and every HTTP call through the egress policy (egress.py).

Nothing here logs. Errors name the endpoint and the provider's OAuth error code (one of the
standard codes; anything else is "invalid_response"), never a token, code, verifier, client
secret, or text the provider wrote.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from authlib.common.security import generate_token
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client

from .. import validate
from ..egress import EgressDenied, EgressPolicy, odd_ipv4_spelling
from ..errors import FailedPrecondition, InvalidArgument

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
TOKEN_TYPE = "application/vnd.roomsecrets.oauth-token+json"  # noqa: S105 - a MIME type
TOKEN_ID_PREFIX = "oauth:"  # noqa: S105 - an id prefix
MAX_SCOPES = 64
MAX_EXTRA_PARAMS = 32
MAX_CODE = 4096
# A provider's expires_in is capped at ten years (a longer one is as good as never expiring).
MAX_TOKEN_LIFETIME = 10 * 365 * 86400.0
# The error codes of RFC 6749 5.2 (token endpoint) and 4.1.2.1 (server_error,
# temporarily_unavailable, access_denied): the only provider text a caller ever sees.
OAUTH_ERROR_CODES = frozenset(
    (
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
        "access_denied",
    )
)
UNKNOWN_ERROR_CODE = "invalid_response"
# Authorization-URL parameters the server sets itself; extra_params may not override them.
_RESERVED_PARAMS = frozenset(
    (
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    )
)


class ProviderError(FailedPrecondition):
    """The authorization server refused (an OAuth error response)."""

    reason = "OAUTH_PROVIDER_ERROR"

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


def _check_url(value: str, field_name: str, *, required: bool = True) -> str:
    value = validate.text(value, field_name, validate.MAX_URL, required=required)
    if not value:
        return value
    parts = _split(value, field_name)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidArgument(field_name, "must be an absolute https URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(field_name, "must not carry user:password@ (the client authenticates itself)")
    if odd_ipv4_spelling(parts.hostname):
        raise InvalidArgument(field_name, "must write an IPv4 address in dotted-decimal form")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise InvalidArgument(field_name, "has an invalid port") from None
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise InvalidArgument(field_name, "must use https (plain http is accepted for loopback hosts only)")
    if parts.fragment:
        raise InvalidArgument(field_name, "must not have a #fragment")
    if _unnormalized_path(parts.path):
        # The HTTP client would normalize these away after a grant's prefix (`.../tenant-a/*`)
        # was matched against the raw string: `.../tenant-a/../tenant-b/token`.
        raise InvalidArgument(
            field_name, "must not contain . or .. path segments, backslashes or encoded slashes"
        )
    return value


def _unnormalized_path(path: str) -> bool:
    """Whether some server on the way could read `path` as another path: dot segments, also
    percent-encoded (once or more), with a `;params` suffix (`..;` is `..` to Tomcat, Jetty and
    Spring), backslashes, or encoded slashes."""
    if "\\" in path or re.search("%(2f|5c)", path, re.IGNORECASE):
        return True
    for _ in range(3):  # a server that decodes twice sees %252e%252e as ..
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    if "\\" in path:
        return True
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))


def _split(value: str, field_name: str) -> SplitResult:
    try:
        return urlsplit(value)
    except ValueError:  # e.g. "https://[::1" or a host NFKC-normalizing to a delimiter
        raise InvalidArgument(field_name, "is not a valid URL") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """An OAuth client registration: given inline by a caller, or held by a connector."""

    client_id: str
    authorization_endpoint: str
    token_endpoint: str
    client_secret: str = field(default="", repr=False)
    scopes: tuple[str, ...] = ()
    pkce: bool = True
    extra_params: tuple[tuple[str, str], ...] = ()
    auth_method: str = ""

    def validated(self, prefix: str) -> ClientConfig:
        """This config checked field by field; errors name `<prefix>.<field>`."""
        client_id = validate.text(self.client_id, f"{prefix}.client_id", validate.MAX_NAME, required=True)
        if len(self.scopes) > MAX_SCOPES:
            raise InvalidArgument(f"{prefix}.scopes", f"at most {MAX_SCOPES} scopes")
        for scope in self.scopes:
            validate.text(scope, f"{prefix}.scopes", validate.MAX_TYPE, required=True)
            if " " in scope:
                raise InvalidArgument(f"{prefix}.scopes", "one scope per entry, without spaces")
        if len(self.extra_params) > MAX_EXTRA_PARAMS:
            raise InvalidArgument(f"{prefix}.extra_params", f"at most {MAX_EXTRA_PARAMS} parameters")
        for key, value in self.extra_params:
            validate.text(key, f"{prefix}.extra_params", validate.MAX_TYPE, required=True)
            validate.text(value, f"{prefix}.extra_params", validate.MAX_URL)
            if key in _RESERVED_PARAMS:
                raise InvalidArgument(f"{prefix}.extra_params", f"{key!r} is set by the server")
        auth_method = self.auth_method or ("client_secret_basic" if self.client_secret else "none")
        if auth_method not in AUTH_METHODS:
            raise InvalidArgument(
                f"{prefix}.token_endpoint_auth_method", f"must be one of {', '.join(AUTH_METHODS)}"
            )
        if auth_method != "none" and not self.client_secret:
            raise InvalidArgument(f"{prefix}.client_secret", f"is required for {auth_method}")
        validate.text(self.client_secret, f"{prefix}.client_secret", validate.MAX_URL)
        return replace(
            self,
            client_id=client_id,
            authorization_endpoint=_check_url(
                self.authorization_endpoint, f"{prefix}.authorization_endpoint"
            ),
            token_endpoint=_check_url(self.token_endpoint, f"{prefix}.token_endpoint"),
            extra_params=tuple(sorted(self.extra_params)),
            auth_method=auth_method,
        )

    @property
    def token_secret_id(self) -> str:
        """Where tokens for this client are stored: one row per (token endpoint, client id),
        whether the client was given inline or through a connector."""
        digest = hashlib.sha256(f"{self.token_endpoint}\n{self.client_id}".encode()).hexdigest()
        return TOKEN_ID_PREFIX + digest[:40]

    def to_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "scopes": list(self.scopes),
            "pkce": self.pkce,
            "extra_params": [list(p) for p in self.extra_params],
            "auth_method": self.auth_method,
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> ClientConfig:
        return ClientConfig(
            client_id=doc["client_id"],
            client_secret=doc["client_secret"],
            authorization_endpoint=doc["authorization_endpoint"],
            token_endpoint=doc["token_endpoint"],
            scopes=tuple(doc["scopes"]),
            pkce=bool(doc["pkce"]),
            extra_params=tuple((k, v) for k, v in doc["extra_params"]),
            auth_method=doc["auth_method"],
        )


@dataclass(frozen=True, slots=True)
class TokenSet:
    """What is stored (sealed) for one client, owner and delegation."""

    access_token: str = field(repr=False)
    refresh_token: str = field(default="", repr=False)
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type
    expires_at: float | None = None
    scopes: tuple[str, ...] = ()
    needs_reauthorization: bool = False
    obtained_at: float = 0.0

    def due(self, margin: float, now: float | None = None) -> bool:
        """Expired, or expiring within `margin` seconds (at most half the token's lifetime, so
        a short-lived token is not refreshed on every use)."""
        if self.expires_at is None:
            return False
        lifetime = self.expires_at - self.obtained_at
        return self.expires_at - min(margin, lifetime / 2) <= (now or time.time())

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "access_token": self.access_token,
                "refresh_token": self.refresh_token,
                "token_type": self.token_type,
                "expires_at": self.expires_at,
                "scopes": list(self.scopes),
                "needs_reauthorization": self.needs_reauthorization,
                "obtained_at": self.obtained_at,
            }
        ).encode()

    @staticmethod
    def from_bytes(raw: bytes) -> TokenSet:
        doc = json.loads(raw)
        return TokenSet(
            access_token=doc["access_token"],
            refresh_token=doc["refresh_token"],
            token_type=doc["token_type"],
            expires_at=_bounded_expiry(doc["expires_at"], float(doc["obtained_at"])),
            scopes=tuple(doc["scopes"]),
            needs_reauthorization=bool(doc["needs_reauthorization"]),
            obtained_at=float(doc["obtained_at"]),
        )

    @staticmethod
    def from_response(
        token: dict[str, Any], requested: tuple[str, ...], previous: TokenSet | None
    ) -> TokenSet:
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise ProviderError("the token endpoint answered without an access_token", "invalid_response")
        now = time.time()
        # From expires_in when given: authlib's own expires_at is truncated to whole seconds.
        expires_in, expires_at = token.get("expires_in"), token.get("expires_at")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            expires_at = now + min(max(float(expires_in), 0.0), MAX_TOKEN_LIFETIME)
        scope = token.get("scope")
        return TokenSet(
            access_token=access,
            # A provider that does not rotate refresh tokens omits it on refresh: keep the old one.
            refresh_token=str(token.get("refresh_token") or (previous.refresh_token if previous else "")),
            token_type=str(token.get("token_type") or "Bearer"),
            expires_at=_bounded_expiry(expires_at, now),
            scopes=tuple(scope.split()) if isinstance(scope, str) else requested,
            obtained_at=now,
        )


def _bounded_expiry(expires_at: object, now: float) -> float | None:
    """An expiry time a reply (google.protobuf.Timestamp, up to year 9999) can carry: a provider
    saying 1e308 seconds, infinity or NaN must not leave a token every read fails on (INTERNAL)."""
    if not isinstance(expires_at, int | float) or isinstance(expires_at, bool) or math.isnan(expires_at):
        return None
    return min(max(float(expires_at), 0.0), now + MAX_TOKEN_LIFETIME)


class AuthorizationServer:
    """Calls authorization servers over HTTP (authlib's OAuth 2.0 client on httpx), every call
    through the egress policy."""

    def __init__(self, egress: EgressPolicy) -> None:
        self._egress = egress

    @property
    def call_seconds(self) -> float:
        """The most one call to a token endpoint takes (the egress policy's bound)."""
        return self._egress.timeout

    def checked(self, config: ClientConfig, prefix: str) -> ClientConfig:
        """A client config a caller gives (inline, or to store as a connector): checked field by
        field, and a token endpoint at an IP address the egress policy refuses refused at once."""
        checked = config.validated(prefix)
        self.check_destination(checked, prefix, given=True)
        return checked

    def check_destination(self, config: ClientConfig, prefix: str, *, given: bool) -> None:
        """Refuse now a token endpoint whose IP address the policy would refuse at connection
        time (host names are judged then): INVALID_ARGUMENT if the caller `given` it, else (a
        stored connector) EGRESS_DENIED."""
        refused = self._egress.literal_refusal(config.token_endpoint)
        if refused is None:
            return
        if given:
            raise InvalidArgument(f"{prefix}.token_endpoint", refused)
        raise EgressDenied(f"{prefix}.token_endpoint: {refused}")

    def _client(self, config: ClientConfig, field: str, redirect_uri: str = "") -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=config.client_id,
            client_secret=config.client_secret or None,
            token_endpoint_auth_method=config.auth_method,
            scope=" ".join(config.scopes) or None,
            redirect_uri=redirect_uri or None,
            code_challenge_method="S256" if config.pkce else None,
            **self._egress.client_options(field),
        )

    def authorization_url(self, config: ClientConfig, redirect_uri: str, state: str, verifier: str) -> str:
        client = self._client(config, "authorization_endpoint", redirect_uri)  # builds a URL, no call
        url, _ = client.create_authorization_url(
            config.authorization_endpoint,
            state=state,
            code_verifier=verifier if config.pkce else None,
            **dict(config.extra_params),
        )
        return str(url)

    async def exchange_code(
        self, config: ClientConfig, *, code: str, redirect_uri: str, verifier: str, prefix: str
    ) -> TokenSet:
        pkce = {"code_verifier": verifier} if config.pkce else {}
        token = await self._call(
            config,
            prefix,
            "exchanging the authorization code",
            lambda client: client.fetch_token(
                config.token_endpoint, grant_type="authorization_code", code=code, **pkce
            ),
            redirect_uri,
        )
        return TokenSet.from_response(token, config.scopes, None)

    async def refresh(self, config: ClientConfig, tokens: TokenSet, *, prefix: str) -> TokenSet:
        token = await self._call(
            config,
            prefix,
            "refreshing the token",
            lambda client: client.refresh_token(config.token_endpoint, refresh_token=tokens.refresh_token),
        )
        return TokenSet.from_response(token, tokens.scopes, tokens)

    async def _call(
        self,
        config: ClientConfig,
        prefix: str,
        doing: str,
        call: Callable[[AsyncOAuth2Client], Awaitable[Any]],
        redirect_uri: str = "",
    ) -> dict[str, Any]:
        field = f"{prefix}.token_endpoint"
        async with self._egress.guard(field, unavailable_reason="OAUTH_PROVIDER_UNAVAILABLE"):
            async with self._client(config, field, redirect_uri) as client:
                try:
                    token = await call(client)
                except OAuthError as exc:
                    # Only a standard error code: descriptions, and codes made up, are free text
                    # from whoever answered at that URL.
                    error = exc.error if isinstance(exc.error, str) else ""
                    error = error if error in OAUTH_ERROR_CODES else UNKNOWN_ERROR_CODE
                    raise ProviderError(
                        f"the token endpoint {config.token_endpoint} refused {doing}: {error}", error
                    ) from None
            return dict(token)


def new_state() -> str:
    return _token(24)


def new_verifier() -> str:
    return _token(48)  # 64 characters; RFC 7636 allows 43-128


def _token(length: int) -> str:
    return str(generate_token(length))


def check_code(code: str) -> str:
    return validate.text(code, "code", MAX_CODE, required=True)


def check_redirect_uri(value: str) -> str:
    value = validate.text(value, "redirect_uri", validate.MAX_URL, required=True)
    parts = _split(value, "redirect_uri")
    if not parts.scheme or (parts.scheme in ("http", "https") and not parts.hostname):
        raise InvalidArgument("redirect_uri", "must be an absolute URI")
    return value
