"""A real OAuth 2.0 authorization server for tests, on loopback over real HTTP.

Built from authlib's server components (Flask integration) with in-memory models. Grants: authorization
code with PKCE required of every client (S256 only; a code is single-use), and refresh token with rotation
(each refresh spends the old refresh token; a spent or revoked one gets ``invalid_grant``). Clients
authenticate at the token endpoint by ``client_secret_basic`` or ``client_secret_post``. The authorization
endpoint auto-consents for one logged-in test user, whose agent :meth:`OAuthProvider.authorize` plays.
"""

from __future__ import annotations

import collections
import hmac
import threading
import time
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx2 as httpx
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import (
    AuthorizationCodeMixin,
    ClientMixin,
    InvalidRequestError,
    TokenMixin,
    grants,
)
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, Response, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

TEST_USER_ID = "user-1"
AUTH_METHODS = ("client_secret_basic", "client_secret_post")
GRANT_TYPES = ("authorization_code", "refresh_token")


class AuthorizationDenied(Exception):
    """The authorization endpoint answered with an OAuth error (``.error``) instead of a code."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    scope: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return self.scope
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(client_secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in GRANT_TYPES


@dataclass
class AuthorizationCode(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str | None
    scope: str
    user_id: str
    code_challenge: str
    code_challenge_method: str

    def get_redirect_uri(self) -> str | None:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class RefreshToken(TokenMixin):  # type: ignore[misc]
    refresh_token: str
    client_id: str
    user_id: str
    scope: str
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope


class _StrictPKCE(CodeChallenge):  # type: ignore[misc]
    """PKCE for every client, S256 only (authlib's ``required=True`` binds only public clients)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("Missing 'code_challenge'")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("'code_challenge_method' must be 'S256'")
        super().validate_code_challenge(grant, redirect_uri)


class _CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = list(AUTH_METHODS)

    def save_authorization_code(self, code: str, req: Any) -> None:
        p: OAuthProvider = self.server.provider
        challenge = req.payload.data["code_challenge"], req.payload.data["code_challenge_method"]
        item = AuthorizationCode(
            code, req.client.client_id, req.payload.redirect_uri, req.scope, req.user, *challenge
        )
        with p._lock:
            p._codes[code] = item
            p._secrets.append(code)

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        p: OAuthProvider = self.server.provider
        with p._lock:  # claimed (removed) at once, so a code is good for one exchange even under races
            item = p._codes.pop(code, None)
        return item if item and item.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        pass  # already removed by query_authorization_code

    def authenticate_user(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.user_id


class _RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = list(AUTH_METHODS)
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        p: OAuthProvider = self.server.provider
        with p._lock:  # spent at once: of two overlapping refreshes with one token, only one succeeds
            item = p._refresh_tokens.get(refresh_token)
            if item is None or item.revoked or not item.check_client(self.request.client):
                return None
            item.revoked = True
            return item

    def authenticate_user(self, token: RefreshToken) -> str:
        return token.user_id

    def revoke_old_credential(self, token: RefreshToken) -> None:
        pass  # already revoked by authenticate_refresh_token


class _Server(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, app: Flask, provider: OAuthProvider) -> None:
        self.provider = provider
        super().__init__(app)
        self.register_grant(_CodeGrant, [_StrictPKCE(required=True)])
        self.register_grant(_RefreshGrant)

    def query_client(self, client_id: str) -> Client | None:
        with self.provider._lock:
            return self.provider._clients.get(client_id)

    def save_token(self, token: dict[str, Any], req: Any) -> None:
        rt = token["refresh_token"]  # always issued: every client may use the refresh_token grant
        with self.provider._lock:
            item = RefreshToken(rt, req.client.client_id, req.user, token.get("scope", ""))
            self.provider._refresh_tokens[rt] = item
            self.provider._issued_tokens.append(dict(token))
            self.provider._secrets += [token["access_token"], rt]


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class OAuthProvider:
    """An OAuth 2.0 authorization server on ``127.0.0.1:<ephemeral port>``; a context manager."""

    def __init__(
        self,
        *,
        access_token_lifetime: int = 60,
        scopes_supported: tuple[str, ...] = ("read", "write", "offline_access"),
        token_delay: float = 0.0,
    ) -> None:
        self.access_token_lifetime = access_token_lifetime
        #: Seconds the token endpoint sleeps before handling a refresh_token grant (to overlap refreshes).
        self.token_delay = token_delay
        #: Seconds it sleeps before handling an authorization_code grant (to overlap exchanges).
        self.code_delay = 0.0
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}
        self._codes: dict[str, AuthorizationCode] = {}
        self._refresh_tokens: dict[str, RefreshToken] = {}
        self._token_requests: collections.Counter[str] = collections.Counter()
        self._issued_tokens: list[dict[str, Any]] = []
        self._secrets: list[str] = []
        self._http: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

        app = Flask(__name__)
        lifetimes = dict.fromkeys(GRANT_TYPES, access_token_lifetime)
        app.config.update(
            OAUTH2_REFRESH_TOKEN_GENERATOR=True,
            OAUTH2_TOKEN_EXPIRES_IN=lifetimes,
            OAUTH2_SCOPES_SUPPORTED=list(scopes_supported),
        )
        server = _Server(app, self)
        user = TEST_USER_ID  # the logged-in user, who consents to everything

        @app.get("/authorize")
        def authorize() -> Response:
            try:
                grant = server.get_consent_grant(end_user=user)
            except OAuth2Error as error:
                response: Response = server.handle_error_response(None, error)
                return response
            response = server.create_authorization_response(grant_user=user, grant=grant)
            return response

        @app.post("/token")
        def token() -> Response:
            grant_type = request.form.get("grant_type", "")
            with self._lock:
                self._token_requests[grant_type] += 1
            if grant_type == "refresh_token" and self.token_delay > 0:
                time.sleep(self.token_delay)
            if grant_type == "authorization_code" and self.code_delay > 0:
                time.sleep(self.code_delay)
            response: Response = server.create_token_response()
            return response

        self._app = app

    def start(self) -> Self:
        self._http = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._http.serve_forever, name="oauth-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None and self._thread is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join()
        self._http = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._http is None:
            raise RuntimeError("OAuthProvider is not started")
        return f"http://127.0.0.1:{self._http.server_port}"

    @property
    def authorization_endpoint(self) -> str:
        return self.base_url + "/authorize"

    @property
    def token_endpoint(self) -> str:
        return self.base_url + "/token"

    def register_client(
        self, client_id: str, client_secret: str, redirect_uris: list[str], scope: str = "read write"
    ) -> None:
        with self._lock:
            self._clients[client_id] = Client(client_id, client_secret, list(redirect_uris), scope)
            self._secrets.append(client_secret)

    def authorize(self, authorization_url: str) -> tuple[str, str]:
        """Be the test user's agent: GET the URL, consent, and return ``(code, state)`` from the redirect."""
        response = httpx.get(authorization_url, follow_redirects=False)
        if response.status_code != 302:
            body = response.json() if "json" in response.headers.get("content-type", "") else {}
            raise AuthorizationDenied(body.get("error", f"http_{response.status_code}"))
        query = parse_qs(urlsplit(response.headers["location"]).query)
        if "error" in query:
            raise AuthorizationDenied(query["error"][0])
        return query["code"][0], query.get("state", [""])[0]

    def revoke_refresh_tokens(self, client_id: str | None = None) -> None:
        """Revoke every refresh token (of one client, if given): the next refresh gets invalid_grant."""
        with self._lock:
            for tok in self._refresh_tokens.values():
                tok.revoked = tok.revoked or client_id in (None, tok.client_id)

    @property
    def token_requests(self) -> collections.Counter[str]:
        """Snapshot: every POST to the token endpoint, successful or not, by grant_type."""
        with self._lock:
            return collections.Counter(self._token_requests)

    @property
    def issued_tokens(self) -> list[dict[str, Any]]:
        """Snapshot: every token response body issued, in order."""
        with self._lock:
            return [dict(t) for t in self._issued_tokens]

    def issued_secrets(self) -> list[str]:
        """Every access token, refresh token, authorization code and client secret ever issued."""
        with self._lock:
            return list(self._secrets)
