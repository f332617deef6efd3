"""Server settings: command-line flags over environment variables (ROOMSECRETS_*) over defaults."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from .egress import parse_allow_list

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
# Room for the value plus its envelope (ids, names, metadata) in one message.
MESSAGE_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    listen: str = DEFAULT_LISTEN
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    # How long a request waits for the asked participant to open a WatchRequests stream, and
    # how long a participant may be gone before its pending requests are cancelled.
    listener_grace: float = 3.0
    shutdown_grace: float = 5.0
    sweep_interval: float = 1.0
    # Extra token verification keys: PEM public key files (kid = file stem) and JWKS files.
    jwt_public_keys: tuple[Path, ...] = ()
    jwks_files: tuple[Path, ...] = ()
    # Set: tokens must carry this issuer (`iss`) / name this audience in `aud`; the dev key mints
    # them so. Empty: not checked, and a token that names any audience is refused.
    token_issuer: str = ""
    token_audience: str = ""
    # Accept tokens signed with the dev key in the data dir. None: only while no production keys
    # (jwt_public_keys, jwks_files) are configured; see dev_key_on, the one place that decides.
    dev_signing_key: bool | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, client certificates required
    allow_insecure_remote: bool = False  # plaintext on a non-loopback address
    audit_log: Path | None = field(default=None)
    # False (the default): the audit log fails closed — a call whose line cannot be written fails.
    # True: lines are buffered and written every half second (see audit.py for the trade).
    audit_buffered: bool = False
    # Fail closed: a batch of audit lines waits at most this long for the calls arriving with it
    # (adaptive group commit, see audit.py); 0 writes each event-loop iteration's lines at its end.
    audit_group_window: float = 0.002
    # SQLite: a batch of writes waits at most this long for the writes arriving with it, and then
    # commits once for all (the same adaptive window, see batching.py); 0 commits each event-loop
    # iteration's writes at its end. Every write is still on disk before its call returns.
    write_group_window: float = 0.01
    # Offline OAuth tokens are refreshed when they expire within this many seconds (at most half
    # their lifetime); an outbound call (resolve, connect, TLS, request and response together)
    # gives up after oauth_http_timeout seconds.
    oauth_refresh_margin: float = 60.0
    oauth_http_timeout: float = 10.0
    # Destinations the egress policy refuses (loopback, private, link-local, ...; egress.py) that
    # outbound calls may reach anyway: HOST, HOST:PORT, IP, IP:PORT, [IPV6]:PORT or CIDR entries.
    egress_allow: tuple[str, ...] = ()
    # Empty: the embedded SQLite database in data_dir. A postgresql:// URL: the shared PostgreSQL
    # store, which any number of replicas (same keyring and token keys) may use at once.
    database_url: str = ""
    # Seal under the active key-encryption key's next generation once it has wrapped this many
    # data keys (AES-GCM with random nonces allows 2^32; see crypto/rotation.py).
    kek_rotate_after: int = 2**30
    # Server processes sharing the listen port (SO_REUSEPORT); more than one needs PostgreSQL.
    workers: int = 1
    # A connection that has not completed its handshake (TLS, and the client's HTTP/2 preface and
    # SETTINGS) this many seconds after it was accepted is closed, so connections that never send
    # a byte cannot hold the server's file descriptors.
    handshake_timeout: float = 10.0
    # Quotas (quotas.py): per identity and per room, in participant rooms. Streams: per process.
    max_secrets_per_identity: int = 10_000
    max_bytes_per_identity: int = 64 * 2**20
    max_secrets_per_room: int = 100_000
    max_bytes_per_room: int = 2**30
    max_pending_asked: int = 32
    max_pending_addressed: int = 64
    max_watch_streams: int = 16
    # Project records: the manifests of one project together (every ListServices reply carries
    # them all, within one message), so one developer cannot make them grow without bound.
    max_manifest_bytes_per_project: int = 768 * 2**10

    @property
    def production_keys(self) -> bool:
        return bool(self.jwt_public_keys or self.jwks_files)

    @property
    def dev_key_on(self) -> bool:
        """Whether tokens signed with the data dir's dev key are accepted (and manifests mint
        `token:` entries with it): as set, else only while no production keys are configured,
        since a dev key beside them is a second way to mint any token."""
        return self.dev_signing_key if self.dev_signing_key is not None else not self.production_keys

    @property
    def max_message_bytes(self) -> int:
        return self.max_value_bytes + MESSAGE_OVERHEAD_BYTES

    @property
    def keyring_path(self) -> Path:
        return self.data_dir / "keyring.json"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "roomsecrets.db"

    @property
    def audit_log_path(self) -> Path:
        return self.audit_log or self.data_dir / "audit.log"

    def check(self) -> None:
        if self.max_value_bytes <= 0:
            raise ValueError("max_value_bytes must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("mutual TLS (client CA) needs a server certificate and key")
        if not self.tls_cert and not self.allow_insecure_remote and not is_loopback(self.listen):
            raise ValueError(
                f"refusing plaintext on non-loopback address {self.listen}: configure TLS "
                "or pass --allow-insecure-remote"
            )
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.workers > 1 and not self.database_url:
            raise ValueError(
                "--workers needs the shared PostgreSQL store (--database-url): the embedded SQLite "
                "store serves one process, whose request streams the others could not reach"
            )
        if not 0 <= self.audit_group_window <= 1:
            raise ValueError("audit_group_window must be between 0 and 1 second")
        if not 0 <= self.write_group_window <= 1:
            raise ValueError("write_group_window must be between 0 and 1 second")
        if not 0 < self.kek_rotate_after <= 2**31:
            raise ValueError("kek_rotate_after must be between 1 and 2^31")
        parse_allow_list(self.egress_allow)  # ValueError naming the entry
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be a postgresql:// URL (or empty for SQLite)")
        if not self.dev_key_on and not self.production_keys:
            raise ValueError("no token verification keys: enable the dev key or configure public keys")
        if not 0 < self.handshake_timeout <= 3600:
            raise ValueError("handshake_timeout must be more than 0 and at most 3600 seconds")
        for name in QUOTA_SETTINGS:
            if not 0 < getattr(self, name) < 2**62:
                raise ValueError(f"{name} must be a positive integer below 2^62")


QUOTA_SETTINGS = (
    "max_secrets_per_identity",
    "max_bytes_per_identity",
    "max_secrets_per_room",
    "max_bytes_per_room",
    "max_pending_asked",
    "max_pending_addressed",
    "max_watch_streams",
    "max_manifest_bytes_per_project",
)


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_data_dir() -> Path:
    return Path(os.environ.get("ROOMSECRETS_DATA_DIR", ".data"))
