"""The project secrets client: Secret Keys, Image Pull Secrets, Service manifests and
`resolve_service` (what a service gets at start-up).

    from roomsecrets.project import ProjectSecretsClient

    with ProjectSecretsClient(address, admin_token) as project:
        project.create_secret_key("openai", {"OPENAI_API_KEY": "sk-..."})
        project.apply_service(Path("api.yaml").read_text())
        env = project.resolve_service("api").environment

Roles come from the token's `project` grant (admin, developer, service). Errors are the typed
exceptions of roomsecrets.errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from .client import (
    DEFAULT_ADDRESS,
    DEFAULT_CALL_TIMEOUT,
    TokenSource,
    auth_metadata,
    channel_credentials,
    channel_options,
    open_channel,
)
from .errors import NotFoundError, error_from_rpc
from .types import _time
from .v1 import project_secrets_pb2 as pb
from .v1 import project_secrets_pb2_grpc as pb_grpc

_FLAVORS = {"docker": pb.REGISTRY_FLAVOR_DOCKER, "acr": pb.REGISTRY_FLAVOR_ACR, "gar": pb.REGISTRY_FLAVOR_GAR}
_FLAVOR_NAMES = {v: k for k, v in _FLAVORS.items()}


@dataclass(frozen=True, slots=True)
class SecretKeyInfo:
    id: str
    name: str
    keys: tuple[str, ...]
    etag: str = ""
    update_time: datetime | None = None
    # Only for project admins and the services that declare the key; empty otherwise.
    data: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_pb(cls, info: pb.SecretKeyInfo, data: Mapping[str, str] | None = None) -> SecretKeyInfo:
        return cls(info.id, info.name, tuple(info.keys), info.etag, _time(info.update_time), dict(data or {}))


@dataclass(frozen=True, slots=True)
class PullSecretInfo:
    id: str
    name: str
    flavor: str
    server: str
    username: str
    email: str
    etag: str = ""
    update_time: datetime | None = None

    @classmethod
    def from_pb(cls, info: pb.PullSecretInfo) -> PullSecretInfo:
        return cls(
            info.id,
            info.name,
            _FLAVOR_NAMES.get(info.flavor, ""),
            info.server,
            info.username,
            info.email,
            info.etag,
            _time(info.update_time),
        )


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    name: str
    kind: str
    description: str
    manifest: str
    etag: str = ""
    update_time: datetime | None = None
    # Who applied this version (identity, project role, room): the manifest releases nothing that
    # author could not read or mint directly. Empty for manifests applied before this was kept.
    applied_by: str = ""
    applied_by_role: str = ""
    applied_in_room: str = ""

    @classmethod
    def from_pb(cls, info: pb.ServiceInfo) -> ServiceInfo:
        return cls(
            info.name,
            info.kind,
            info.description,
            info.manifest,
            info.etag,
            _time(info.update_time),
            info.applied_by,
            info.applied_by_role,
            info.applied_in_room,
        )


@dataclass(frozen=True, slots=True)
class ResolvedService:
    """What a service gets at start-up. Never printed whole: it holds secret values."""

    environment: Mapping[str, str] = field(repr=False)
    docker_config_json: bytes = field(default=b"", repr=False)
    image: str = ""
    # Start-up variables (a loader's, interpreter's or shell's) a project admin allowed this
    # service; `roomsecrets run` refuses any other such name in `environment`.
    allowed_environment: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, reply: pb.ResolveServiceResponse) -> ResolvedService:
        return cls(
            dict(reply.environment),
            bytes(reply.docker_config_json),
            reply.image,
            tuple(reply.allowed_environment),
        )


class ProjectSecretsClient:
    def __init__(
        self,
        address: str | None = None,
        token: TokenSource = None,
        *,
        channel: grpc.Channel | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        options: Sequence[tuple[str, Any]] = (),
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        self._token = token
        self.call_timeout = call_timeout
        self._own_channel = channel is None
        if channel is None:
            creds = channel_credentials(
                tls=tls,
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            channel = open_channel(address, creds, options)
        self._channel = channel
        self._stub = pb_grpc.ProjectSecretsStub(channel)

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=auth_metadata(self._token), timeout=self.call_timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    # -- secret keys --------------------------------------------------------------------------
    def create_secret_key(
        self, name: str, data: Mapping[str, str], *, id: str | None = None
    ) -> SecretKeyInfo:
        reply = self._call(
            self._stub.CreateSecretKey, pb.CreateSecretKeyRequest(id=id or "", name=name, data=dict(data))
        )
        return SecretKeyInfo.from_pb(reply.secret_key)

    def get_secret_key(self, id: str) -> SecretKeyInfo | None:
        try:
            reply = self._call(self._stub.GetSecretKey, pb.GetSecretKeyRequest(id=id))
        except NotFoundError:
            return None
        return SecretKeyInfo.from_pb(reply.secret_key, reply.data)

    def list_secret_keys(self) -> list[SecretKeyInfo]:
        reply = self._call(self._stub.ListSecretKeys, pb.ListSecretKeysRequest())
        return [SecretKeyInfo.from_pb(k) for k in reply.secret_keys]

    def update_secret_key(
        self,
        id: str,
        *,
        set: Mapping[str, str] | None = None,
        remove: Sequence[str] = (),
        name: str | None = None,
        etag: str | None = None,
    ) -> SecretKeyInfo:
        request = pb.UpdateSecretKeyRequest(
            id=id, name=name or "", set=dict(set or {}), remove=list(remove), etag=etag or ""
        )
        return SecretKeyInfo.from_pb(self._call(self._stub.UpdateSecretKey, request).secret_key)

    def delete_secret_key(self, id: str, *, etag: str | None = None) -> None:
        self._call(self._stub.DeleteSecretKey, pb.DeleteSecretKeyRequest(id=id, etag=etag or ""))

    # -- image pull secrets -------------------------------------------------------------------
    def create_pull_secret(
        self,
        name: str,
        *,
        server: str,
        username: str = "",
        password: str,
        email: str = "",
        flavor: str = "docker",
        id: str | None = None,
    ) -> PullSecretInfo:
        if flavor not in _FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(_FLAVORS)}")
        request = pb.CreatePullSecretRequest(
            id=id or "",
            name=name,
            flavor=_FLAVORS[flavor],
            server=server,
            username=username,
            password=password,
            email=email,
        )
        return PullSecretInfo.from_pb(self._call(self._stub.CreatePullSecret, request).pull_secret)

    def update_pull_secret(
        self,
        id: str,
        *,
        name: str = "",
        server: str = "",
        username: str = "",
        password: str = "",
        email: str = "",
        etag: str | None = None,
    ) -> PullSecretInfo:
        request = pb.UpdatePullSecretRequest(
            id=id,
            name=name,
            server=server,
            username=username,
            password=password,
            email=email,
            etag=etag or "",
        )
        return PullSecretInfo.from_pb(self._call(self._stub.UpdatePullSecret, request).pull_secret)

    def list_pull_secrets(self) -> list[PullSecretInfo]:
        reply = self._call(self._stub.ListPullSecrets, pb.ListPullSecretsRequest())
        return [PullSecretInfo.from_pb(s) for s in reply.pull_secrets]

    def delete_pull_secret(self, id: str, *, etag: str | None = None) -> None:
        self._call(self._stub.DeletePullSecret, pb.DeletePullSecretRequest(id=id, etag=etag or ""))

    # -- services -----------------------------------------------------------------------------
    def apply_service(self, manifest: str, *, etag: str | None = None) -> ServiceInfo:
        reply = self._call(
            self._stub.ApplyService, pb.ApplyServiceRequest(manifest=manifest, etag=etag or "")
        )
        return ServiceInfo.from_pb(reply.service)

    def get_service(self, name: str) -> ServiceInfo | None:
        try:
            reply = self._call(self._stub.GetService, pb.GetServiceRequest(name=name))
        except NotFoundError:
            return None
        return ServiceInfo.from_pb(reply.service)

    def list_services(self) -> list[ServiceInfo]:
        return [
            ServiceInfo.from_pb(s)
            for s in self._call(self._stub.ListServices, pb.ListServicesRequest()).services
        ]

    def delete_service(self, name: str, *, etag: str | None = None) -> None:
        self._call(self._stub.DeleteService, pb.DeleteServiceRequest(name=name, etag=etag or ""))

    def resolve_service(self, name: str, variables: Mapping[str, str] | None = None) -> ResolvedService:
        reply = self._call(
            self._stub.ResolveService, pb.ResolveServiceRequest(name=name, variables=dict(variables or {}))
        )
        return ResolvedService.from_pb(reply)


class AsyncProjectSecretsClient:
    """`ProjectSecretsClient` for asyncio: the same methods as coroutines (an existing `channel`
    must be a grpc.aio channel)."""

    def __init__(
        self,
        address: str | None = None,
        token: TokenSource = None,
        *,
        channel: grpc.aio.Channel | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        options: Sequence[tuple[str, Any]] = (),
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        self._token = token
        self.call_timeout = call_timeout
        self._own_channel = channel is None
        if channel is None:
            creds = channel_credentials(
                tls=tls,
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            target, opts = address or DEFAULT_ADDRESS, channel_options(options)
            channel = (
                grpc.aio.insecure_channel(target, options=opts)
                if creds is None
                else grpc.aio.secure_channel(target, creds, options=opts)
            )
        self._channel = channel
        self._stub = pb_grpc.ProjectSecretsStub(channel)

    async def close(self) -> None:
        if self._own_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=auth_metadata(self._token), timeout=self.call_timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    # -- secret keys --------------------------------------------------------------------------
    async def create_secret_key(
        self, name: str, data: Mapping[str, str], *, id: str | None = None
    ) -> SecretKeyInfo:
        reply = await self._call(
            self._stub.CreateSecretKey, pb.CreateSecretKeyRequest(id=id or "", name=name, data=dict(data))
        )
        return SecretKeyInfo.from_pb(reply.secret_key)

    async def get_secret_key(self, id: str) -> SecretKeyInfo | None:
        try:
            reply = await self._call(self._stub.GetSecretKey, pb.GetSecretKeyRequest(id=id))
        except NotFoundError:
            return None
        return SecretKeyInfo.from_pb(reply.secret_key, reply.data)

    async def list_secret_keys(self) -> list[SecretKeyInfo]:
        reply = await self._call(self._stub.ListSecretKeys, pb.ListSecretKeysRequest())
        return [SecretKeyInfo.from_pb(k) for k in reply.secret_keys]

    async def update_secret_key(
        self,
        id: str,
        *,
        set: Mapping[str, str] | None = None,
        remove: Sequence[str] = (),
        name: str | None = None,
        etag: str | None = None,
    ) -> SecretKeyInfo:
        request = pb.UpdateSecretKeyRequest(
            id=id, name=name or "", set=dict(set or {}), remove=list(remove), etag=etag or ""
        )
        return SecretKeyInfo.from_pb((await self._call(self._stub.UpdateSecretKey, request)).secret_key)

    async def delete_secret_key(self, id: str, *, etag: str | None = None) -> None:
        await self._call(self._stub.DeleteSecretKey, pb.DeleteSecretKeyRequest(id=id, etag=etag or ""))

    # -- image pull secrets -------------------------------------------------------------------
    async def create_pull_secret(
        self,
        name: str,
        *,
        server: str,
        username: str = "",
        password: str,
        email: str = "",
        flavor: str = "docker",
        id: str | None = None,
    ) -> PullSecretInfo:
        if flavor not in _FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(_FLAVORS)}")
        request = pb.CreatePullSecretRequest(
            id=id or "",
            name=name,
            flavor=_FLAVORS[flavor],
            server=server,
            username=username,
            password=password,
            email=email,
        )
        return PullSecretInfo.from_pb((await self._call(self._stub.CreatePullSecret, request)).pull_secret)

    async def update_pull_secret(
        self,
        id: str,
        *,
        name: str = "",
        server: str = "",
        username: str = "",
        password: str = "",
        email: str = "",
        etag: str | None = None,
    ) -> PullSecretInfo:
        request = pb.UpdatePullSecretRequest(
            id=id,
            name=name,
            server=server,
            username=username,
            password=password,
            email=email,
            etag=etag or "",
        )
        return PullSecretInfo.from_pb((await self._call(self._stub.UpdatePullSecret, request)).pull_secret)

    async def list_pull_secrets(self) -> list[PullSecretInfo]:
        reply = await self._call(self._stub.ListPullSecrets, pb.ListPullSecretsRequest())
        return [PullSecretInfo.from_pb(s) for s in reply.pull_secrets]

    async def delete_pull_secret(self, id: str, *, etag: str | None = None) -> None:
        await self._call(self._stub.DeletePullSecret, pb.DeletePullSecretRequest(id=id, etag=etag or ""))

    # -- services -----------------------------------------------------------------------------
    async def apply_service(self, manifest: str, *, etag: str | None = None) -> ServiceInfo:
        reply = await self._call(
            self._stub.ApplyService, pb.ApplyServiceRequest(manifest=manifest, etag=etag or "")
        )
        return ServiceInfo.from_pb(reply.service)

    async def get_service(self, name: str) -> ServiceInfo | None:
        try:
            reply = await self._call(self._stub.GetService, pb.GetServiceRequest(name=name))
        except NotFoundError:
            return None
        return ServiceInfo.from_pb(reply.service)

    async def list_services(self) -> list[ServiceInfo]:
        return [
            ServiceInfo.from_pb(s)
            for s in (await self._call(self._stub.ListServices, pb.ListServicesRequest())).services
        ]

    async def delete_service(self, name: str, *, etag: str | None = None) -> None:
        await self._call(self._stub.DeleteService, pb.DeleteServiceRequest(name=name, etag=etag or ""))

    async def resolve_service(self, name: str, variables: Mapping[str, str] | None = None) -> ResolvedService:
        reply = await self._call(
            self._stub.ResolveService, pb.ResolveServiceRequest(name=name, variables=dict(variables or {}))
        )
        return ResolvedService.from_pb(reply)
