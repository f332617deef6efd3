"""The HS256 development signing key, created in the data dir on first run (mode 0600, and
refused wherever it is read if group or others may read it), and a token minter for it
(`roomsecrets token`, manifests' `token:` entries). Production deployments verify with public
keys instead; the server then leaves this key off unless told otherwise (Settings.dev_key_on).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import jwt

from ..errors import FailedPrecondition
from ..files import create_private, read_private

DEV_KEY_FILE = "signing-key.json"

log = logging.getLogger("roomsecrets")


def ensure_dev_key(data_dir: Path) -> tuple[str, bytes]:
    """(kid, secret) of the dev key, creating it if absent."""
    path = data_dir / DEV_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "kid": f"dev-{secrets.token_hex(4)}",
            "secret": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
        create_private(path, json.dumps(doc))  # a process that lost the race reads the winner's
    # It mints any token: refused, like the keyring, if anyone else may read it.
    doc = json.loads(read_private(path, "the development signing key"))
    return str(doc["kid"]), base64.b64decode(doc["secret"])


def mint_token(
    data_dir: Path,
    *,
    identity: str,
    room: str,
    project: str = "dev-project",
    role: str = "user",
    secrets_grant: bool = True,
    admin: bool = False,
    ttl: int = 3600,
    request_oauth_token: list[dict[str, Any]] | None = None,
    project_role: str = "",
    service: str = "",
    issuer: str = "",
    audience: str = "",
) -> str:
    kid, key = ensure_dev_key(data_dir)
    api: dict[str, Any] = {}
    if secrets_grant:
        api["secrets"] = {} if request_oauth_token is None else {"request_oauth_token": request_oauth_token}
    if admin:
        api["admin"] = {"config": True}
    now = int(time.time())
    claims = {
        "name": identity,
        "sub": project,
        "kid": kid,
        "iat": now,
        "exp": now + ttl,
        "version": "1.0",
        "grants": [
            {"name": "room", "scope": room},
            {"name": "role", "scope": role},
            {"name": "api", "scope": api},
        ],
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    if project_role:
        project_scope = {"role": project_role, **({"service": service} if service else {})}
        claims["grants"].append({"name": "project", "scope": project_scope})  # type: ignore[attr-defined]
    return jwt.encode(claims, key, algorithm="HS256", headers={"kid": kid})


SERVICE_TOKEN_TTL = 24 * 3600


def mint_service_token(
    data_dir: Path,
    identity: str,
    room: str,
    project: str,
    role: str,
    api: tuple[str, ...],
    *,
    request_oauth_token: list[dict[str, Any]] | None = None,
    issuer: str = "",
    audience: str = "",
) -> str:
    """A participant token for a service's environment (manifest `token:` entries), signed with
    the development key. `api` lists the API grants ("secrets", "admin"); `request_oauth_token`
    restricts its OAuth requests (the minting authority's own restriction, auth/authority.py).
    A key file others may read (loosened while the server runs) mints nothing: FailedPrecondition."""
    try:
        return mint_token(
            data_dir,
            identity=identity,
            room=room,
            project=project,
            role=role,
            secrets_grant="secrets" in api,
            admin="admin" in api,
            request_oauth_token=request_oauth_token,
            ttl=SERVICE_TOKEN_TTL,
            issuer=issuer,
            audience=audience,
        )
    except PermissionError as error:  # its message names a server path: for the log, not the caller
        log.error("not minting a manifest token: %s", error)
        raise FailedPrecondition(
            "the server's development signing key is readable by others: it mints no tokens until "
            "an operator makes it private (mode 0600)",
            reason="SIGNING_KEY_EXPOSED",
        ) from None
