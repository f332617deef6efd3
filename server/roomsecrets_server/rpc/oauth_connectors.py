"""roomsecrets.v1.OAuthConnectors: room admins keep OAuth client registrations on the server.
Replies never carry the client secret."""

from __future__ import annotations

from typing import Any

from roomsecrets.v1 import oauth_connectors_pb2 as pb
from roomsecrets.v1 import oauth_connectors_pb2_grpc as pb_grpc

from ..auth.principal import Principal
from ..oauth.connectors import Connector, ConnectorService
from .convert import client_config, timestamp
from .gate import Gate
from .room_secrets import unary


def connector_info(connector: Connector) -> pb.ConnectorInfo:
    config = connector.config
    return pb.ConnectorInfo(
        name=connector.name,
        client_id=config.client_id,
        authorization_endpoint=config.authorization_endpoint,
        token_endpoint=config.token_endpoint,
        scopes=config.scopes,
        no_pkce=not config.pkce,
        extra_params=dict(config.extra_params),
        token_endpoint_auth_method=config.auth_method,
        has_client_secret=bool(config.client_secret),
        update_time=timestamp(connector.update_time),
    )


class OAuthConnectorsServicer(pb_grpc.OAuthConnectorsServicer):
    def __init__(self, gate: Gate, connectors: ConnectorService) -> None:
        self.gate = gate
        self.connectors = connectors

    @unary
    async def SetConnector(
        self, request: pb.SetConnectorRequest, p: Principal, _: Any
    ) -> pb.SetConnectorResponse:
        connector = await self.connectors.set(p, request.name, client_config(request.client))
        return pb.SetConnectorResponse(connector=connector_info(connector))

    @unary
    async def GetConnector(
        self, request: pb.GetConnectorRequest, p: Principal, _: Any
    ) -> pb.GetConnectorResponse:
        return pb.GetConnectorResponse(connector=connector_info(await self.connectors.get(p, request.name)))

    @unary
    async def ListConnectors(
        self, request: pb.ListConnectorsRequest, p: Principal, _: Any
    ) -> pb.ListConnectorsResponse:
        return pb.ListConnectorsResponse(
            connectors=[connector_info(c) for c in await self.connectors.list(p)]
        )

    @unary
    async def DeleteConnector(
        self, request: pb.DeleteConnectorRequest, p: Principal, _: Any
    ) -> pb.DeleteConnectorResponse:
        await self.connectors.delete(p, request.name)
        return pb.DeleteConnectorResponse()
