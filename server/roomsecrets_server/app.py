"""Wires settings into a running gRPC server: store, keyring, auth, domain services, adapters,
reflection, health, TLS, message limits, and a graceful shutdown that ends streams cleanly."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import _async as health_aio  # the aio HealthServicer (also `health.aio`)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from roomsecrets.v1 import oauth_connectors_pb2, project_secrets_pb2, room_secrets_pb2

from .audit import AuditLog
from .auth.dev_key import ensure_dev_key, mint_service_token
from .auth.tokens import TokenVerifier, VerificationKey, hs256_key, keys_from_jwks, public_key_from_pem
from .config import Settings
from .crypto.keyring import KeyringFile
from .crypto.rotation import KekRotation
from .crypto.startup_check import check_keyring
from .oauth.connectors import ConnectorService
from .oauth.provider import AuthorizationServer
from .oauth.service import OAuthService
from .project.service import ProjectService
from .requests.notifier import LocalNotifier, Notifier
from .requests.pg_notifier import PgNotifier
from .requests.service import RequestService
from .rpc.oauth_connectors import OAuthConnectorsServicer
from .rpc.project_secrets import ProjectSecretsServicer
from .rpc.registry import add_servicer
from .rpc.room_secrets import RoomSecretsServicer
from .secrets.service import SecretsService
from .store import Store
from .store.postgres import PostgresStore
from .store.sqlite import SqliteStore

log = logging.getLogger("roomsecrets")

ROOM_SECRETS_SERVICE = room_secrets_pb2.DESCRIPTOR.services_by_name["RoomSecrets"]
OAUTH_CONNECTORS_SERVICE = oauth_connectors_pb2.DESCRIPTOR.services_by_name["OAuthConnectors"]
PROJECT_SECRETS_SERVICE = project_secrets_pb2.DESCRIPTOR.services_by_name["ProjectSecrets"]
ROOM_SECRETS = ROOM_SECRETS_SERVICE.full_name
OAUTH_CONNECTORS = OAUTH_CONNECTORS_SERVICE.full_name
PROJECT_SECRETS = PROJECT_SECRETS_SERVICE.full_name


def verification_keys(settings: Settings) -> list[VerificationKey]:
    keys: list[VerificationKey] = []
    if settings.dev_signing_key:
        keys.append(hs256_key(*ensure_dev_key(settings.data_dir)))
    for path in settings.jwt_public_keys:
        keys.append(public_key_from_pem(path.stem, path.read_bytes()))
    for path in settings.jwks_files:
        keys.extend(keys_from_jwks(path))
    return keys


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # A stale server on the same port must make bind fail, not silently share traffic; only
        # the processes of `serve --workers N` share their port on purpose (workers.py).
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.max_concurrent_streams", 1000),
    ]


def open_store(settings: Settings) -> tuple[Store, Notifier]:
    """The backend the settings choose, and the notifier that fits it: with SQLite one process
    serves, with PostgreSQL replicas relay events to each other through the database."""
    if settings.database_url:
        store = PostgresStore(settings.database_url)
        return store, PgNotifier(store)
    return SqliteStore(settings.database_path, group_window=settings.write_group_window), LocalNotifier()


class RoomSecretsServer:
    def __init__(self, settings: Settings) -> None:
        settings.check()
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.keyring = KeyringFile(settings.keyring_path)
        self.keyring.ensure()
        self.keyring.envelope()  # fail at start, not on first use, if the keyring is unreadable
        self.verifier = TokenVerifier(
            verification_keys(settings), issuer=settings.token_issuer, audience=settings.token_audience
        )
        self.store, notifier = open_store(settings)
        self.audit = AuditLog(
            settings.audit_log_path,
            fail_closed=not settings.audit_buffered,
            group_window=settings.audit_group_window,
        )
        self.kek_rotation = KekRotation(
            self.store, self.keyring, rotate_after=settings.kek_rotate_after, on_rotate=self._rotated
        )
        self.secrets = SecretsService(
            self.store, self.keyring, self.audit, max_value_bytes=settings.max_value_bytes
        )
        self.requests = RequestService(
            self.store,
            self.secrets,
            notifier,
            self.audit,
            listener_grace=settings.listener_grace,
            sweep_interval=settings.sweep_interval,
        )
        self.connectors = ConnectorService(self.store, self.secrets, self.audit)
        self.oauth = OAuthService(
            self.store,
            self.secrets,
            self.requests,
            self.connectors,
            self.audit,
            server=AuthorizationServer(timeout=settings.oauth_http_timeout),
            refresh_margin=settings.oauth_refresh_margin,
        )
        self.project = ProjectService(
            self.store,
            self.secrets,
            self.audit,
            mint_token=functools.partial(
                mint_service_token,
                settings.data_dir,
                issuer=settings.token_issuer,
                audience=settings.token_audience,
            )
            if settings.dev_signing_key
            else None,
        )
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def _rotated(self, old_id: str, new_id: str) -> None:
        self.audit.record_nowait(
            "kek.rotate", room="", actor="server", outcome="ok", target=f"{old_id} -> {new_id}"
        )

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        try:
            await self.store.open()
            await check_keyring(self.store, self.keyring.envelope(), self.settings.keyring_path)
            await self.kek_rotation.start()
        except BaseException:
            await self.store.close()
            raise
        server = grpc.aio.server(options=server_options(self.settings))
        add_servicer(
            server,
            ROOM_SECRETS_SERVICE,
            RoomSecretsServicer(self.verifier, self.secrets, self.requests, self.oauth),
        )
        add_servicer(
            server,
            OAUTH_CONNECTORS_SERVICE,
            OAuthConnectorsServicer(self.verifier, self.connectors),
        )
        add_servicer(
            server,
            PROJECT_SECRETS_SERVICE,
            ProjectSecretsServicer(self.verifier, self.project),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                ROOM_SECRETS,
                OAUTH_CONNECTORS,
                PROJECT_SECRETS,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self.port = self._bind(server)
        try:
            # Events from other replicas flow before the first stream can open.
            await self.requests.start()
        except BaseException:
            await self.requests.stop()
            await self.store.close()
            raise
        await server.start()
        self._server = server
        self.audit.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(ROOM_SECRETS, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(OAUTH_CONNECTORS, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(PROJECT_SECRETS, health_pb2.HealthCheckResponse.SERVING)

    def _bind(self, server: grpc.aio.Server) -> int:
        s = self.settings
        if s.tls_cert and s.tls_key:
            credentials = grpc.ssl_server_credentials(
                [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                root_certificates=s.tls_client_ca.read_bytes() if s.tls_client_ca else None,
                require_client_auth=s.tls_client_ca is not None,
            )
            port = server.add_secure_port(s.listen, credentials)
        else:
            port = server.add_insecure_port(s.listen)
        if port == 0:
            raise OSError(f"could not bind {s.listen}")
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: report NOT_SERVING, end WatchRequests streams, let calls in flight finish."""
        await self.health.enter_graceful_shutdown()
        await self.requests.stop()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace if grace is None else grace)
            self._server = None
        try:
            await self.kek_rotation.flush()
        except Exception as error:  # the store is down; only an over-count's worth is lost
            log.warning("could not record key-encryption key use: %s", type(error).__name__)
        await self.store.close()
        await self.audit.close()


async def serve(settings: Settings, on_ready: Callable[[RoomSecretsServer], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    server = RoomSecretsServer(settings)
    await server.start()
    if on_ready:
        on_ready(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
