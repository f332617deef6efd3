"""Who is calling, as read from a verified participant token (claims shaped like the reference's).

Token claims: `name` (identity), `sub` (project id), `kid`, `exp`, and `grants`, a list of
`{name, scope}`: `room` (room name), `role` (user | agent | tool), `api` ({"secrets": {...},
"admin": {...}}). `api.secrets.request_oauth_token` optionally lists `{endpoint, client_id}`
entries, each with an optional `token_endpoint` (exact, or a prefix ending in `*`); without it the
token endpoint must be on the authorization endpoint's origin (scheme://host:port).
An optional `project` grant carries the caller's role in the project (`sub`):
`{"role": "admin" | "developer" | "service", "service": "<name>"}` (service: the one service
whose identity the token is).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from ..errors import PermissionDenied, Unauthenticated

ROLES = ("user", "agent", "tool")
PROJECT_ROLES = ("admin", "developer", "service")


@dataclass(frozen=True, slots=True)
class OAuthEndpoint:
    """One OAuth client a token may ask tokens for: the authorization endpoint and, where the
    server sends the code and the client secret, the token endpoint ("" = the authorization
    endpoint's origin)."""

    endpoint: str
    client_id: str
    token_endpoint: str = ""

    def allows(self, endpoint: str, token_endpoint: str, client_id: str) -> bool:
        if client_id != self.client_id or not _matches(self.endpoint, endpoint):
            return False
        if self.token_endpoint:
            return _matches(self.token_endpoint, token_endpoint)
        origin = _origin(token_endpoint)
        return origin is not None and origin == _origin(endpoint)


def _matches(pattern: str, url: str) -> bool:
    if pattern.endswith("*"):
        return url.startswith(pattern[:-1])
    return url == pattern


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL, the default port filled in; None if it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


@dataclass(frozen=True, slots=True)
class SecretsGrant:
    # None = any OAuth request allowed; () = none allowed.
    request_oauth_token: tuple[OAuthEndpoint, ...] | None = None

    def can_request_oauth_token(self, endpoint: str, token_endpoint: str, client_id: str) -> bool:
        if self.request_oauth_token is None:
            return True
        return any(e.allows(endpoint, token_endpoint, client_id) for e in self.request_oauth_token)


def room_scope(project: str, room: str) -> str:
    """Where a room's data lives. Rooms belong to projects, so rooms of the same name in two
    projects are two rooms. The project id is percent-encoded, so the first '/' always ends it."""
    return f"{quote(project, safe='')}/{room}"


@dataclass(frozen=True, slots=True)
class Principal:
    identity: str
    project: str
    room: str  # room_scope(project, room_name): the key of every room-scoped row and channel
    role: str
    secrets: SecretsGrant | None
    admin: bool
    expires_at: float
    project_role: str = ""  # "" (none) | admin | developer | service
    service: str = ""  # with project_role "service": the service this token is
    room_name: str = ""  # the room grant as the token names it (for messages and minted tokens)

    def require_project_role(self, *roles: str, what: str) -> None:
        if self.project_role not in roles:
            have = f"project role {self.project_role!r}" if self.project_role else "no project role"
            raise PermissionDenied(
                f"{what} needs the project role {' or '.join(roles)} (the token has {have})"
            )

    def require_secrets(self) -> SecretsGrant:
        if self.secrets is None:
            raise PermissionDenied("token has no 'secrets' API grant")
        return self.secrets

    def require_room_admin(self, what: str) -> None:
        if not self.admin:
            raise PermissionDenied(f"{what} needs the room 'admin' API grant")


def _scope(grants: list[Any], name: str) -> Any:
    for grant in grants:
        if isinstance(grant, Mapping) and grant.get("name") == name:
            return grant.get("scope")
    return None


MAX_CLAIM = 256  # characters of a name, room, project or service claim
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _claim_text(value: Any, what: str, *, required: bool = True) -> str:
    """A name-like claim: JSON may spell anything (NUL, lone UTF-16 surrogates, megabytes), and
    these become store keys, channel names and log fields, so they are refused at the door."""
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise Unauthenticated(f"token has no {what}" if required else f"token {what} must be a string")
    if len(value) > MAX_CLAIM:
        raise Unauthenticated(f"token {what} is longer than {MAX_CLAIM} characters")
    if _CONTROL.search(value) or value != value.strip():
        raise Unauthenticated(f"token {what} contains control characters or surrounding spaces")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate from a JSON \u escape
        raise Unauthenticated(f"token {what} is not valid Unicode text") from None
    return value


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    identity = _claim_text(claims.get("name"), "'name' claim (the participant identity)")
    grants = claims.get("grants", [])
    if not isinstance(grants, list):
        raise Unauthenticated("token 'grants' claim must be a list")
    room = _claim_text(_scope(grants, "room"), "'room' grant")
    role = _scope(grants, "role") or "user"
    if role not in ROLES:
        raise Unauthenticated(f"token 'role' grant must be one of {', '.join(ROLES)}")
    api = _scope(grants, "api") or {}
    if not isinstance(api, Mapping):
        raise Unauthenticated("token 'api' grant must be an object")
    project_role, service = _project_grant(_scope(grants, "project"))
    project = _claim_text(claims.get("sub"), "'sub' claim (the project)")
    return Principal(
        identity=identity,
        project=project,
        room=room_scope(project, room),
        room_name=room,
        role=str(role),
        secrets=_secrets_grant(api.get("secrets")),
        admin=_admin_grant(api.get("admin")),
        expires_at=float(claims["exp"]),
        project_role=project_role,
        service=service,
    )


def _project_grant(raw: Any) -> tuple[str, str]:
    if raw is None:
        return "", ""
    if not isinstance(raw, Mapping) or raw.get("role") not in PROJECT_ROLES:
        raise Unauthenticated(f"token 'project' grant must have a role: one of {', '.join(PROJECT_ROLES)}")
    if raw["role"] != "service":
        return str(raw["role"]), ""
    return "service", _claim_text(raw.get("service"), "'project' grant's service (role 'service' names one)")


def _admin_grant(raw: Any) -> bool:
    """The reference's AdminGrant{config: bool = True}: an object, absent or null for none. A
    token saying `false`, `0`, `""` or `{"config": false}` grants nothing, and anything that is
    not such an object is refused rather than guessed at."""
    if raw is None:
        return False
    if not isinstance(raw, Mapping) or not isinstance(raw.get("config", True), bool):
        raise Unauthenticated("token 'api.admin' grant must be an object ({} or {\"config\": true|false})")
    return bool(raw.get("config", True))


def _secrets_grant(raw: Any) -> SecretsGrant | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise Unauthenticated("token 'api.secrets' grant must be an object")
    entries = raw.get("request_oauth_token")
    if entries is None:
        return SecretsGrant()
    if not isinstance(entries, list):
        raise Unauthenticated("token 'api.secrets.request_oauth_token' must be a list")
    parsed = []
    for entry in entries:
        if not isinstance(entry, Mapping) or not entry.get("endpoint") or not entry.get("client_id"):
            raise Unauthenticated("each 'request_oauth_token' entry needs 'endpoint' and 'client_id'")
        token_endpoint = entry.get("token_endpoint", "")
        if not isinstance(token_endpoint, str) or ("token_endpoint" in entry and not token_endpoint):
            raise Unauthenticated("a 'request_oauth_token' entry's 'token_endpoint' must be non-empty text")
        parsed.append(OAuthEndpoint(str(entry["endpoint"]), str(entry["client_id"]), token_endpoint))
    return SecretsGrant(tuple(parsed))
