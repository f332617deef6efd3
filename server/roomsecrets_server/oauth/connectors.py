"""OAuth connectors: named client registrations a room admin keeps on the server, so participants
ask for tokens by name and never see the client secret.

A connector is stored like a secret (sealed, rewrapped with the rest) in its room, under the
owner "" — an identity no token can carry (a token's `name` is never empty) — so no participant
can read it through the Secrets API. Its id is `connector:<name>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from .. import validate
from ..audit import AuditLog
from ..auth.principal import Principal
from ..errors import EtagMismatch, NotFound
from ..secrets.service import SecretsService
from ..store import ABSENT, ANY, SecretKey, SecretRecord, Store, WriteCondition
from .provider import ClientConfig

CONNECTOR_OWNER = ""
CONNECTOR_TYPE = "application/vnd.roomsecrets.oauth-connector+json"
_ID_PREFIX = "connector:"
MAX_CONNECTORS = 1000


@dataclass(frozen=True, slots=True)
class Connector:
    name: str
    config: ClientConfig
    update_time: float


class ConnectorService:
    def __init__(self, store: Store, secrets: SecretsService, audit: AuditLog) -> None:
        self._store = store
        self._secrets = secrets
        self._audit = audit

    async def set(self, p: Principal, name: str, config: ClientConfig) -> Connector:
        p.require_secrets()
        p.require_room_admin("managing OAuth connectors")
        name = validate.secret_id(name, "name")
        key = _key(p.room, name)
        for _ in range(4):
            existing = await self._store.get_secret(key)
            if not config.client_secret and existing is not None:
                # Replacing without a secret keeps the stored one (admins rarely have it at hand).
                config = replace(config, client_secret=self._config(existing).client_secret)
            checked = config.validated("client")
            record = self._secrets.seal(key, CONNECTOR_TYPE, "", json.dumps(checked.to_json()).encode())
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
        return Connector(name, self._config(record), record.update_time)

    async def list(self, p: Principal) -> list[Connector]:
        p.require_secrets()
        records = await self._store.list_owned(p.room, CONNECTOR_OWNER, CONNECTOR_TYPE, MAX_CONNECTORS)
        await self._audit.record(
            "list_connectors", room=p.room, actor=p.identity, target=f"{len(records)} listed"
        )
        return [
            Connector(r.key.secret_id.removeprefix(_ID_PREFIX), self._config(r), r.update_time)
            for r in records
        ]

    async def delete(self, p: Principal, name: str) -> None:
        p.require_secrets()
        p.require_room_admin("managing OAuth connectors")
        name = validate.secret_id(name, "name")
        if not await self._store.delete_secret(_key(p.room, name), ANY):
            raise NotFound(f"OAuth connector {name!r} not found in this room")
        await self._audit.record("delete_connector", room=p.room, actor=p.identity, target=name)

    def _config(self, record: SecretRecord) -> ClientConfig:
        return ClientConfig.from_json(json.loads(self._secrets.open(record)))


def _key(room: str, name: str) -> SecretKey:
    return SecretKey(room, CONNECTOR_OWNER, "", _ID_PREFIX + name)
