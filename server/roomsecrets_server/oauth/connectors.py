"""OAuth connectors: named client registrations a room admin keeps on the server, so participants
ask for tokens by name and never see the client secret.

A connector is stored like a secret (sealed, rewrapped with the rest) in its room, under the
owner "" — an identity no token can carry (a token's `name` is never empty) — so no participant
can read it through the Secrets API. Its id is `connector:<name>`.

The client secret is sealed on its own inside that row, bound as associated data to (room,
connector name, client_id, authorization_endpoint, token_endpoint): a config whose endpoints or
client differ from the ones the secret was given for cannot open it, so a secret can only ever
be sent where the admin who supplied it meant it to go. Changing any of those without supplying
the secret again is refused. Its key is a random data key kept next to it in the row, so the
row's own envelope (which `rewrap` moves to new key-encryption keys) protects it: a blob sealed
under a key-encryption key of its own would be invisible to rewrap and lost when `--retire`
drops that key. Rows of the earlier format (the secret in plain inside the sealed JSON) are read
as before; the next set writes the new format.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import validate
from ..audit import AuditLog
from ..auth.principal import Principal
from ..crypto.envelope import place
from ..errors import EtagMismatch, IntegrityError, InvalidArgument, NotFound
from ..secrets.service import SecretsService
from ..store import ABSENT, ANY, SecretKey, SecretRecord, Store, WriteCondition
from .provider import AuthorizationServer, ClientConfig

CONNECTOR_OWNER = ""
CONNECTOR_TYPE = "application/vnd.roomsecrets.oauth-connector+json"
_ID_PREFIX = "connector:"
MAX_CONNECTORS = 1000
_SEALED_SECRET = "sealed_client_secret"  # noqa: S105 - the row's JSON field of the new format
_NONCE = 12


@dataclass(frozen=True, slots=True)
class Connector:
    name: str
    config: ClientConfig
    update_time: float


class ConnectorService:
    def __init__(
        self, store: Store, secrets: SecretsService, audit: AuditLog, *, server: AuthorizationServer
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._audit = audit
        self._server = server

    async def set(self, p: Principal, name: str, config: ClientConfig) -> Connector:
        p.require_secrets()
        p.require_room_admin("managing OAuth connectors")
        name = validate.secret_id(name, "name")
        key = _key(p.room, name)
        for _ in range(4):
            existing = await self._store.get_secret(key)
            checked = config
            if not config.client_secret and existing is not None:
                # Replacing without a secret keeps the stored one (admins rarely have it at hand),
                # but only for the same client at the same endpoints: never send it elsewhere.
                stored = self._config(p.room, name, existing)
                if stored.client_secret:
                    _require_same_destination(stored, config)
                    checked = replace(config, client_secret=stored.client_secret)
            checked = self._server.checked(checked, "client")
            record = self._secrets.seal(key, CONNECTOR_TYPE, "", _row(p.room, name, checked))
            condition = WriteCondition(etag=existing.etag) if existing else ABSENT
            try:
                await self._store.put_secret(record, condition)
            except EtagMismatch:
                continue
            await self._audit.record("set_connector", room=p.room, actor=p.identity, target=name)
            return Connector(name, checked, record.update_time)
        raise EtagMismatch(f"connector {name!r} is being changed concurrently; try again")

    async def get(self, p: Principal, name: str) -> Connector:
        p.require_secrets()
        name = validate.secret_id(name, "name")
        connector = await self.resolve(p.room, name)
        await self._audit.record("get_connector", room=p.room, actor=p.identity, target=name)
        return connector

    async def resolve(self, room: str, name: str) -> Connector:
        record = await self._store.get_secret(_key(room, name))
        if record is None:
            raise NotFound(f"OAuth connector {name!r} not found in this room")
        return Connector(name, self._config(room, name, record), record.update_time)

    async def list(self, p: Principal) -> list[Connector]:
        p.require_secrets()
        records = await self._store.list_owned(p.room, CONNECTOR_OWNER, CONNECTOR_TYPE, MAX_CONNECTORS)
        await self._audit.record(
            "list_connectors", room=p.room, actor=p.identity, target=f"{len(records)} listed"
        )
        connectors = []
        for record in records:
            name = record.key.secret_id.removeprefix(_ID_PREFIX)
            connectors.append(Connector(name, self._config(p.room, name, record), record.update_time))
        return connectors

    async def delete(self, p: Principal, name: str) -> None:
        p.require_secrets()
        p.require_room_admin("managing OAuth connectors")
        name = validate.secret_id(name, "name")
        if not await self._store.delete_secret(_key(p.room, name), ANY):
            raise NotFound(f"OAuth connector {name!r} not found in this room")
        await self._audit.record("delete_connector", room=p.room, actor=p.identity, target=name)

    def _config(self, room: str, name: str, record: SecretRecord) -> ClientConfig:
        doc = json.loads(self._secrets.open(record))
        config = ClientConfig.from_json(doc)
        sealed = doc.get(_SEALED_SECRET)
        if sealed is None:
            return config  # the earlier format: the secret in plain inside the sealed row
        return replace(config, client_secret=_open_secret(room, name, config, sealed))


def _require_same_destination(stored: ClientConfig, given: ClientConfig) -> None:
    changed = [
        field
        for field in ("authorization_endpoint", "token_endpoint", "client_id")
        if getattr(stored, field) != getattr(given, field)
    ]
    if changed:
        raise InvalidArgument(
            "client.client_secret",
            f"is required when changing {', '.join(changed)}: the stored client secret is only "
            "ever sent to the endpoints it was given for (or delete the connector first)",
        )


def _row(room: str, name: str, config: ClientConfig) -> bytes:
    """The row's JSON: the config without its secret, and the secret sealed on its own."""
    doc: dict[str, Any] = {**config.to_json(), "client_secret": ""}
    if config.client_secret:
        doc[_SEALED_SECRET] = _seal_secret(room, name, config)
    return json.dumps(doc).encode()


def _binding(room: str, name: str, config: ClientConfig) -> bytes:
    return place(
        "oauth-connector-secret",
        room,
        name,
        config.client_id,
        config.authorization_endpoint,
        config.token_endpoint,
    )


def _seal_secret(room: str, name: str, config: ClientConfig) -> dict[str, str]:
    key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(_NONCE)
    sealed = nonce + AESGCM(key).encrypt(nonce, config.client_secret.encode(), _binding(room, name, config))
    return {"key": base64.b64encode(key).decode(), "sealed": base64.b64encode(sealed).decode()}


def _open_secret(room: str, name: str, config: ClientConfig, sealed: Any) -> str:
    try:
        key, blob = base64.b64decode(sealed["key"]), base64.b64decode(sealed["sealed"])
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], _binding(room, name, config)).decode()
    except (InvalidTag, KeyError, TypeError, ValueError, binascii.Error):
        raise IntegrityError(
            f"the client secret of OAuth connector {name!r} does not open for its client and endpoints"
        ) from None


def _key(room: str, name: str) -> SecretKey:
    return SecretKey(room, CONNECTOR_OWNER, "", _ID_PREFIX + name)
