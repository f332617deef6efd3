"""Project secrets: Secret Keys, Image Pull Secrets, Service / ServiceTemplate manifests, and the
resolution of a service's environment at start-up.

Storage: every project record is a sealed row of the secrets table in room "" (no token names
an empty room, so the Secrets API can never reach them), owned by the project id, with ids
`key:<id>`, `pull:<id>` and `service:<name>`. So they share the envelope encryption, rewrap
and check-and-set of room secrets; the store sees only ciphertext.

Who may do what (roles from the token's `project` grant): admins manage everything and read
values; developers apply manifests and read metadata, never values; a service token resolves its
own manifest (and reads the keys it declares), nothing else.

No amplification (auth/authority.py): a manifest is stored with its author's authority (sealed
with it), and releases nothing its author could not read or mint directly. That is checked
against the author's token when the manifest is applied, and again at resolution: a Service's
room secrets and minted tokens resolve on its author's authority in the author's room (an owner
who revokes a delegation takes the secret away from the manifest); a ServiceTemplate's, on the
installer's — the caller of ResolveService, in the room its token names. Key values and pull
secrets need a project admin as author.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .. import validate
from ..audit import AuditLog
from ..auth import authority
from ..auth.principal import Principal
from ..errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    audited,
)
from ..quotas import Quotas
from ..secrets.service import SecretsService
from ..store import ABSENT, ANY, SecretKey, SecretKind, SecretRecord, Store, WriteCondition
from . import launch
from .manifests import EnvVar, Manifest, SecretRef, obscure_references, parse_manifest, render_environment

PROJECT_ROOM = ""  # no participant token names an empty room
KEY_TYPE = "application/vnd.roomsecrets.project-secret-key+json"
PULL_TYPE = "application/vnd.roomsecrets.project-pull-secret+json"
SERVICE_TYPE = "application/vnd.roomsecrets.project-service+yaml"
_WHAT = {KEY_TYPE: "secret key", PULL_TYPE: "pull secret", SERVICE_TYPE: "service"}
MAX_ITEMS = 10_000
MAX_KEYS = 500
MAX_VALUE_BYTES = 64 * 1024  # per environment value
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FLAVORS = {"docker": "none@example.com", "acr": "none@microsoft.com", "gar": "none@google.com"}

# The sealed form of a stored manifest: the YAML and its author's authority (authority.record_of).
# Rows written before authors were recorded hold the bare YAML: they resolve literal values only.
_SERVICE_FORMAT = "roomsecrets.service/v2"


class TokenMinter(Protocol):
    """Mints a participant token for a manifest's `token:` entry; None in the server when it has
    no signing key (then such entries cannot be resolved)."""

    def __call__(
        self,
        identity: str,
        room: str,
        project: str,
        role: str,
        api: tuple[str, ...],
        *,
        request_oauth_token: list[dict[str, Any]] | None,
    ) -> str: ...


# Every project role; a token with none of them is refused before its request is looked at.
PROJECT_ROLES = ("admin", "developer", "service")


@dataclass(frozen=True, slots=True)
class SecretKeyBundle:
    id: str
    name: str
    data: dict[str, str]
    etag: str
    update_time: float


@dataclass(frozen=True, slots=True)
class PullSecret:
    id: str
    name: str
    flavor: str
    server: str
    username: str
    password: str
    email: str
    etag: str
    update_time: float


@dataclass(frozen=True, slots=True)
class StoredService:
    manifest: Manifest
    etag: str
    update_time: float
    author: Principal | None  # None: applied before authors were recorded

    def author_may_read_project_values(self) -> bool:
        return self.author is not None and self.author.project_role == "admin"


@dataclass(frozen=True, slots=True)
class Resolved:
    environment: dict[str, str]
    docker_config_json: bytes
    image: str
    # Names in `environment` that launch.denied() refuses and the manifest's admin allowed.
    allowed_environment: tuple[str, ...] = ()


class ProjectService:
    def __init__(
        self,
        store: Store,
        secrets: SecretsService,
        audit: AuditLog,
        quotas: Quotas,
        *,
        mint_token: TokenMinter | None,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._audit = audit
        self._quotas = quotas
        self._mint = mint_token

    # -- secret keys --------------------------------------------------------------------------
    async def create_secret_key(
        self, p: Principal, *, id_: str, name: str, data: Mapping[str, str]
    ) -> SecretKeyBundle:
        p.require_project_role("admin", what="creating a secret key")
        id_ = validate.secret_id(id_, "id") if id_ else uuid.uuid4().hex[:16]
        name = validate.text(name, "name", validate.MAX_NAME) or id_
        bundle = dict(_check_pairs(data, "data"))
        record = await self._write(p, "key:" + id_, KEY_TYPE, name, {"name": name, "data": bundle}, ABSENT)
        await self._audit.record("create_secret_key", room=_where(p), actor=p.identity, secret_id=id_)
        return SecretKeyBundle(id_, name, bundle, record.etag, record.update_time)

    async def get_secret_key(self, p: Principal, id_: str) -> tuple[SecretKeyBundle, bool]:
        """The key, and whether the caller may see its values."""
        p.require_project_role(*PROJECT_ROLES, what="reading a secret key")  # before the request
        id_ = validate.secret_id(id_, "id")
        if p.project_role == "service":
            try:
                stored = await self._service(p, p.service)
            except NotFound:
                stored = None
            if stored is None or id_ not in stored.manifest.secrets:
                await self._audit.record(
                    "get_secret_key", room=_where(p), actor=p.identity, outcome="denied", secret_id=id_
                )
                raise audited(PermissionDenied(f"service {p.service!r} does not declare secret key {id_!r}"))
            self._check_author_reads_values(stored, f"secret key {id_!r}")
            may_read = True
            assert stored.author is not None  # checked just above
            how = f"admin:{stored.author.identity} (manifest {p.service})"
        else:
            p.require_project_role("admin", "developer", what="reading a secret key")
            may_read = p.project_role == "admin"
            how = f"{p.project_role}:{p.identity}"
        bundle = await self._key(p, id_)
        await self._audit.record(
            "get_secret_key",
            room=_where(p),
            actor=p.identity,
            secret_id=id_,
            outcome="values" if may_read else "metadata",
            authority=how,
        )
        return bundle, may_read

    async def list_secret_keys(self, p: Principal) -> list[SecretKeyBundle]:
        p.require_project_role("admin", "developer", what="listing secret keys")
        return [self._bundle(r) for r in await self._list(p, KEY_TYPE, "list_secret_keys")]

    async def update_secret_key(
        self, p: Principal, *, id_: str, name: str, set_: Mapping[str, str], remove: list[str], etag: str
    ) -> SecretKeyBundle:
        p.require_project_role("admin", what="updating a secret key")
        id_ = validate.secret_id(id_, "id")
        additions = dict(_check_pairs(set_, "set"))
        for key in remove:
            _check_env_name(key, "remove")
        name = validate.text(name, "name", validate.MAX_NAME)
        for _ in range(4):
            current = await self._key(p, id_)
            if etag and etag != current.etag:
                raise EtagMismatch(f"etag does not match: secret key {id_!r} has changed")
            missing = [k for k in remove if k not in current.data]
            if missing:
                raise InvalidArgument("remove", f"secret key {id_!r} has no key {missing[0]!r}")
            data = {k: v for k, v in current.data.items() if k not in remove} | additions
            if len(data) > MAX_KEYS:
                raise InvalidArgument("set", f"a secret key holds at most {MAX_KEYS} keys")
            new_name = name or current.name
            try:
                record = await self._write(
                    p,
                    "key:" + id_,
                    KEY_TYPE,
                    new_name,
                    {"name": new_name, "data": data},
                    WriteCondition(etag=current.etag),
                )
            except EtagMismatch:
                if etag:
                    raise
                continue
            await self._audit.record("update_secret_key", room=_where(p), actor=p.identity, secret_id=id_)
            return SecretKeyBundle(id_, new_name, data, record.etag, record.update_time)
        raise EtagMismatch(f"secret key {id_!r} is being changed concurrently; try again")

    async def delete_secret_key(self, p: Principal, id_: str, etag: str) -> None:
        p.require_project_role("admin", what="deleting a secret key")
        await self._delete(p, "key:" + validate.secret_id(id_, "id"), etag, "secret key")
        await self._audit.record("delete_secret_key", room=_where(p), actor=p.identity, secret_id=id_)

    # -- image pull secrets -------------------------------------------------------------------
    async def create_pull_secret(
        self,
        p: Principal,
        *,
        id_: str,
        name: str,
        flavor: str,
        server: str,
        username: str,
        password: str,
        email: str,
    ) -> PullSecret:
        p.require_project_role("admin", what="creating a pull secret")
        id_ = validate.secret_id(id_, "id") if id_ else uuid.uuid4().hex[:16]
        flavor = flavor or "docker"
        if flavor not in FLAVORS:
            raise InvalidArgument("flavor", f"must be one of {', '.join(FLAVORS)}")
        if flavor == "gar":
            username = username or "_json_key"
        doc = {
            "name": validate.text(name, "name", validate.MAX_NAME) or id_,
            "flavor": flavor,
            "server": validate.text(server, "server", validate.MAX_URL, required=True),
            "username": validate.text(username, "username", validate.MAX_NAME, required=True),
            "password": _check_password(password),
            "email": validate.text(email, "email", validate.MAX_NAME) or FLAVORS[flavor],
        }
        record = await self._write(p, "pull:" + id_, PULL_TYPE, str(doc["name"]), doc, ABSENT)
        await self._audit.record("create_pull_secret", room=_where(p), actor=p.identity, secret_id=id_)
        return self._pull(record)

    async def update_pull_secret(
        self,
        p: Principal,
        *,
        id_: str,
        name: str,
        server: str,
        username: str,
        password: str,
        email: str,
        etag: str,
    ) -> PullSecret:
        p.require_project_role("admin", what="updating a pull secret")
        id_ = validate.secret_id(id_, "id")
        current = await self._pull_by_id(p, id_)
        if etag and etag != current.etag:
            raise EtagMismatch(f"etag does not match: pull secret {id_!r} has changed")
        doc = {
            "name": validate.text(name, "name", validate.MAX_NAME) or current.name,
            "flavor": current.flavor,
            "server": validate.text(server, "server", validate.MAX_URL) or current.server,
            "username": validate.text(username, "username", validate.MAX_NAME) or current.username,
            "password": _check_password(password) if password else current.password,
            "email": validate.text(email, "email", validate.MAX_NAME) or current.email,
        }
        record = await self._write(
            p, "pull:" + id_, PULL_TYPE, str(doc["name"]), doc, WriteCondition(etag=current.etag)
        )
        await self._audit.record("update_pull_secret", room=_where(p), actor=p.identity, secret_id=id_)
        return self._pull(record)

    async def list_pull_secrets(self, p: Principal) -> list[PullSecret]:
        p.require_project_role("admin", "developer", what="listing pull secrets")
        return [self._pull(r) for r in await self._list(p, PULL_TYPE, "list_pull_secrets")]

    async def delete_pull_secret(self, p: Principal, id_: str, etag: str) -> None:
        p.require_project_role("admin", what="deleting a pull secret")
        await self._delete(p, "pull:" + validate.secret_id(id_, "id"), etag, "pull secret")
        await self._audit.record("delete_pull_secret", room=_where(p), actor=p.identity, secret_id=id_)

    # -- manifests ----------------------------------------------------------------------------
    async def apply_service(self, p: Principal, text: str, etag: str) -> StoredService:
        p.require_project_role("admin", "developer", what="applying a manifest")
        manifest = parse_manifest(text)  # refused whole when invalid: nothing is written
        try:
            await self._check_author(p, manifest)  # no amplification: nothing beyond the author's own
        except PermissionDenied as refused:
            await self._audit.record(
                "apply_service", room=_where(p), actor=p.identity, outcome="denied", target=manifest.name
            )
            raise audited(refused) from None
        key = _key(p, "service:" + manifest.name)
        existing = await self._store.get_secret(key)
        if etag and (existing is None or existing.etag != etag):
            raise EtagMismatch(f"etag does not match: service {manifest.name!r} has changed")
        condition = WriteCondition(etag=existing.etag) if existing else ABSENT
        sealed = {"format": _SERVICE_FORMAT, "manifest": text, "author": authority.record_of(p)}
        record = self._secrets.seal(key, SERVICE_TYPE, manifest.name, json.dumps(sealed).encode())
        # Bounded per project (quotas.py); concurrent applies may overshoot by the ones in flight.
        others = await self._store.list_owned(PROJECT_ROOM, _project(p), SERVICE_TYPE, MAX_ITEMS)
        try:
            self._quotas.check_manifest_bytes(
                p.project, record.size + sum(r.size for r in others if r.key != key)
            )
        except ResourceExhausted as refused:
            await self._audit.record(
                "apply_service",
                room=_where(p),
                actor=p.identity,
                outcome="quota_exceeded",
                target=manifest.name,
            )
            raise audited(refused) from None
        await self._store.put_secret(record, condition)
        await self._audit.record(
            "apply_service",
            room=_where(p),
            actor=p.identity,
            target=manifest.name,
            authority=f"{p.project_role}:{p.identity} in room {p.room_name}",
        )
        return StoredService(manifest, record.etag, record.update_time, p)

    async def _check_author(self, author: Principal, manifest: Manifest) -> None:
        """What `author` may put into a manifest: only what it could read or mint itself."""
        if manifest.secrets:
            authority.check_reads_project_values(author, "container.secrets")
        if manifest.pull_secret:
            authority.check_reads_project_values(author, "container.pull_secret")
        if manifest.allow_environment and author.project_role != "admin":
            raise PermissionDenied(
                "container.allow_environment: only a project admin may allow variables that a "
                "loader, interpreter or shell reads at start-up"
            )
        for i, entry in enumerate(manifest.environment):
            field = f"container.environment[{i}]"
            if entry.token is not None:
                spec = entry.token
                authority.check_mints(author, spec.identity, spec.api, f"{field}.token")
            elif entry.secret is not None:
                key = _referenced(author, entry.secret)
                try:
                    authority.reads_as(author, key.owner, key.delegated_to)
                except PermissionDenied as refused:
                    raise PermissionDenied(f"{field}.secret: {refused.message}") from None
                if key.delegated_to and await self._store.get_secret(key) is None:
                    raise PermissionDenied(
                        f"{field}.secret: {author.identity!r} may not read room secret {key.secret_id!r} "
                        f"of {key.owner!r}: it is not delegated to {author.identity!r} in room "
                        f"{author.room_name!r} (a manifest names the author's own secrets, or those "
                        "delegated to the author)"
                    )

    async def get_service(self, p: Principal, name: str) -> StoredService:
        p.require_project_role(*PROJECT_ROLES, what="reading a manifest")
        if not (p.project_role == "service" and p.service == name):
            p.require_project_role("admin", "developer", what="reading a manifest")
        stored = await self._service(p, name)
        await self._audit.record("get_service", room=_where(p), actor=p.identity, target=name)
        return stored

    async def list_services(self, p: Principal) -> list[StoredService]:
        p.require_project_role("admin", "developer", what="listing services")
        return [self._stored_service(r) for r in await self._list(p, SERVICE_TYPE, "list_services")]

    async def delete_service(self, p: Principal, name: str, etag: str) -> None:
        p.require_project_role("admin", "developer", what="deleting a service")
        await self._delete(p, "service:" + _check_service_name(name), etag, "service")
        await self._audit.record("delete_service", room=_where(p), actor=p.identity, target=name)

    # -- resolution ---------------------------------------------------------------------------
    async def resolve_service(self, p: Principal, name: str, variables: Mapping[str, str]) -> Resolved:
        p.require_project_role(*PROJECT_ROLES, what="resolving a service")
        name = _check_service_name(name)
        if p.project_role == "service":
            if p.service != name:
                await self._audit.record(
                    "resolve_service", room=_where(p), actor=p.identity, outcome="denied", target=name
                )
                raise audited(
                    PermissionDenied(f"a token of service {p.service!r} may not resolve service {name!r}")
                )
        else:
            p.require_project_role("admin", what="resolving a service")
        stored = await self._service(p, name)
        manifest = stored.manifest
        env: dict[str, str] = {}
        sources: dict[str, str] = {}
        allowed: list[str] = []

        def put(var: str, value: str, source: str) -> None:
            if var in env:
                raise FailedPrecondition(
                    f"service {name!r}: environment variable {var} comes from both "
                    f"{sources[var]} and {source}"
                )
            controls = launch.denied(var)
            if controls:
                if var not in manifest.allow_environment or not stored.author_may_read_project_values():
                    raise FailedPrecondition(
                        f"service {name!r}: {source}: {launch.refusal(var, controls)}",
                        reason="ENVIRONMENT_DENIED",
                    )
                allowed.append(var)
            env[var], sources[var] = value, source

        if manifest.secrets or manifest.pull_secret:
            self._check_author_reads_values(stored, "its secret keys and pull secret")
        for key_id in manifest.secrets:
            try:
                bundle = await self._key(p, key_id)
            except NotFound:
                raise FailedPrecondition(
                    f"service {name!r} declares secret key {key_id!r}, which does not exist",
                    reason="MISSING_SECRET",
                ) from None
            for var, value in sorted(bundle.data.items()):
                put(var, value, f"secret key {key_id!r}")
            await self._audit_release(p, stored, "resolve_service.secret_key", secret_id=key_id)
        obscure = obscure_references(manifest)
        supplied = dict(variables)
        for var in set(obscure.values()) - set(supplied):
            kept = await self._template_variable(p, manifest, var)
            if kept is not None:  # given at an earlier install in this room
                supplied[var] = _utf8(self._secrets.open(kept), manifest, kept.key.secret_id)
        rendered = render_environment(manifest, supplied)
        room_authority = self._room_authority(stored, p)
        for entry in rendered:
            put(
                entry.name,
                await self._env_value(p, stored, room_authority, entry, obscure, variables),
                f"environment {entry.name}",
            )
        docker = b""
        if manifest.pull_secret:
            try:
                pull = await self._pull_by_id(p, manifest.pull_secret)
            except NotFound:
                raise FailedPrecondition(
                    f"service {name!r} declares pull secret {manifest.pull_secret!r}, which does not exist",
                    reason="MISSING_SECRET",
                ) from None
            docker = docker_config_json(pull)
            await self._audit_release(
                p, stored, "resolve_service.pull_secret", secret_id=manifest.pull_secret
            )
        await self._audit.record("resolve_service", room=_where(p), actor=p.identity, target=name)
        return Resolved(env, docker, manifest.image, tuple(allowed))

    def _check_author_reads_values(self, stored: StoredService, what: str) -> None:
        """Key values and pull secrets leave through a manifest only on a project admin's authority."""
        name = stored.manifest.name
        if stored.author is None:
            raise FailedPrecondition(
                f"service {name!r} was applied before manifests recorded their author, so it cannot "
                f"release {what}: a project admin must apply it again",
                reason="MANIFEST_AUTHOR_UNKNOWN",
            )
        if not stored.author_may_read_project_values():
            raise PermissionDenied(
                f"service {name!r} was applied by {stored.author.identity!r}, who may not read the "
                f"values of {what}: a project admin must apply it"
            )

    @staticmethod
    def _room_authority(stored: StoredService, resolver: Principal) -> Principal | None:
        """On whose authority a manifest's room secrets and tokens are released: a Service's
        author (in the author's room), a ServiceTemplate's installer (in the room it installs into)."""
        return resolver if stored.manifest.kind == "ServiceTemplate" else stored.author

    async def _audit_release(
        self,
        p: Principal,
        stored: StoredService,
        action: str,
        *,
        secret_id: str = "",
        target: str = "",
        on: Principal | None = None,
    ) -> None:
        by = on or stored.author
        how = f"{by.project_role or 'participant'}:{by.identity}" if by else "unknown"
        await self._audit.record(
            action,
            room=_where(p) if on is None else on.room,
            actor=p.identity,
            secret_id=secret_id,
            target=target or stored.manifest.name,
            authority=f"{how} (manifest {stored.manifest.name})",
        )

    async def _env_value(
        self,
        p: Principal,
        stored: StoredService,
        room_authority: Principal | None,
        entry: EnvVar,
        obscure: Mapping[str, str],
        variables: Mapping[str, str],
    ) -> str:
        manifest = stored.manifest
        if entry.name in obscure:
            return await self._obscure_value(p, manifest, obscure[entry.name], variables)
        if entry.value is not None:
            return entry.value
        where = f"service {manifest.name!r}: environment {entry.name}"
        if room_authority is None:
            raise FailedPrecondition(
                f"{where}: the manifest was applied before manifests recorded their author, so its "
                "room secrets and tokens cannot be released: apply it again",
                reason="MANIFEST_AUTHOR_UNKNOWN",
            )
        if entry.token is not None:
            spec = entry.token
            authority.check_mints(room_authority, spec.identity, spec.api, f"{where}: token")
            if self._mint is None:
                raise FailedPrecondition(
                    f"{where} asks for a minted token, but this server has no signing key (run it "
                    "with the development key, or give the token as a room secret)"
                )
            token = self._mint(
                spec.identity,
                room_authority.room_name,
                room_authority.project,
                spec.role,
                spec.api,
                request_oauth_token=authority.minted_oauth_restriction(room_authority),
            )
            await self._audit_release(
                p, stored, "resolve_service.token", target=spec.identity, on=room_authority
            )
            return token
        assert entry.secret is not None
        ref = entry.secret
        key = _referenced(room_authority, ref)
        record = await self._store.get_secret(key)
        if record is None:
            delegation = f" delegated to {key.delegated_to!r}" if key.delegated_to else ""
            raise FailedPrecondition(
                f"{where} names room secret {ref.id!r} of {ref.identity!r}{delegation}, which does not "
                f"exist in room {room_authority.room_name!r}",
                reason="MISSING_SECRET",
            )
        value = await self._secrets.release(
            room_authority,
            record,
            "resolve_service.secret",
            actor=p.identity,
            on_behalf=f"manifest {manifest.name}",
        )
        try:
            return value.data.decode()
        except UnicodeDecodeError:
            raise FailedPrecondition(
                f"service {manifest.name!r}: room secret {ref.id!r} is not UTF-8 text, so it cannot be an "
                "environment variable"
            ) from None

    async def _template_variable(self, p: Principal, manifest: Manifest, var: str) -> SecretRecord | None:
        """The stored value of an `obscure` variable in the caller's room, if the template stored
        one: a secret of the same id that the template did not create is never used or replaced."""
        stored = await self._store.get_secret(_obscure_key(p, manifest, var))
        if stored is not None and stored.kind != SecretKind.TEMPLATE_VARIABLE:
            raise FailedPrecondition(
                f"service {manifest.name!r}: room secret {stored.key.secret_id!r} of {stored.key.owner!r} "
                f"was not stored by template {manifest.name!r}, so it is neither used nor replaced for "
                f"variable {var}",
                reason="NOT_A_TEMPLATE_VARIABLE",
            )
        return stored

    async def _obscure_value(
        self, p: Principal, manifest: Manifest, var: str, variables: Mapping[str, str]
    ) -> str:
        """An `obscure` template variable lives as a room secret of the service's identity (its
        name), of kind TEMPLATE_VARIABLE: stored when supplied, read back when not."""
        key = _obscure_key(p, manifest, var)
        existing = await self._template_variable(p, manifest, var)
        if var in variables:
            # Stored for the service's identity, which the template's author chose: storing for
            # another identity needs room admin, unless the installer is that service itself.
            how = authority.acts_for(
                p, key.owner, f"variables.{var} (stored for service identity {key.owner!r})"
            )
            value = variables[var]
            record = self._secrets.seal(key, "text/plain", "", value.encode(), SecretKind.TEMPLATE_VARIABLE)
            await self._store.put_secret(record, WriteCondition(etag=existing.etag) if existing else ABSENT)
            await self._audit.record(
                "store_template_secret",
                room=p.room,
                actor=p.identity,
                secret_id=key.secret_id,
                owner=key.owner,
                authority=f"{how}:{p.identity}",
            )
            return value
        if existing is None:
            raise InvalidArgument(f"variables.{var}", "is required (no stored value for this room yet)")
        value = _utf8(self._secrets.open(existing), manifest, key.secret_id)
        await self._audit.record(
            "resolve_service.template_variable",
            room=p.room,
            actor=p.identity,
            secret_id=key.secret_id,
            owner=key.owner,
            target=manifest.name,
            authority=f"{p.project_role}:{p.identity} (installs template {manifest.name})",
        )
        return value

    # -- storage helpers ----------------------------------------------------------------------
    async def _write(
        self, p: Principal, secret_id: str, type_: str, name: str, doc: object, condition: WriteCondition
    ) -> SecretRecord:
        record = self._secrets.seal(_key(p, secret_id), type_, name, json.dumps(doc).encode())
        what = _WHAT[type_]
        try:
            await self._store.put_secret(record, condition)
        except EtagMismatch:
            if condition != ABSENT:
                raise
            raise AlreadyExists(f"{what} {secret_id.split(':', 1)[1]!r} already exists") from None
        except AlreadyExists:  # the store's message names internal types: say it in project terms
            raise AlreadyExists(f"another {what} is already named {name!r}") from None
        return record

    async def _list(self, p: Principal, type_: str, action: str) -> list[SecretRecord]:
        rows = await self._store.list_owned(PROJECT_ROOM, _project(p), type_, MAX_ITEMS)
        await self._audit.record(action, room=_where(p), actor=p.identity, target=f"{len(rows)} listed")
        return rows

    async def _delete(self, p: Principal, secret_id: str, etag: str, what: str) -> None:
        condition = WriteCondition(etag=etag) if validate.etag(etag) else ANY
        if not await self._store.delete_secret(_key(p, secret_id), condition):
            raise NotFound(f"{what} {secret_id.split(':', 1)[1]!r} not found")

    async def _key(self, p: Principal, id_: str) -> SecretKeyBundle:
        record = await self._store.get_secret(_key(p, "key:" + id_))
        if record is None or record.type != KEY_TYPE:
            raise NotFound(f"secret key {id_!r} not found")
        return self._bundle(record)

    async def _pull_by_id(self, p: Principal, id_: str) -> PullSecret:
        record = await self._store.get_secret(_key(p, "pull:" + validate.secret_id(id_, "id")))
        if record is None or record.type != PULL_TYPE:
            raise NotFound(f"pull secret {id_!r} not found")
        return self._pull(record)

    async def _service(self, p: Principal, name: str) -> StoredService:
        record = await self._store.get_secret(_key(p, "service:" + _check_service_name(name)))
        if record is None or record.type != SERVICE_TYPE:
            raise NotFound(f"service {name!r} not found")
        return self._stored_service(record)

    def _bundle(self, record: SecretRecord) -> SecretKeyBundle:
        doc = json.loads(self._secrets.open(record))
        return SecretKeyBundle(
            record.key.secret_id.removeprefix("key:"),
            doc["name"],
            dict(doc["data"]),
            record.etag,
            record.update_time,
        )

    def _pull(self, record: SecretRecord) -> PullSecret:
        doc = json.loads(self._secrets.open(record))
        return PullSecret(
            id=record.key.secret_id.removeprefix("pull:"),
            etag=record.etag,
            update_time=record.update_time,
            **doc,
        )

    def _stored_service(self, record: SecretRecord) -> StoredService:
        text, author = _unpack_service(self._secrets.open(record))
        return StoredService(parse_manifest(text), record.etag, record.update_time, author)


def _unpack_service(sealed: bytes) -> tuple[str, Principal | None]:
    """(manifest text, author) of a stored manifest; a bare YAML row has no recorded author."""
    text = sealed.decode()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("format") == _SERVICE_FORMAT:
            return str(doc["manifest"]), authority.principal_of(doc["author"])
    return text, None


def docker_config_json(pull: PullSecret) -> bytes:
    auth = base64.b64encode(f"{pull.username}:{pull.password}".encode()).decode()
    doc = {
        "auths": {
            pull.server: {
                "username": pull.username,
                "password": pull.password,
                "email": pull.email,
                "auth": auth,
            }
        }
    }
    return json.dumps(doc, sort_keys=True).encode()


def _project(p: Principal) -> str:
    if not p.project:
        raise PermissionDenied("token has no project (`sub` claim)")
    return p.project


def _key(p: Principal, secret_id: str) -> SecretKey:
    return SecretKey(PROJECT_ROOM, _project(p), "", secret_id)


def _referenced(reader: Principal, ref: SecretRef) -> SecretKey:
    """The row a manifest's `secret: {identity, id}` names when read on `reader`'s authority: the
    reader's own secret, or one its owner delegated to the reader, in the reader's room."""
    delegated_to = "" if ref.identity == reader.identity else reader.identity
    return SecretKey(reader.room, ref.identity, delegated_to, ref.id)


def _obscure_key(p: Principal, manifest: Manifest, var: str) -> SecretKey:
    return SecretKey(p.room, manifest.name, "", f"{manifest.name}.{var}")


def _where(p: Principal) -> str:
    return f"project:{p.project}"


def _utf8(value: bytes, manifest: Manifest, secret_id: str) -> str:
    """A stored obscure value: its room secret may have been overwritten with any bytes."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise FailedPrecondition(
            f"service {manifest.name!r}: room secret {secret_id!r} is not UTF-8 text, so it cannot be an "
            "environment variable"
        ) from None


def _check_env_name(name: str, field: str) -> str:
    if not _ENV_NAME.fullmatch(name or ""):
        raise InvalidArgument(
            field, f"{name[:64]!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
        )
    return name


def _check_pairs(data: Mapping[str, str], field: str) -> list[tuple[str, str]]:
    if len(data) > MAX_KEYS:
        raise InvalidArgument(field, f"at most {MAX_KEYS} keys")
    pairs = []
    for name, value in data.items():
        _check_env_name(name, field)
        if "\x00" in value:
            raise InvalidArgument(f"{field}.{name}", "must not contain NUL (environment values cannot)")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise InvalidArgument(f"{field}.{name}", "is too long")
        pairs.append((name, value))
    return pairs


def _check_password(password: str) -> str:
    if not password:
        raise InvalidArgument("password", "is required")
    if len(password) > 64 * 1024:
        raise InvalidArgument("password", "is too long")
    return password


def _check_service_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name or ""):
        raise InvalidArgument("name", "must be a service name (lower-case letters, digits and -)")
    return name
