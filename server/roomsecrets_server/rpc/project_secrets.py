"""roomsecrets.v1.ProjectSecrets: project Secret Keys, Image Pull Secrets, service manifests and
their resolution. Thin adapters over project.service; values leave only through GetSecretKey (to
admins and declaring services) and ResolveService."""

from __future__ import annotations

from typing import Any

from roomsecrets.v1 import project_secrets_pb2 as pb
from roomsecrets.v1 import project_secrets_pb2_grpc as pb_grpc

from ..auth.principal import Principal
from ..project.service import ProjectService, PullSecret, SecretKeyBundle, StoredService
from .convert import timestamp
from .gate import Gate
from .room_secrets import unary

_FLAVORS = {
    pb.REGISTRY_FLAVOR_UNSPECIFIED: "",
    pb.REGISTRY_FLAVOR_DOCKER: "docker",
    pb.REGISTRY_FLAVOR_ACR: "acr",
    pb.REGISTRY_FLAVOR_GAR: "gar",
}
_FLAVOR_ENUMS = {name: value for value, name in _FLAVORS.items() if name}


def key_info(bundle: SecretKeyBundle) -> pb.SecretKeyInfo:
    return pb.SecretKeyInfo(
        id=bundle.id,
        name=bundle.name,
        keys=sorted(bundle.data),
        etag=bundle.etag,
        update_time=timestamp(bundle.update_time),
    )


def pull_info(pull: PullSecret) -> pb.PullSecretInfo:
    return pb.PullSecretInfo(
        id=pull.id,
        name=pull.name,
        flavor=_FLAVOR_ENUMS[pull.flavor],
        server=pull.server,
        username=pull.username,
        email=pull.email,
        etag=pull.etag,
        update_time=timestamp(pull.update_time),
    )


def service_info(stored: StoredService) -> pb.ServiceInfo:
    manifest, author = stored.manifest, stored.author
    return pb.ServiceInfo(
        name=manifest.name,
        kind=manifest.kind,
        description=manifest.description,
        manifest=manifest.source,
        etag=stored.etag,
        update_time=timestamp(stored.update_time),
        applied_by=author.identity if author else "",
        applied_by_role=author.project_role if author else "",
        applied_in_room=author.room_name if author else "",
    )


class ProjectSecretsServicer(pb_grpc.ProjectSecretsServicer):
    def __init__(self, gate: Gate, project: ProjectService) -> None:
        self.gate = gate
        self.project = project

    # -- secret keys --------------------------------------------------------------------------
    @unary
    async def CreateSecretKey(
        self, request: pb.CreateSecretKeyRequest, p: Principal, _: Any
    ) -> pb.CreateSecretKeyResponse:
        bundle = await self.project.create_secret_key(p, id_=request.id, name=request.name, data=request.data)
        return pb.CreateSecretKeyResponse(secret_key=key_info(bundle))

    @unary
    async def GetSecretKey(
        self, request: pb.GetSecretKeyRequest, p: Principal, _: Any
    ) -> pb.GetSecretKeyResponse:
        bundle, with_values = await self.project.get_secret_key(p, request.id)
        return pb.GetSecretKeyResponse(secret_key=key_info(bundle), data=bundle.data if with_values else {})

    @unary
    async def ListSecretKeys(
        self, request: pb.ListSecretKeysRequest, p: Principal, _: Any
    ) -> pb.ListSecretKeysResponse:
        return pb.ListSecretKeysResponse(
            secret_keys=[key_info(b) for b in await self.project.list_secret_keys(p)]
        )

    @unary
    async def UpdateSecretKey(
        self, request: pb.UpdateSecretKeyRequest, p: Principal, _: Any
    ) -> pb.UpdateSecretKeyResponse:
        bundle = await self.project.update_secret_key(
            p,
            id_=request.id,
            name=request.name,
            set_=request.set,
            remove=list(request.remove),
            etag=request.etag,
        )
        return pb.UpdateSecretKeyResponse(secret_key=key_info(bundle))

    @unary
    async def DeleteSecretKey(
        self, request: pb.DeleteSecretKeyRequest, p: Principal, _: Any
    ) -> pb.DeleteSecretKeyResponse:
        await self.project.delete_secret_key(p, request.id, request.etag)
        return pb.DeleteSecretKeyResponse()

    # -- pull secrets -------------------------------------------------------------------------
    @unary
    async def CreatePullSecret(
        self, request: pb.CreatePullSecretRequest, p: Principal, _: Any
    ) -> pb.CreatePullSecretResponse:
        pull = await self.project.create_pull_secret(
            p,
            id_=request.id,
            name=request.name,
            flavor=_FLAVORS.get(request.flavor, "?"),
            server=request.server,
            username=request.username,
            password=request.password,
            email=request.email,
        )
        return pb.CreatePullSecretResponse(pull_secret=pull_info(pull))

    @unary
    async def UpdatePullSecret(
        self, request: pb.UpdatePullSecretRequest, p: Principal, _: Any
    ) -> pb.UpdatePullSecretResponse:
        pull = await self.project.update_pull_secret(
            p,
            id_=request.id,
            name=request.name,
            server=request.server,
            username=request.username,
            password=request.password,
            email=request.email,
            etag=request.etag,
        )
        return pb.UpdatePullSecretResponse(pull_secret=pull_info(pull))

    @unary
    async def ListPullSecrets(
        self, request: pb.ListPullSecretsRequest, p: Principal, _: Any
    ) -> pb.ListPullSecretsResponse:
        return pb.ListPullSecretsResponse(
            pull_secrets=[pull_info(s) for s in await self.project.list_pull_secrets(p)]
        )

    @unary
    async def DeletePullSecret(
        self, request: pb.DeletePullSecretRequest, p: Principal, _: Any
    ) -> pb.DeletePullSecretResponse:
        await self.project.delete_pull_secret(p, request.id, request.etag)
        return pb.DeletePullSecretResponse()

    # -- manifests ----------------------------------------------------------------------------
    @unary
    async def ApplyService(
        self, request: pb.ApplyServiceRequest, p: Principal, _: Any
    ) -> pb.ApplyServiceResponse:
        return pb.ApplyServiceResponse(
            service=service_info(await self.project.apply_service(p, request.manifest, request.etag))
        )

    @unary
    async def GetService(self, request: pb.GetServiceRequest, p: Principal, _: Any) -> pb.GetServiceResponse:
        return pb.GetServiceResponse(service=service_info(await self.project.get_service(p, request.name)))

    @unary
    async def ListServices(
        self, request: pb.ListServicesRequest, p: Principal, _: Any
    ) -> pb.ListServicesResponse:
        return pb.ListServicesResponse(
            services=[service_info(s) for s in await self.project.list_services(p)]
        )

    @unary
    async def DeleteService(
        self, request: pb.DeleteServiceRequest, p: Principal, _: Any
    ) -> pb.DeleteServiceResponse:
        await self.project.delete_service(p, request.name, request.etag)
        return pb.DeleteServiceResponse()

    @unary
    async def ResolveService(
        self, request: pb.ResolveServiceRequest, p: Principal, _: Any
    ) -> pb.ResolveServiceResponse:
        resolved = await self.project.resolve_service(p, request.name, dict(request.variables))
        return pb.ResolveServiceResponse(
            environment=resolved.environment,
            docker_config_json=resolved.docker_config_json,
            image=resolved.image,
            allowed_environment=resolved.allowed_environment,
        )
