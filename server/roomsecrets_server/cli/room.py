"""The room Secrets API commands, through the Python client (roomsecrets.client).

Only `get` and `request` ever print a secret value (raw bytes, to stdout or --out); `set`,
`provide`, `list` and `watch` print metadata only, and no error message carries a value.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from roomsecrets.client import DEFAULT_ADDRESS, SecretsClient
from roomsecrets.errors import SecretsError
from roomsecrets.types import (
    OAuthTokenRequest,
    RequestClosed,
    RequestEvent,
    SecretInfo,
    SecretRequest,
    WatchReady,
)

from .errors import EXIT_OK, EXIT_USAGE, PROG, CliError, rpc_exit_code

DEFAULT_TYPE = "application/octet-stream"


# -- common options -------------------------------------------------------------------------------
def connection_options() -> argparse.ArgumentParser:
    """The options every room command takes (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--address",
        default=os.environ.get("ROOMSECRETS_ADDRESS") or DEFAULT_ADDRESS,
        help=f"server host:port (env ROOMSECRETS_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    g.add_argument(
        "--token",
        default=os.environ.get("ROOMSECRETS_TOKEN") or None,
        help="participant JWT (visible to other local users in `ps`: use ROOMSECRETS_TOKEN or --token-file)",
    )
    g.add_argument("--token-file", type=Path, help="read the token from this file")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    g.add_argument("--tls-ca", type=Path, help="use TLS, trusting this CA bundle (PEM)")
    g.add_argument("--client-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    g.add_argument("--client-key", type=Path, help="client private key for mutual TLS (PEM)")
    return p


def add_source(parser: argparse.ArgumentParser, what: str) -> None:
    """Exactly one of --in / --text / --base64: where the value comes from. --text and --base64
    put the value in argv, which every local user can read (`ps`, /proc/PID/cmdline): kept for
    throwaway values, and said so in --help."""
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--in", "-i", dest="in_path", metavar="PATH", help=f"read the {what} from a file ('-': stdin)"
    )
    visible = "visible to other local users in `ps`: use --in for real secrets"
    g.add_argument("--text", help=f"the {what} as UTF-8 text ({visible})")
    g.add_argument("--base64", dest="b64", metavar="B64", help=f"the {what}, base64-encoded ({visible})")


def add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        "-o",
        default="-",
        metavar="PATH",
        help="write the value to this file (created with mode 0600); '-' (default): stdout",
    )


def read_source(args: argparse.Namespace) -> bytes:
    if args.in_path is not None:
        if args.in_path == "-":
            return sys.stdin.buffer.read()
        try:
            return Path(args.in_path).read_bytes()
        except OSError as error:
            raise CliError(f"cannot read {args.in_path}: {error.strerror or error}") from None
    if args.text is not None:
        return str(args.text).encode()
    try:
        return base64.b64decode(args.b64, validate=True)
    except (binascii.Error, ValueError):
        raise CliError("--base64: not valid base64", EXIT_USAGE) from None


def write_out(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror or error}") from None


def _read_file(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {what} {path}: {error.strerror or error}", EXIT_USAGE) from None


def token_of(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        token = (_read_file(args.token_file, "--token-file") or b"").decode().strip()
    else:
        token = args.token or ""
    if not token:
        raise CliError(
            f"no token: pass --token or --token-file, or set ROOMSECRETS_TOKEN "
            f"(mint one with `{PROG} token --identity NAME --room ROOM`)",
            EXIT_USAGE,
        )
    return token


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The connection options (address, token, TLS) as client constructor arguments."""
    if bool(args.client_cert) != bool(args.client_key):
        raise CliError("mutual TLS needs both --client-cert and --client-key", EXIT_USAGE)
    return {
        "address": args.address,
        "token": token_of(args),
        "tls": bool(args.tls),
        "root_certificates": _read_file(args.tls_ca, "--tls-ca"),
        "certificate_chain": _read_file(args.client_cert, "--client-cert"),
        "private_key": _read_file(args.client_key, "--client-key"),
    }


@contextmanager
def connect(args: argparse.Namespace) -> Iterator[SecretsClient]:
    client = SecretsClient(**client_options(args))
    try:
        yield client
    finally:
        client.close()


def fail(error: SecretsError) -> CliError:
    return CliError(str(error), rpc_exit_code(error.code))


# -- JSON shapes (metadata only) ------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


# Left out of the CLI's output: a CRC32C of a short secret (a PIN, a short password) would let
# anyone who sees the output guess the value offline.
_HIDDEN_INFO_FIELDS = frozenset({"data_crc32c"})


def info_json(info: SecretInfo) -> dict[str, Any]:
    return {k: jsonable(v) for k, v in asdict(info).items() if k not in _HIDDEN_INFO_FIELDS}


def event_json(event: RequestEvent) -> dict[str, Any]:
    if isinstance(event, WatchReady):
        return {"event": "ready", "pending": event.pending}
    if isinstance(event, RequestClosed):
        return {
            "event": "request_closed",
            "request_id": event.request_id,
            "state": event.state.value,
            "reason": event.reason,
        }
    kind = "secret_request" if isinstance(event, SecretRequest) else "oauth_request"
    body = {k: jsonable(v) for k, v in asdict(event).items()}
    if isinstance(event, OAuthTokenRequest):
        body["scopes"] = list(event.scopes)
    return {"event": kind, **body}


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


# -- commands -------------------------------------------------------------------------------------
def run_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            secrets = client.list_secrets()
        except SecretsError as error:
            raise fail(error) from None
    print_json([info_json(s) for s in secrets])
    return EXIT_OK


def run_exists(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            found = client.exists(args.id, delegated_to=args.delegated_to, for_identity=args.for_identity)
        except SecretsError as error:
            raise fail(error) from None
    print("true" if found else "false")
    return EXIT_OK


def run_set(args: argparse.Namespace) -> int:
    if not args.id and not args.name:
        raise CliError("set needs --id, or --name (with --type) to address the secret", EXIT_USAGE)
    data = read_source(args)
    with connect(args) as client:
        try:
            info = client.set_secret(
                args.id,
                type=args.type,
                name=args.name,
                data=data,
                delegated_to=args.delegated_to,
                for_identity=args.for_identity,
                etag=args.etag,
            )
        except SecretsError as error:
            raise fail(error) from None
    print_json(info_json(info))
    return EXIT_OK


def run_get(args: argparse.Namespace) -> int:
    if not args.id and not args.name:
        raise CliError("get needs --id, or --name (with --type)", EXIT_USAGE)
    with connect(args) as client:
        try:
            content = client.get_secret(
                args.id,
                type=args.type,
                name=args.name,
                delegated_to=args.delegated_to,
                delegated_by=args.delegated_by,
            )
        except SecretsError as error:
            raise fail(error) from None
    if content is None:
        raise CliError(
            f"{grpc.StatusCode.NOT_FOUND.name}: secret {args.id or args.name!r} not found",
            rpc_exit_code(grpc.StatusCode.NOT_FOUND),
        )
    write_out(args.out, content.data)
    if args.out != "-":
        print(
            f"{PROG}: wrote {len(content.data)} bytes ({content.mime_type}) to {args.out}",
            file=sys.stderr,
        )
    return EXIT_OK


def run_delete(args: argparse.Namespace) -> int:
    secret_id = args.id or args.secret_id
    if not secret_id:
        raise CliError("delete needs a secret id (ID or --id)", EXIT_USAGE)
    if args.id and args.secret_id and args.id != args.secret_id:
        raise CliError("give the secret id once (ID or --id)", EXIT_USAGE)
    with connect(args) as client:
        try:
            client.delete_secret(secret_id, delegated_to=args.delegated_to, etag=args.etag)
        except SecretsError as error:
            raise fail(error) from None
    return EXIT_OK


def run_delete_requested(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            client.delete_requested_secret(args.url, args.type, delegated_to=args.delegated_to)
        except SecretsError as error:
            raise fail(error) from None
    return EXIT_OK


def run_request(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            data = client.request_secret(
                args.from_participant_id,
                args.url,
                type=args.type,
                timeout=args.timeout,
                delegate_to=args.delegate_to,
            )
        except SecretsError as error:
            raise fail(error) from None
    write_out(args.out, data)
    return EXIT_OK


def run_provide(args: argparse.Namespace) -> int:
    data = read_source(args)
    with connect(args) as client:
        try:
            client.provide_secret(args.request_id, data)
        except SecretsError as error:
            raise fail(error) from None
    return EXIT_OK


def run_reject(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            client.reject_secret(args.request_id, args.error)
        except SecretsError as error:
            raise fail(error) from None
    return EXIT_OK


def run_watch(args: argparse.Namespace) -> int:
    """One JSON line per event until SIGINT/SIGTERM (exit 0), or after --count requests."""
    with connect(args) as client:
        stream = client.watch_requests()

        stopped = False

        def stop(_signum: int, _frame: FrameType | None) -> None:
            nonlocal stopped
            stopped = True
            stream.cancel()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        seen = 0
        try:
            for event in stream:
                print(json.dumps(event_json(event)), flush=True)
                if isinstance(event, SecretRequest | OAuthTokenRequest):
                    seen += 1
                    if args.count and seen >= args.count:
                        stopped = True
                        break
        except SecretsError as error:
            raise fail(error) from None
        finally:
            stream.cancel()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if not stopped:  # the server ended the stream (e.g. it is shutting down)
        code = grpc.StatusCode.UNAVAILABLE
        raise CliError(f"{code.name}: the server closed the request stream", rpc_exit_code(code))
    return EXIT_OK


# -- the parsers ----------------------------------------------------------------------------------
def add_room_commands(subparsers: Any) -> None:
    conn = connection_options()

    def command(name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, parents=[conn], help=help_text, description=description or help_text
        )
        return parser

    p = command("list", "list your secrets and those delegated to you, as JSON (never values)")
    p.set_defaults(run=run_list)

    p = command("exists", "print true or false: whether a secret exists (without reading it)")
    p.add_argument("--id", required=True, help="secret id")
    p.add_argument("--delegated-to", help="the delegate of a delegated secret")
    p.add_argument("--for-identity", help="look among another identity's secrets (room admin)")
    p.set_defaults(run=run_exists)

    p = command(
        "set",
        "create or replace a secret; prints its metadata as JSON (never the value)",
        "Create or replace a secret, addressed by --id, or by --type and --name (the server then "
        "assigns an id). Exactly one of --in, --text, --base64 gives the value.",
    )
    p.add_argument("--id", help="secret id")
    p.add_argument(
        "--type", help=f"MIME type or kind, e.g. text/plain or git (default on create: {DEFAULT_TYPE})"
    )
    p.add_argument("--name", help="secret name")
    p.add_argument("--delegated-to", help="identity allowed to use the secret on your behalf")
    p.add_argument("--for-identity", help="store it for another identity (room admin)")
    p.add_argument("--etag", help="check-and-set: write only if the secret is still at this etag")
    add_source(p, "value")
    p.set_defaults(run=run_set)

    p = command(
        "get",
        "print a secret's value (raw bytes) to stdout or --out",
        "Fetch a secret by --id, or by --type and --name, and write its raw bytes to stdout or "
        "--out. A missing secret is an error (NOT_FOUND).",
    )
    p.add_argument("--id", help="secret id")
    p.add_argument("--type", help="type, with --name")
    p.add_argument("--name", help="name (instead of --id)")
    p.add_argument("--delegated-to", help="the delegate of a delegated secret you own")
    p.add_argument("--delegated-by", help="read a secret this identity delegated to you")
    add_out(p)
    p.set_defaults(run=run_get)

    p = command("delete", "delete a secret")
    p.add_argument("secret_id", nargs="?", metavar="ID", help="secret id (or --id)")
    p.add_argument("--id", help="secret id")
    p.add_argument("--delegated-to", help="the delegate of a delegated secret")
    p.add_argument("--etag", help="check-and-set: delete only if the secret is still at this etag")
    p.set_defaults(run=run_delete)

    p = command(
        "delete-requested",
        "delete a secret obtained through a request, by (url, type), to force a new prompt",
    )
    p.add_argument("--url", required=True)
    p.add_argument("--type", default=DEFAULT_TYPE, help="default %(default)s")
    p.add_argument("--delegated-to", help="the identity it was delegated to")
    p.set_defaults(run=run_delete_requested)

    p = command(
        "request",
        "ask another participant for a secret; prints the value it provides",
        "Ask another participant for a secret and wait until it is provided (the raw bytes go to "
        "stdout or --out), rejected, or timed out. Ctrl-C cancels the request.",
    )
    p.add_argument("--from-participant-id", required=True, help="identity of the participant asked")
    p.add_argument("--url", required=True, help="what is wanted, e.g. a repository URL")
    p.add_argument("--type", default=DEFAULT_TYPE, help="default %(default)s")
    p.add_argument("--timeout", type=int, default=300, help="seconds to wait (default %(default)s)")
    p.add_argument("--delegate-to", help="identity the provided secret is delegated to (usually you)")
    add_out(p)
    p.set_defaults(run=run_request)

    p = command("provide", "answer an inbound request with a value (prints nothing)")
    p.add_argument("--request-id", required=True)
    add_source(p, "value")
    p.set_defaults(run=run_provide)

    p = command("reject", "refuse an inbound request")
    p.add_argument("--request-id", required=True)
    p.add_argument("--error", required=True, help="the reason, passed to the requester")
    p.set_defaults(run=run_reject)

    p = command(
        "watch",
        "print inbound requests, one JSON line per event (metadata only)",
        "Print the requests addressed to you as JSON lines: first those still pending, then "
        '{"event": "ready"}, then new requests and their outcomes. Runs until SIGINT/SIGTERM.',
    )
    p.add_argument("--count", type=int, default=0, help="exit after this many requests (0: never)")
    p.set_defaults(run=run_watch)
