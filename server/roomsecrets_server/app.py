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
from .auth.dev_key import DEV_KEY_FILE, ensure_dev_key, mint_service_token
from .auth.tokens import TokenVerifier, VerificationKey, hs256_key, keys_from_jwks, public_key_from_pem
from .config import Settings
from .crypto.keyring import KeyringFile
from .crypto.rotation import KekRotation
from .crypto.startup_check import check_keyring
from .egress import EgressPolicy
from .files import PRIVATE_DIR_MODE, PRIVATE_MODE, read_private, tighten
from .oauth.connectors import ConnectorService
from .oauth.provider import AuthorizationServer
from .oauth.service import OAuthService
from .process import protect_process, raise_open_files_limit
from .project.service import ProjectService
from .quotas import Quotas
from .requests.notifier import LocalNotifier, Notifier
from .requests.pg_notifier import PgNotifier
from .requests.service import RequestService
from .rpc.gate import Gate
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
    if settings.dev_key_on:
        keys.append(hs256_key(*ensure_dev_key(settings.data_dir)))
        if settings.production_keys:
            log.warning(
                "the development signing key %s is accepted beside the production verification keys "
                "(--dev-key): whoever can read it mints any token",
                settings.data_dir / DEV_KEY_FILE,
            )
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
        # Closes a connection that has not sent its HTTP/2 preface and SETTINGS (after TLS) in
        # time; grpc core's default, 2 minutes, lets idle connections hold every descriptor.
        ("grpc.server_handshake_timeout_ms", max(1, round(settings.handshake_timeout * 1000))),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials, if configured; the private key is refused if others may read it."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    return grpc.ssl_server_credentials(
        [
            (
                read_private(settings.tls_key, "the TLS private key", group_readable_if_root_owned=True),
                settings.tls_cert.read_bytes(),
            )
        ],
        root_certificates=settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None,
        require_client_auth=settings.tls_client_ca is not None,
    )


def prepare_serve_process(settings: Settings) -> None:
    """What `roomsecrets serve` does to its own process before serving (in the parent of
    `--workers`, whose workers inherit it): files it creates private (umask 077), no core dumps,
    not dumpable, the open-files soft limit at the hard limit, and an older data dir's files
    that others could read made private. Never in RoomSecretsServer: the test suite runs servers
    in-process and keeps its own process state."""
    protect_process()
    raise_open_files_limit()
    tighten_data_files(settings)


def tighten_data_files(settings: Settings) -> None:
    """The data dir 0700; the SQLite database, its WAL and shared memory, and the audit log 0600.
    An older version left them readable by others (SQLite gives the WAL and SHM the database's
    mode, whatever the umask): fixed with a warning rather than refused, since they hold
    metadata (identities, names, URLs), not keys."""
    tighten(settings.data_dir, PRIVATE_DIR_MODE)
    if not settings.database_url:
        db = settings.database_path
        for path in (db, db.with_name(f"{db.name}-wal"), db.with_name(f"{db.name}-shm")):
            tighten(path, PRIVATE_MODE)
    tighten(settings.audit_log_path, PRIVATE_MODE)


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
        self._credentials = server_credentials(settings)  # likewise the TLS key
        self.verifier = TokenVerifier(
            verification_keys(settings), issuer=settings.token_issuer, audience=settings.token_audience
        )
        self.store, notifier = open_store(settings)
        # Held by the store on every write (open) and by the request streams.
        self.quotas = Quotas(settings)
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
            quotas=self.quotas,
        )
        # Every outbound HTTP call goes through this one policy (egress.py).
        authorization_server = AuthorizationServer(
            EgressPolicy(settings.egress_allow, timeout=settings.oauth_http_timeout)
        )
        self.connectors = ConnectorService(self.store, self.secrets, self.audit, server=authorization_server)
        self.oauth = OAuthService(
            self.store,
            self.secrets,
            self.requests,
            self.connectors,
            self.audit,
            server=authorization_server,
            refresh_margin=settings.oauth_refresh_margin,
        )
        self.project = ProjectService(
            self.store,
            self.secrets,
            self.audit,
            self.quotas,
            mint_token=functools.partial(
                mint_service_token,
                settings.data_dir,
                issuer=settings.token_issuer,
                audience=settings.token_audience,
            )
            if settings.dev_key_on
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
            await self.store.open(self.quotas.caps)
            await check_keyring(self.store, self.keyring.envelope(), self.settings.keyring_path)
            await self.kek_rotation.start()
        except BaseException:
            await self.store.close()
            raise
        server = grpc.aio.server(options=server_options(self.settings))
        gate = Gate(self.verifier, self.audit)
        add_servicer(
            server,
            ROOM_SECRETS_SERVICE,
            RoomSecretsServicer(gate, self.secrets, self.requests, self.oauth),
        )
        add_servicer(
            server,
            OAUTH_CONNECTORS_SERVICE,
            OAuthConnectorsServicer(gate, self.connectors),
        )
        add_servicer(
            server,
            PROJECT_SECRETS_SERVICE,
            ProjectSecretsServicer(gate, self.project),
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
        if self._credentials is not None:
            port = server.add_secure_port(s.listen, self._credentials)
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
    # Before the ready line: a SIGTERM sent as soon as it appears must stop gracefully.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready:
        on_ready(server)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
