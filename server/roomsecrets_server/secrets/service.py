"""Room secrets: set / get / exists / list / delete, delegation, check-and-set.

Who may do what (SPEC §4, decided in auth/authority.py): a participant reads and writes its own
secrets; a secret delegated to another identity is readable by its owner and that delegate only;
acting for another identity (`for_identity`) needs the room admin grant. Values are sealed here,
before the store sees them, bound to (room, owner, delegated_to, id, type, etag) — and, for rows of
another kind than STORED (answers to requests, template variables), to their kind and name too —
so a row moved elsewhere, or made to look like another kind, fails to open.

Kinds (store/base.py SecretKind) never mix: SetSecret never replaces an answer or a template
variable, an answer never replaces a stored secret, and DeleteRequestedSecret deletes answers only.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets as pysecrets
import time
import uuid
from typing import NamedTuple

from .. import validate
from ..audit import AuditLog
from ..auth import authority
from ..auth.principal import Principal
from ..crypto.checksum import crc32c
from ..crypto.envelope import Envelope, place
from ..crypto.keyring import KeyringFile
from ..errors import EtagMismatch, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, audited
from ..quotas import QuotaExceeded
from ..store import ABSENT, ANY, SecretKey, SecretKind, SecretRecord, Store, WriteCondition

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Three ids of at most 256 characters, JSON-quoted and base64-encoded, fit well within this.
MAX_PAGE_TOKEN = 8192
_AAD_CACHE_SIZE = 4096
# Rows of these types are written by the server (OAuth token sets); SetSecret may not forge them
# and GetSecret does not return them (a token set holds a refresh token).
RESERVED_TYPE_PREFIX = validate.RESERVED_TYPE_PREFIX
_WRITE_ATTEMPTS = 4  # retries when a concurrent writer changed the row between read and write


class SecretValue(NamedTuple):
    record: SecretRecord
    data: bytes


def new_etag() -> str:
    return pysecrets.token_hex(8)


class SecretsService:
    def __init__(self, store: Store, keyring: KeyringFile, audit: AuditLog, *, max_value_bytes: int) -> None:
        self._store = store
        self._keyring = keyring
        self._audit = audit
        self.max_value_bytes = max_value_bytes
        self._aads: dict[tuple[SecretKey, str, str, str, str], bytes] = {}

    # -- sealing (also used by the request flows) ---------------------------------------------
    def seal(
        self, key: SecretKey, type_: str, name: str, data: bytes, kind: str = SecretKind.STORED
    ) -> SecretRecord:
        etag = new_etag()
        envelope = self._keyring.envelope()
        return SecretRecord(
            key=key,
            type=type_,
            name=name,
            etag=etag,
            crc32c=crc32c(data),
            size=len(data),
            sealed=envelope.seal(data, _aad(key, type_, etag, kind, name)),
            update_time=time.time(),
            kek_id=envelope.active_kek_id,
            kind=kind,
        )

    def open(self, record: SecretRecord) -> bytes:
        envelope = self._keyring.envelope()
        if record.kek_id not in envelope:
            # Rotated by another process (rewrap) since our last look at the keyring file.
            envelope = self._keyring.reload()
        # The associated data is derived from the row's own (key, type, etag[, kind, name]), never
        # looked up by the ciphertext, so a blob moved to another row still meets that row's
        # binding and fails.
        where = (record.key, record.type, record.etag, record.kind, record.name if record.kind else "")
        aad = self._aads.get(where)
        if aad is None:
            if len(self._aads) >= _AAD_CACHE_SIZE:
                self._aads.clear()
            aad = self._aads[where] = _aad(*where)
        return envelope.open(record.sealed, aad)

    def seal_blob(self, data: bytes, *where: str) -> bytes:
        """Seal flow state that is not a secret row (e.g. a pending OAuth request's PKCE verifier),
        bound to `where` as associated data."""
        return self._keyring.envelope().seal(data, place(*where))

    def open_blob(self, sealed: bytes, *where: str) -> bytes:
        envelope = self._keyring.envelope()
        if Envelope.kek_id_of(sealed) not in envelope:
            envelope = self._keyring.reload()
        return envelope.open(sealed, place(*where))

    def check_data(self, data: bytes, checksum: int | None, *, field: str = "data") -> None:
        validate.data(data, self.max_value_bytes, field)
        if checksum is not None and checksum != crc32c(data):
            raise InvalidArgument(f"{field}_crc32c", f"does not match the CRC32C of {field}")

    # -- the Secrets API ----------------------------------------------------------------------
    async def set_secret(
        self,
        p: Principal,
        *,
        secret_id: str,
        type_: str,
        name: str,
        data: bytes,
        delegated_to: str,
        for_identity: str,
        etag: str,
        data_crc32c: int | None,
    ) -> SecretRecord:
        p.require_secrets()
        owner = self._owner(p, for_identity)
        delegated_to = validate.identity(delegated_to, "delegated_to")
        if secret_id:
            validate.secret_id(secret_id)
        elif not name:
            raise InvalidArgument("secret_id", "give secret_id, or name (with type) to address the secret")
        type_ = validate.user_type(type_)
        name = validate.text(name, "name", validate.MAX_NAME)
        etag = validate.etag(etag)
        self.check_data(data, data_crc32c)

        for _ in range(_WRITE_ATTEMPTS):
            if secret_id:
                key = SecretKey(p.room, owner, delegated_to, secret_id)
                existing = await self._store.get_secret(key)
                if existing is not None:
                    _check_replaceable(existing)
            else:
                existing = await self._find_one(p.room, owner, delegated_to, SecretKind.STORED, type_, name)
                key = existing.key if existing else SecretKey(p.room, owner, delegated_to, uuid.uuid4().hex)
            if etag and (existing is None or existing.etag != etag):
                await self._audit.record(
                    "set_secret",
                    room=p.room,
                    actor=p.identity,
                    outcome="etag_mismatch",
                    secret_id=key.secret_id,
                    owner=owner,
                    delegated_to=delegated_to,
                )
                what = "does not exist" if existing is None else "has changed"
                raise audited(EtagMismatch(f"etag does not match: secret {key.secret_id!r} {what}"))
            record = self.seal(
                key,
                type_ or (existing.type if existing else validate.DEFAULT_TYPE),
                name or (existing.name if existing else ""),
                data,
            )
            condition = WriteCondition(etag=existing.etag) if existing else ABSENT
            try:
                await self._store.put_secret(record, condition)
            except EtagMismatch:
                if etag:
                    raise
                continue  # a concurrent write won; re-read and apply ours on top (last writer wins)
            except QuotaExceeded as refused:  # the store held it to a quota (quotas.py): nothing written
                await self._audit.record(
                    "set_secret",
                    room=p.room,
                    actor=p.identity,
                    outcome="quota_exceeded",
                    secret_id=key.secret_id,
                    owner=owner,
                    delegated_to=delegated_to,
                )
                raise audited(refused) from None
            await self._audit.record(
                "set_secret",
                room=p.room,
                actor=p.identity,
                secret_id=key.secret_id,
                owner=owner,
                delegated_to=delegated_to,
                authority=f"{'owner' if owner == p.identity else 'room admin'}:{p.identity}",
            )
            return record
        raise EtagMismatch("secret is being changed concurrently; try again")

    async def get_secret(
        self, p: Principal, *, secret_id: str, type_: str, name: str, delegated_to: str, delegated_by: str
    ) -> SecretValue:
        p.require_secrets()
        owner, delegated_to = authority.readable_scope(p, delegated_to, delegated_by)
        if secret_id:
            validate.secret_id(secret_id)
            record = await self._store.get_secret(SecretKey(p.room, owner, delegated_to, secret_id))
        elif name:
            validate.text(type_, "type", validate.MAX_TYPE)
            validate.text(name, "name", validate.MAX_NAME)
            # A stored secret of that name, else an answer to a request of that (url, type).
            record = await self._find_one(
                p.room, owner, delegated_to, SecretKind.STORED, type_, name
            ) or await self._find_one(p.room, owner, delegated_to, SecretKind.ANSWER, type_, name)
        else:
            raise InvalidArgument("secret_id", "give secret_id, or name (with type) to address the secret")
        if record is None:
            raise NotFound(f"secret {secret_id or name!r} not found")
        return await self.release(p, record, "get_secret")

    async def release(
        self,
        reader: Principal,
        record: SecretRecord,
        action: str,
        *,
        outcome: str = "ok",
        actor: str = "",
        on_behalf: str = "",
    ) -> SecretValue:
        """Open a room secret for `reader`, on its own authority (owner or delegate: anyone else is
        refused), and audit the release naming owner, id and that authority. `actor` (default:
        the reader) is who receives the value when it is not the reader itself — a service
        resolving a manifest on its author's authority, named in `on_behalf`."""
        key = record.key
        try:
            if key.room != reader.room:
                raise PermissionDenied(f"secret {key.secret_id!r} is in another room")
            how = authority.reads_as(
                reader,
                key.owner,
                key.delegated_to,
                template_variable=record.kind == SecretKind.TEMPLATE_VARIABLE,
            )
            if record.type.startswith(RESERVED_TYPE_PREFIX):
                raise FailedPrecondition(
                    f"secret {key.secret_id!r} is kept by the server ({record.type}); "
                    "read OAuth tokens with GetOfflineOAuthToken"
                )
        except (PermissionDenied, FailedPrecondition) as refused:
            await self._audit_release(reader, record, action, actor, "denied", on_behalf)
            raise audited(refused) from None
        data = self.open(record)
        await self._audit_release(reader, record, action, actor, outcome, on_behalf, how)
        return SecretValue(record, data)

    async def _audit_release(
        self,
        reader: Principal,
        record: SecretRecord,
        action: str,
        actor: str,
        outcome: str,
        on_behalf: str,
        how: str = "",
    ) -> None:
        key = record.key
        by = f"{how}:{reader.identity}" if how else reader.identity
        await self._audit.record(
            action,
            room=key.room,
            actor=actor or reader.identity,
            outcome=outcome,
            secret_id=key.secret_id,
            owner=key.owner,
            delegated_to=key.delegated_to,
            authority=f"{by} ({on_behalf})" if on_behalf else by,
        )

    async def exists(self, p: Principal, *, secret_id: str, delegated_to: str, for_identity: str) -> bool:
        p.require_secrets()
        owner = self._owner(p, for_identity)
        key = SecretKey(
            p.room, owner, validate.identity(delegated_to, "delegated_to"), validate.secret_id(secret_id)
        )
        found = await self._store.get_secret(key) is not None
        await self._audit.record(
            "exists",
            room=p.room,
            actor=p.identity,
            outcome="ok" if found else "not_found",
            secret_id=secret_id,
            owner=owner,
            delegated_to=key.delegated_to,
            authority=f"{'owner' if owner == p.identity else 'room admin'}:{p.identity}",
        )
        return found

    async def delete_secret(self, p: Principal, *, secret_id: str, delegated_to: str, etag: str) -> None:
        p.require_secrets()
        key = SecretKey(
            p.room, p.identity, validate.identity(delegated_to, "delegated_to"), validate.secret_id(secret_id)
        )
        condition = WriteCondition(etag=etag) if validate.etag(etag) else ANY
        if not await self._store.delete_secret(key, condition):
            raise NotFound(f"secret {secret_id!r} not found")
        await self._audit.record(
            "delete_secret",
            room=p.room,
            actor=p.identity,
            secret_id=secret_id,
            owner=p.identity,
            delegated_to=key.delegated_to,
            authority=f"owner:{p.identity}",
        )

    async def delete_requested_secret(self, p: Principal, *, url: str, type_: str, delegated_to: str) -> None:
        """Delete answers to requests (never secrets stored with SetSecret) of this (url, type):
        those the caller owns with delegation `delegated_to`, and, when `delegated_to` is the
        caller, those delegated to it (forcing a new prompt)."""
        p.require_secrets()
        url = validate.text(url, "url", validate.MAX_URL, required=True)
        type_ = validate.secret_type(type_)
        delegated_to = validate.identity(delegated_to, "delegated_to")
        deleted = await self._store.delete_answers(p.room, p.identity, delegated_to, type_, url)
        if not deleted:
            await self._audit.record(
                "delete_requested_secret",
                room=p.room,
                actor=p.identity,
                outcome="not_found",
                delegated_to=delegated_to,
                target=url,
            )
            raise audited(NotFound(f"no requested secret for url {url!r} and type {type_!r}"))
        for key in deleted:
            how = "owner" if key.owner == p.identity else "delegate"
            await self._audit.record(
                "delete_requested_secret",
                room=p.room,
                actor=p.identity,
                secret_id=key.secret_id,
                owner=key.owner,
                delegated_to=key.delegated_to,
                target=url,
                authority=f"{how}:{p.identity}",
            )

    async def list_secrets(
        self, p: Principal, *, page_size: int, page_token: str
    ) -> tuple[list[SecretRecord], str]:
        p.require_secrets()
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token) if page_token else None
        rows = await self._store.list_secrets(p.room, p.identity, after, limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1].key
            next_token = _encode_page_token((last.owner, last.delegated_to, last.secret_id))
        # A template variable under the caller's identity is the service's, not the caller's.
        rows = [
            r for r in rows if r.kind != SecretKind.TEMPLATE_VARIABLE or authority.is_service(p, r.key.owner)
        ]
        await self._audit.record("list_secrets", room=p.room, actor=p.identity, target=f"{len(rows)} listed")
        return rows, next_token

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _owner(p: Principal, for_identity: str) -> str:
        for_identity = validate.identity(for_identity, "for_identity")
        authority.acts_for(p, for_identity, "for_identity")
        return for_identity or p.identity

    async def _find_one(
        self, room: str, owner: str, delegated_to: str, kind: str, type_: str, name: str
    ) -> SecretRecord | None:
        found = await self._store.find_secrets(room, owner, delegated_to, kind, type_, name)
        if len(found) > 1:
            raise InvalidArgument("type", f"several secrets are named {name!r}; give their type")
        return found[0] if found else None


def _check_replaceable(existing: SecretRecord) -> None:
    """SetSecret replaces only what SetSecret stores: not the server's own rows (OAuth token sets)
    and not rows of another kind (answers to requests, template variables)."""
    what = (
        f"is kept by the server ({existing.type})"
        if existing.type.startswith(RESERVED_TYPE_PREFIX)
        else "is an answer to a request (delete it with DeleteRequestedSecret or DeleteSecret)"
        if existing.kind == SecretKind.ANSWER
        else "is a ServiceTemplate variable"
        if existing.kind == SecretKind.TEMPLATE_VARIABLE
        else ""
    )
    if what:
        raise FailedPrecondition(f"secret {existing.key.secret_id!r} {what}; SetSecret does not replace it")


def _aad(key: SecretKey, type_: str, etag: str, kind: str, name: str) -> bytes:
    if not kind:  # a STORED row: the binding every row had before kinds existed
        return place(key.room, key.owner, key.delegated_to, key.secret_id, type_, etag)
    return place(key.room, key.owner, key.delegated_to, key.secret_id, type_, etag, kind, name)


def _encode_page_token(position: tuple[str, str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(["v1", *position]).encode()).decode()


def _decode_page_token(token: str) -> tuple[str, str, str]:
    if len(token) > MAX_PAGE_TOKEN:
        raise InvalidArgument("page_token", "is not a token returned by ListSecrets")
    try:
        doc = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument("page_token", "is not a token returned by ListSecrets") from None
    if not (
        isinstance(doc, list) and len(doc) == 4 and doc[0] == "v1" and all(isinstance(x, str) for x in doc)
    ):
        raise InvalidArgument("page_token", "is not a token returned by ListSecrets")
    return doc[1], doc[2], doc[3]
