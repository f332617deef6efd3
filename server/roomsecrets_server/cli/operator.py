"""Operator commands: `serve` (run the server), `token` (mint a development token with the data
dir's dev signing key) and `rewrap` (move every value to the newest key-encryption key).

Settings come from flags, then environment variables (ROOMSECRETS_*), then the defaults of
roomsecrets_server.config.Settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from ..app import RoomSecretsServer, open_store, prepare_serve_process, serve
from ..auth.dev_key import DEV_KEY_FILE, mint_token
from ..config import DEFAULT_LISTEN, QUOTA_SETTINGS, Settings
from ..crypto.keyring import KeyringFile
from ..crypto.rotation import KekRotation
from ..process import protect_process
from ..secrets.rewrap import rewrap_all
from ..workers import run_workers
from .errors import EXIT_OK, EXIT_USAGE, PROG, CliError

log = logging.getLogger("roomsecrets")

_DEFAULTS = Settings(data_dir=Path())
ROLES = ("user", "agent", "tool")
PROJECT_ROLES = ("admin", "developer", "service")
# After a rotation, wait this long before moving values under the new key: a running server
# checks keyring.json at most once a second, and must know the new key before any value it
# reads is sealed under it.
KEYRING_SETTLE_SECONDS = 1.5


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"ROOMSECRETS_{name}")
    return value if value not in (None, "") else default


def env_flag(name: str) -> bool:
    return (env(name) or "").lower() in ("1", "true", "yes", "on")


def env_choice(name: str) -> bool | None:
    """A yes/no environment variable: None when unset or empty."""
    value = env(name)
    return None if value is None else value.lower() in ("1", "true", "yes", "on")


def env_list(name: str) -> list[str]:
    """A comma-separated environment variable, its entries stripped, empty ones left out."""
    return [item.strip() for item in (env(name) or "").split(",") if item.strip()]


def env_paths(name: str) -> list[Path]:
    return [Path(p) for p in (env(name) or "").split(os.pathsep) if p]


def non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def add_kek_rotate_after(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kek-rotate-after",
        type=positive_int,
        default=env("KEK_ROTATE_AFTER", str(_DEFAULTS.kek_rotate_after)),
        help="move sealing to the active key-encryption key's next generation after it wrapped "
        "this many data keys, counted across every process on the store (default %(default)s; "
        "AES-GCM allows 2^32)",
    )


QUOTA_HELP = {
    "max_secrets_per_identity": "secrets one identity may own in a room",
    "max_bytes_per_identity": "bytes of secret values one identity may own in a room",
    "max_secrets_per_room": "secrets a room may hold",
    "max_bytes_per_room": "bytes of secret values a room may hold",
    "max_pending_asked": "pending requests one identity may have asked in a room",
    "max_pending_addressed": "pending requests (each may prompt a human) addressed to one identity in a room",
    "max_watch_streams": "WatchRequests streams one identity may hold open in a room, per server process",
    "max_manifest_bytes_per_project": "bytes of the service manifests of one project, together",
}


def add_quotas(parser: argparse.ArgumentParser) -> None:
    """The quota flags (quotas.py): a write or request past one fails RESOURCE_EXHAUSTED."""
    for name in QUOTA_SETTINGS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=positive_int,
            default=env(name.upper(), str(getattr(_DEFAULTS, name))),
            metavar="N",
            help=f"quota: {QUOTA_HELP[name]} (default %(default)s)",
        )


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=env("DATA_DIR", ".data"),
        help="the server's data directory (env ROOMSECRETS_DATA_DIR; default .data)",
    )


def add_database_url(parser: argparse.ArgumentParser) -> None:
    url = parser.add_mutually_exclusive_group()
    url.add_argument(
        "--database-url",
        default=env("DATABASE_URL", ""),
        metavar="URL",
        help="a postgresql:// URL: keep everything in that PostgreSQL database, which several "
        "replicas may share (default: SQLite in the data dir). A URL holding a password: use "
        "--database-url-file or ROOMSECRETS_DATABASE_URL, since arguments are visible to other "
        "local users in `ps`",
    )
    url.add_argument(
        "--database-url-file",
        type=Path,
        default=env("DATABASE_URL_FILE"),
        metavar="PATH",
        help="read the postgresql:// URL from this file ('-': stdin; env ROOMSECRETS_DATABASE_URL_FILE)",
    )


def database_url_of(args: argparse.Namespace) -> str:
    """--database-url, or what --database-url-file holds, whitespace around it dropped (so a
    password stays out of argv)."""
    path: Path | None = args.database_url_file
    if path is None:
        return str(args.database_url)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise CliError(f"cannot read --database-url-file {path}: {reason}", EXIT_USAGE) from None
    return text.strip()


# -- serve ----------------------------------------------------------------------------------------
def add_serve(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the server",
        description="Run the roomsecrets gRPC server until SIGINT/SIGTERM, then shut down gracefully. "
        "Every flag falls back to an environment variable ROOMSECRETS_<FLAG> "
        "(e.g. ROOMSECRETS_LISTEN; lists are separated by the path separator).",
    )
    add_data_dir(p)
    add_database_url(p)
    p.add_argument(
        "--listen",
        default=env("LISTEN", DEFAULT_LISTEN),
        help=f"host:port to listen on; port 0 picks a free one (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--max-value-bytes",
        type=positive_int,
        default=env("MAX_VALUE_BYTES", str(_DEFAULTS.max_value_bytes)),
        help="largest secret value accepted (default %(default)s)",
    )
    p.add_argument(
        "--listener-grace",
        type=non_negative,
        default=env("LISTENER_GRACE", str(_DEFAULTS.listener_grace)),
        help="seconds a request waits for the asked participant to open WatchRequests, and a "
        "participant may be gone before its pending requests are cancelled (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=non_negative,
        default=env("SHUTDOWN_GRACE", str(_DEFAULTS.shutdown_grace)),
        help="seconds calls in flight get to finish on shutdown (default %(default)s)",
    )
    p.add_argument(
        "--sweep-interval",
        type=non_negative,
        default=env("SWEEP_INTERVAL", str(_DEFAULTS.sweep_interval)),
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--oauth-refresh-margin",
        type=non_negative,
        default=env("OAUTH_REFRESH_MARGIN", str(_DEFAULTS.oauth_refresh_margin)),
        help="refresh an OAuth token this many seconds before it expires (default %(default)s)",
    )
    p.add_argument(
        "--oauth-http-timeout",
        type=non_negative,
        default=env("OAUTH_HTTP_TIMEOUT", str(_DEFAULTS.oauth_http_timeout)),
        help="seconds a call to an OAuth token endpoint may take in all: resolve, connect, TLS, "
        "request and response (default %(default)s)",
    )
    p.add_argument(
        "--egress-allow",
        action="append",
        default=None,
        metavar="ENTRY",
        help="let outbound calls (OAuth token endpoints) reach a destination the egress policy "
        "refuses (loopback, private, link-local, ...): HOST or HOST:PORT (that name, whatever it "
        "resolves to), IP or IP:PORT, [IPV6]:PORT, or a CIDR (those addresses, any port); "
        "repeatable (env ROOMSECRETS_EGRESS_ALLOW, comma-separated)",
    )
    add_kek_rotate_after(p)
    add_quotas(p)
    p.add_argument(
        "--workers",
        type=positive_int,
        default=env("WORKERS", str(_DEFAULTS.workers)),
        help="server processes sharing the port (SO_REUSEPORT), to use more cores; more than 1 "
        "needs --database-url (default %(default)s)",
    )
    p.add_argument("--tls-cert", type=Path, default=env("TLS_CERT"), help="server certificate (PEM)")
    p.add_argument(
        "--tls-key",
        type=Path,
        default=env("TLS_KEY"),
        help="server private key (PEM); refused if others may read it (mode 0600, or 0640 owned by root)",
    )
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        default=env("TLS_CLIENT_CA"),
        help="CA bundle for client certificates: enables mutual TLS (certificates required)",
    )
    p.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        default=env_flag("ALLOW_INSECURE_REMOTE"),
        help="allow plaintext on a non-loopback address",
    )
    p.add_argument(
        "--jwt-public-key",
        dest="jwt_public_keys",
        type=Path,
        action="append",
        default=None,
        metavar="PEM",
        help="a PEM public key that verifies tokens (its kid is the file name without extension); repeatable",
    )
    p.add_argument(
        "--jwks",
        dest="jwks_files",
        type=Path,
        action="append",
        default=None,
        metavar="FILE",
        help="a JWKS file of token verification keys; repeatable",
    )
    p.add_argument(
        "--token-issuer",
        default=env("TOKEN_ISSUER", ""),
        metavar="ISS",
        help="accept only tokens whose iss claim is ISS (default: not checked)",
    )
    p.add_argument(
        "--token-audience",
        default=env("TOKEN_AUDIENCE", ""),
        metavar="AUD",
        help="accept only tokens whose aud claim names AUD (default: tokens naming any audience are refused)",
    )
    dev_key = p.add_mutually_exclusive_group()
    dev_key.add_argument(
        "--dev-key",
        dest="dev_key",
        action="store_const",
        const=True,
        help="accept tokens signed with the data dir's development key even beside --jwt-public-key "
        "/ --jwks (logged as a warning at every start; env ROOMSECRETS_DEV_KEY=1). Default: "
        "accepted only while no production keys are configured",
    )
    dev_key.add_argument(
        "--no-dev-key",
        dest="dev_key",
        action="store_const",
        const=False,
        help="never accept tokens signed with the development key (env ROOMSECRETS_NO_DEV_KEY=1)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=non_negative,
        default=env("HANDSHAKE_TIMEOUT", str(_DEFAULTS.handshake_timeout)),
        metavar="SECONDS",
        help="close a connection that has not completed its TLS and HTTP/2 handshake this long "
        "after it was accepted, so idle connections cannot hold every file descriptor "
        "(default %(default)s)",
    )
    p.add_argument(
        "--audit-log", type=Path, default=env("AUDIT_LOG"), help="audit log file (default DATA_DIR/audit.log)"
    )
    p.add_argument(
        "--audit-buffered",
        action="store_true",
        default=env_flag("AUDIT_BUFFERED"),
        help="buffer audit lines and write them every half second (faster; fails open: a call "
        "succeeds even if its line cannot be written). Default: fail closed",
    )
    p.add_argument(
        "--audit-group-window",
        type=non_negative,
        default=env("AUDIT_GROUP_WINDOW", str(_DEFAULTS.audit_group_window)),
        help="fail closed: seconds a batch of audit lines may wait for the calls arriving with it; "
        "it waits only while calls arrive together (default %(default)s; 0: no wait)",
    )
    p.add_argument(
        "--write-group-window",
        type=non_negative,
        default=env("WRITE_GROUP_WINDOW", str(_DEFAULTS.write_group_window)),
        help="SQLite: seconds a batch of writes may wait for the writes arriving with it before "
        "their one commit; it waits only while writes arrive together (default %(default)s; 0: no "
        "wait)",
    )
    p.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level of the stderr log (default %(default)s)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    # ROOMSECRETS_NO_DEV_KEY wins over ROOMSECRETS_DEV_KEY; unset: decided by Settings.dev_key_on.
    p.set_defaults(run=run_serve, dev_key=False if env_flag("NO_DEV_KEY") else env_choice("DEV_KEY"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        data_dir=args.data_dir,
        listen=args.listen,
        max_value_bytes=args.max_value_bytes,
        listener_grace=args.listener_grace,
        shutdown_grace=args.shutdown_grace,
        sweep_interval=args.sweep_interval,
        oauth_refresh_margin=args.oauth_refresh_margin,
        oauth_http_timeout=args.oauth_http_timeout,
        egress_allow=tuple(args.egress_allow or env_list("EGRESS_ALLOW")),
        jwt_public_keys=tuple(args.jwt_public_keys or env_paths("JWT_PUBLIC_KEY")),
        jwks_files=tuple(args.jwks_files or env_paths("JWKS")),
        token_issuer=args.token_issuer,
        token_audience=args.token_audience,
        dev_signing_key=args.dev_key,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        allow_insecure_remote=args.allow_insecure_remote,
        audit_log=args.audit_log,
        database_url=database_url_of(args),
        audit_buffered=args.audit_buffered,
        audit_group_window=args.audit_group_window,
        write_group_window=args.write_group_window,
        workers=args.workers,
        kek_rotate_after=args.kek_rotate_after,
        handshake_timeout=args.handshake_timeout,
        **{name: getattr(args, name) for name in QUOTA_SETTINGS},
    )


def ready_line(server: RoomSecretsServer) -> str:
    s = server.settings
    transport = "mutual TLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext"
    line = f"{PROG}: serving on {server.address} ({transport}, data dir {s.data_dir})"
    if s.dev_key_on:
        line += f"; mint a token: {PROG} token --data-dir {s.data_dir} --identity NAME --room ROOM"
    else:
        line += "; tokens must be signed by the configured public keys"
    return line


def event_loop_runner(no_uvloop: bool) -> Callable[[Coroutine[Any, Any, None]], None]:
    if not no_uvloop:
        try:
            import uvloop  # noqa: PLC0415 - optional; absent on Windows

            return uvloop.run
        except ImportError:
            pass
    return asyncio.run


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = settings_from_args(args)
    try:
        settings.check()
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca, *settings.jwt_public_keys):
        if path is not None and not path.is_file():
            raise CliError(f"no such file: {path}", EXIT_USAGE)
    try:
        prepare_serve_process(settings)  # before the workers fork: they inherit it
    except OSError as error:
        raise CliError(f"cannot start the server: {error}") from None

    if settings.workers > 1:
        # Fork before anything of gRPC or asyncio exists (workers.py).
        def serve_worker(worker_settings: Settings, ready: Callable[[], None]) -> None:
            event_loop_runner(args.no_uvloop)(serve(worker_settings, lambda _: ready()))

        return run_workers(settings, serve_worker)

    def on_ready(server: RoomSecretsServer) -> None:
        print(ready_line(server), file=sys.stderr, flush=True)

    try:
        event_loop_runner(args.no_uvloop)(serve(settings, on_ready))
    except (OSError, RuntimeError) as error:  # e.g. the port is taken, a key file is unreadable
        raise CliError(f"cannot start the server: {error}") from None
    return EXIT_OK


# -- token ----------------------------------------------------------------------------------------
def add_token(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "token",
        help="mint a development token",
        description="Print a participant JWT signed with the development key in the data dir "
        "(created if absent). For development and grpcurl.",
    )
    add_data_dir(p)
    p.add_argument("--identity", required=True, help="the participant identity (the token's `name`)")
    p.add_argument(
        "--room", default=env("ROOM"), required=env("ROOM") is None, help="the room (env ROOMSECRETS_ROOM)"
    )
    p.add_argument(
        "--grant",
        action="append",
        choices=["secrets", "admin"],
        default=None,
        help="an API grant to include; repeatable (`secrets` is included unless --no-secrets)",
    )
    p.add_argument("--admin", action="store_true", help="include the room admin grant (as --grant admin)")
    p.add_argument("--no-secrets", action="store_true", help="leave out the `secrets` API grant")
    p.add_argument("--role", choices=ROLES, default="user", help="participant role (default user)")
    p.add_argument(
        "--project", default="dev-project", help="project id, the token's `sub` (default dev-project)"
    )
    p.add_argument("--ttl", type=positive_int, default=3600, help="lifetime in seconds (default 3600)")
    p.add_argument(
        "--project-role",
        choices=PROJECT_ROLES,
        help="role in the project: admin (manages project secrets), developer (applies manifests, "
        "reads no values) or service (with --service: resolves that service's secrets)",
    )
    p.add_argument("--service", help="with --project-role service: the service this token is")
    p.add_argument(
        "--issuer",
        default=env("TOKEN_ISSUER", ""),
        help="the iss claim (for a server run with --token-issuer)",
    )
    p.add_argument(
        "--audience",
        default=env("TOKEN_AUDIENCE", ""),
        help="the aud claim (for a server run with --token-audience)",
    )
    p.add_argument(
        "--allow-oauth",
        nargs=2,
        action="append",
        metavar=("ENDPOINT", "CLIENT_ID"),
        help="limit OAuth requests to this authorization endpoint (a trailing * matches a prefix) "
        "and client id, with a token endpoint on the authorization endpoint's origin "
        "(scheme://host:port); repeatable (absent, and no --allow-oauth-token-endpoint: any)",
    )
    p.add_argument(
        "--allow-oauth-token-endpoint",
        nargs=3,
        action="append",
        metavar=("ENDPOINT", "CLIENT_ID", "TOKEN_ENDPOINT"),
        help="as --allow-oauth, naming the token endpoint allowed with it (a trailing * matches "
        "a prefix), on any origin; repeatable",
    )
    p.set_defaults(run=run_token)


def run_token(args: argparse.Namespace) -> int:
    grants = set(args.grant or ())
    if args.no_secrets and "secrets" in grants:
        raise CliError("--no-secrets contradicts --grant secrets", EXIT_USAGE)
    protect_process()  # it may create the data dir and the key; it holds the key
    data_dir: Path = args.data_dir
    if not (data_dir / DEV_KEY_FILE).exists():
        print(
            f"{PROG}: note: created a new development signing key in {data_dir}; only a server "
            "using this data dir accepts the token",
            file=sys.stderr,
        )
    if (args.project_role == "service") != bool(args.service):
        raise CliError("--service goes with --project-role service (and it needs one)", EXIT_USAGE)
    oauth: list[dict[str, str]] | None = None
    if args.allow_oauth or args.allow_oauth_token_endpoint:
        oauth = [{"endpoint": e, "client_id": c} for e, c in args.allow_oauth or ()]
        oauth += [
            {"endpoint": e, "client_id": c, "token_endpoint": t}
            for e, c, t in args.allow_oauth_token_endpoint or ()
        ]
    token = mint_token(
        data_dir,
        identity=args.identity,
        room=args.room,
        project=args.project,
        role=args.role,
        secrets_grant=not args.no_secrets,
        admin=args.admin or "admin" in grants,
        ttl=args.ttl,
        request_oauth_token=oauth,
        project_role=args.project_role or "",
        service=args.service or "",
        issuer=args.issuer,
        audience=args.audience,
    )
    print(token)
    return EXIT_OK


# -- rewrap ---------------------------------------------------------------------------------------
def add_rewrap(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "rewrap",
        help="re-wrap every value under the newest key-encryption key (online)",
        description="Re-wrap every stored data key under the newest key-encryption key; with "
        "--rotate, first add a new key and make it active. Safe while the server runs (it reloads "
        "keyring.json within a second). Values are never decrypted; no key material is printed.",
    )
    add_data_dir(p)
    add_database_url(p)
    add_kek_rotate_after(p)
    p.add_argument("--rotate", action="store_true", help="add a new key-encryption key first")
    p.add_argument(
        "--retire",
        action="store_true",
        help="afterwards, remove from keyring.json every older key no stored value uses any more",
    )
    p.add_argument(
        "--settle",
        type=non_negative,
        default=KEYRING_SETTLE_SECONDS,
        help="after --rotate, seconds to wait so running servers load the new key before values "
        "move under it (default %(default)s)",
    )
    p.set_defaults(run=run_rewrap)


def run_rewrap(args: argparse.Namespace) -> int:
    protect_process()  # it may create files (the keyring, SQLite's WAL); it holds every key
    settings = Settings(
        data_dir=args.data_dir, database_url=database_url_of(args), kek_rotate_after=args.kek_rotate_after
    )
    try:
        settings.check()
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    if not settings.keyring_path.is_file():
        raise CliError(f"no keyring at {settings.keyring_path} (is --data-dir right?)")
    if not settings.database_url and not settings.database_path.is_file():
        raise CliError(f"no database at {settings.database_path} (is --data-dir right?)")
    keyring = KeyringFile(settings.keyring_path)
    try:
        keyring.envelope()
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"cannot read the keyring: {error}") from None
    if args.rotate:
        new_id = keyring.rotate()
        print(f"rotated: key-encryption key {new_id} is now active ({key_count(keyring)} keys)")
        time.sleep(args.settle)
    moved = asyncio.run(_rewrap(settings, keyring))
    active = keyring.envelope().active_kek_id
    print(f"re-wrapped {moved} values under key-encryption key {active}")
    if args.retire:
        retired = asyncio.run(_retire(settings, keyring, settle=args.settle))
        print(f"retired {len(retired)} key-encryption keys: {', '.join(retired) or 'none'}")
    return EXIT_OK


async def _retire(settings: Settings, keyring: KeyringFile, *, settle: float) -> list[str]:
    """Drop the keys no value uses. A server that has not yet reloaded the keyring could still
    seal one value under an old key: look again after the settle time and put back any key that
    reappeared, so no value is ever left without its key."""
    store, _ = open_store(settings)
    try:
        await store.open()
    except OSError as error:
        await store.close()
        raise CliError(str(error)) from None
    try:
        entries = keyring.entries()
        retired = keyring.retire(set(await store.kek_samples()))
        await asyncio.sleep(settle)
        back = set(await store.kek_samples()) & set(retired)
        if back:
            keyring.restore([e for e in entries if e["id"] in back])
            raise CliError(f"values appeared under {', '.join(sorted(back))} meanwhile; kept them, run again")
        return retired
    finally:
        await store.close()


def key_count(keyring: KeyringFile) -> int:
    return len(json.loads(keyring.path.read_text())["keys"])


async def _rewrap(settings: Settings, keyring: KeyringFile) -> int:
    store, _ = open_store(settings)
    try:
        await store.open()
    except OSError as error:
        await store.close()
        raise CliError(str(error)) from None
    # The re-wraps count against the key's nonce budget like a server's seals.
    rotation = KekRotation(store, keyring, rotate_after=settings.kek_rotate_after)
    try:
        await rotation.start()
        moved = await rewrap_all(store, keyring)
        await rotation.flush()
        return moved
    except TimeoutError as error:
        raise CliError(f"rewrap did not finish: {error}") from None
    finally:
        await store.close()
