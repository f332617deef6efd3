"""`roomsecrets oauth ...`: OAuth tokens that another participant authorizes, and the room's
connectors (OAuth client registrations kept on the server), through the Python client.

Only `oauth request` and `oauth token` print a secret (the access token, one line on stdout).
Client secrets are read from a file or stdin, never from an argument (the process list shows
arguments to other local users), and no output or error message carries one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from roomsecrets.errors import SecretsError
from roomsecrets.types import ConnectorInfo, ConnectorRef, OAuthClientConfig

from .errors import EXIT_LOCAL, EXIT_OK, EXIT_USAGE, PROG, CliError, exit_codes_epilog, rpc_exit_code
from .room import connect, connection_options, fail, jsonable, print_json

# "No token" (`oauth token` with nothing usable stored, `oauth request` answered without one)
# exits with NOT_FOUND's code, as `get` of a missing secret does.
EXIT_NO_TOKEN = rpc_exit_code(grpc.StatusCode.NOT_FOUND)
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
NO_STORED_TOKEN = "no usable token stored (none yet, or it needs re-authorization)"  # noqa: S105 - a message
NO_TOKEN_EPILOG = (
    f"\n  {EXIT_NO_TOKEN} (NOT_FOUND) also means that no access token came back; nothing is printed."
)


# -- option groups --------------------------------------------------------------------------------
def param(text: str) -> tuple[str, str]:
    """A `--param KEY=VALUE` argument (argparse names the flag when this raises)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def add_client_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The flags of an OAuth client given inline (`required`: the client must be given inline)."""
    g = parser.add_argument_group("OAuth client" + ("" if required else " (inline, instead of --connector)"))
    g.add_argument("--client-id", required=required, metavar="ID", help="OAuth client id")
    g.add_argument(
        "--authorization-endpoint", required=required, metavar="URL", help="the provider's authorize URL"
    )
    g.add_argument("--token-endpoint", required=required, metavar="URL", help="the provider's token URL")
    secret = g.add_mutually_exclusive_group()
    secret.add_argument(
        "--client-secret-file", type=Path, metavar="PATH", help="read the client secret from this file"
    )
    secret.add_argument(
        "--client-secret-stdin", action="store_true", help="read the client secret from stdin"
    )
    g.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        default=[],
        metavar="S",
        help="a scope to ask for (repeat, or give several separated by spaces)",
    )
    g.add_argument("--no-pkce", action="store_true", help="do not use PKCE (S256 is used by default)")
    g.add_argument(
        "--param",
        dest="params",
        type=param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra authorization-URL parameter, e.g. access_type=offline (repeatable)",
    )
    g.add_argument(
        "--auth-method",
        choices=AUTH_METHODS,
        help="how the server authenticates at the token endpoint "
        "(default: client_secret_basic with a secret, none without)",
    )


def add_provider_options(parser: argparse.ArgumentParser) -> None:
    """--connector NAME, or an inline client."""
    parser.add_argument("--connector", metavar="NAME", help="a connector configured in the room")
    add_client_options(parser, required=False)


def read_client_secret(args: argparse.Namespace) -> str:
    """The client secret from --client-secret-file or --client-secret-stdin; '' when neither."""
    if args.client_secret_stdin:
        raw = sys.stdin.buffer.read()
        what = "--client-secret-stdin"
    elif args.client_secret_file is not None:
        what = "--client-secret-file"
        try:
            raw = Path(args.client_secret_file).read_bytes()
        except OSError as error:
            raise CliError(
                f"cannot read {what} {args.client_secret_file}: {error.strerror or error}", EXIT_USAGE
            ) from None
    else:
        return ""
    try:
        secret = raw.decode().strip()
    except UnicodeDecodeError:
        raise CliError(f"{what}: the client secret is not UTF-8 text", EXIT_USAGE) from None
    if not secret:
        raise CliError(f"{what}: the client secret is empty", EXIT_USAGE)
    return secret


def client_config(args: argparse.Namespace) -> OAuthClientConfig:
    params: dict[str, str] = {}
    for key, value in args.params:
        if key in params:
            raise CliError(f"--param: {key!r} given twice", EXIT_USAGE)
        params[key] = value
    return OAuthClientConfig(
        client_id=args.client_id,
        client_secret=read_client_secret(args),
        authorization_endpoint=args.authorization_endpoint,
        token_endpoint=args.token_endpoint,
        scopes=[s for arg in args.scopes for s in arg.split()],
        no_pkce=bool(args.no_pkce),
        extra_params=params,
        token_endpoint_auth_method=args.auth_method or "",
    )


_INLINE_FLAGS = {
    "client_id": "--client-id",
    "authorization_endpoint": "--authorization-endpoint",
    "token_endpoint": "--token-endpoint",
    "client_secret_file": "--client-secret-file",
    "client_secret_stdin": "--client-secret-stdin",
    "scopes": "--scope",
    "no_pkce": "--no-pkce",
    "params": "--param",
    "auth_method": "--auth-method",
}
_REQUIRED_INLINE = ("client_id", "authorization_endpoint", "token_endpoint")


def provider(args: argparse.Namespace) -> dict[str, Any]:
    """`connector=` or `oauth=` for the client call, from --connector or the inline flags."""
    inline = [flag for dest, flag in _INLINE_FLAGS.items() if getattr(args, dest)]
    if args.connector is not None:
        if inline:
            raise CliError(f"--connector cannot be combined with {', '.join(inline)}", EXIT_USAGE)
        return {"connector": ConnectorRef(name=args.connector)}
    missing = [_INLINE_FLAGS[dest] for dest in _REQUIRED_INLINE if not getattr(args, dest)]
    if missing:
        raise CliError(
            f"give --connector NAME, or an inline client (missing {', '.join(missing)})", EXIT_USAGE
        )
    return {"oauth": client_config(args)}


def connector_json(info: ConnectorInfo) -> dict[str, Any]:
    """A connector as the server describes it (it never includes the client secret)."""
    body = {k: jsonable(v) for k, v in asdict(info).items()}
    body["scopes"] = list(info.scopes)
    body["extra_params"] = dict(info.extra_params)
    return body


def print_token(token: str | None, missing: str) -> int:
    if token is None:
        raise CliError(missing, EXIT_NO_TOKEN)
    print(token, flush=True)
    return EXIT_OK


# -- the authorization code -----------------------------------------------------------------------
def code_and_state(args: argparse.Namespace) -> tuple[str, str]:
    """The code and the state to answer with. The state is required (the server refuses an
    answer without it): from the redirect URL, or --state with --code / --code-file."""
    if args.redirect_url is not None:
        return from_redirect_url(args.redirect_url, args.state, "--redirect-url")
    if args.redirect_url_file is not None:
        url = read_text(args.redirect_url_file, "--redirect-url-file", "the redirect URL")
        return from_redirect_url(url, args.state, "--redirect-url-file")
    if not args.state:
        given = "--code-file" if args.code_file is not None else "--code"
        raise CliError(
            f"{given} needs --state (the `state` of the provider's redirect), or give the whole "
            "redirect with --redirect-url-file",
            EXIT_USAGE,
        )
    if args.code_file is not None:
        code = read_text(args.code_file, "--code-file", "the code")
    else:
        code = str(args.code).strip()
    if not code:
        raise CliError("the authorization code is empty", EXIT_USAGE)
    return code, args.state


def read_text(path: str, flag: str, what: str) -> str:
    """A file's text, stripped ('-': stdin): for values argv would show to other users (`ps`)."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        return raw.decode().strip()
    except OSError as error:
        raise CliError(f"cannot read {flag} {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise CliError(f"{flag}: {what} is not UTF-8 text", EXIT_USAGE) from None


def from_redirect_url(url: str, state: str | None, flag: str) -> tuple[str, str]:
    """`code` and `state` from the provider's redirect (query, else fragment). A redirect that
    carries `error=` is the provider's refusal: reported, never provided. One without `state`
    is refused: nothing shows the code was meant for this request."""
    parts = urlsplit(url)
    query = parse_qs(parts.query) or parse_qs(parts.fragment)
    if "error" in query:
        reason = query["error"][0]
        detail = query.get("error_description", [""])[0]
        raise CliError(
            f"{flag}: the provider refused the authorization: {reason}"
            + (f" ({detail})" if detail else "")
            + f"; pass it on with `{PROG} oauth reject`",
            EXIT_LOCAL,
        )
    codes = query.get("code", [])
    if len(codes) != 1 or not codes[0]:
        raise CliError(f"{flag}: no single `code` parameter in the URL", EXIT_USAGE)
    states = query.get("state", [])
    if len(states) != 1 or not states[0]:
        raise CliError(
            f"{flag}: no single `state` parameter in the URL; the server refuses an answer "
            "without the state of the request (it ties the code to the request)",
            EXIT_USAGE,
        )
    if state is not None and state != states[0]:
        raise CliError(f"--state differs from the state in {flag}", EXIT_USAGE)
    return codes[0], states[0]


# -- commands -------------------------------------------------------------------------------------
def run_request(args: argparse.Namespace) -> int:
    source = provider(args)
    with connect(args) as client:
        try:
            token = client.request_oauth_token(
                **source,
                from_participant_id=args.from_participant_id,
                redirect_uri=args.redirect_uri,
                delegate_to=args.delegate_to,
                timeout=args.timeout,
            )
        except SecretsError as error:
            raise fail(error) from None
    return print_token(token, "the authorization succeeded but no access token came back")


def run_provide(args: argparse.Namespace) -> int:
    code, state = code_and_state(args)
    with connect(args) as client:
        try:
            client.provide_oauth_authorization(args.request_id, code, state=state)
        except SecretsError as error:
            raise fail(error) from None
    return EXIT_OK


def run_reject(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            client.reject_oauth_authorization(args.request_id, args.error)
        except SecretsError as error:
            raise fail(error) from None
    return EXIT_OK


def run_token(args: argparse.Namespace) -> int:
    source = provider(args)
    with connect(args) as client:
        try:
            token = client.get_offline_oauth_token(
                **source, delegated_to=args.delegated_to, delegated_by=args.delegated_by
            )
        except SecretsError as error:
            raise fail(error) from None
    return print_token(token, NO_STORED_TOKEN)


def run_connectors_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            connectors = client.list_connectors()
        except SecretsError as error:
            raise fail(error) from None
    print_json([connector_json(c) for c in connectors])
    return EXIT_OK


def run_connectors_get(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            info = client.get_connector(args.name)
        except SecretsError as error:
            raise fail(error) from None
    if info is None:
        code = grpc.StatusCode.NOT_FOUND
        raise CliError(f"{code.name}: connector {args.name!r} not found", rpc_exit_code(code))
    print_json(connector_json(info))
    return EXIT_OK


def run_connectors_set(args: argparse.Namespace) -> int:
    config = client_config(args)
    with connect(args) as client:
        try:
            info = client.set_connector(args.name, config)
        except SecretsError as error:
            raise fail(error) from None
    print_json(connector_json(info))
    return EXIT_OK


def run_connectors_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            client.delete_connector(args.name)
        except SecretsError as error:
            raise fail(error) from None
    return EXIT_OK


# -- the parsers ----------------------------------------------------------------------------------
def add_oauth_commands(subparsers: Any) -> None:
    conn = connection_options()
    oauth: argparse.ArgumentParser = subparsers.add_parser(
        "oauth",
        help="OAuth tokens another participant authorizes, and the room's connectors",
        description="Obtain OAuth access tokens that another participant authorizes (`request`, "
        "`provide`, `reject`), read the stored ones (`token`), and manage the room's connectors. "
        "Only `request` and `token` print a token.",
    )
    commands = oauth.add_subparsers(dest="oauth_command", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, help_text: str, description: str | None = None, epilog: str = ""
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name,
            parents=[conn],
            help=help_text,
            description=description or help_text,
            epilog=exit_codes_epilog() + epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser

    p = command(
        commands,
        "request",
        "ask another participant to authorize an OAuth client; prints the access token",
        "Ask another participant (usually a human's app) to authorize an OAuth client, and wait. "
        "The server exchanges the code and stores the tokens; the access token is printed on one "
        "line. Give --connector NAME, or the client inline. Ctrl-C cancels the request.",
        NO_TOKEN_EPILOG,
    )
    add_provider_options(p)
    p.add_argument("--from-participant-id", required=True, help="identity of the participant asked")
    p.add_argument(
        "--redirect-uri", required=True, metavar="URI", help="the client's registered redirect URI"
    )
    p.add_argument("--delegate-to", metavar="ID", help="identity the token is delegated to (usually you)")
    p.add_argument("--timeout", type=int, default=300, help="seconds to wait (default %(default)s)")
    p.set_defaults(run=run_request)

    p = command(
        commands,
        "provide",
        "answer an inbound OAuth request with the authorization code (prints nothing)",
        "Answer an inbound OAuth request with the code from the provider's redirect: give the "
        "whole redirect URL (code and state are taken from it; it must carry the state), or the "
        "code and --state. The code is a credential: prefer --redirect-url-file or --code-file "
        "(arguments are visible to other local users in `ps`).",
    )
    p.add_argument("--request-id", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--code", help="the authorization code (needs --state)")
    source.add_argument(
        "--code-file", metavar="PATH", help="read the code from this file ('-': stdin; needs --state)"
    )
    source.add_argument("--redirect-url", metavar="URL", help="the URL the provider redirected to")
    source.add_argument(
        "--redirect-url-file",
        metavar="PATH",
        help="read the URL the provider redirected to from this file ('-': stdin)",
    )
    p.add_argument("--state", help="the `state` of the redirect (required with --code and --code-file)")
    p.set_defaults(run=run_provide)

    p = command(commands, "reject", "refuse an inbound OAuth request")
    p.add_argument("--request-id", required=True)
    p.add_argument("--error", required=True, help="the reason, passed to the requester")
    p.set_defaults(run=run_reject)

    p = command(
        commands,
        "token",
        "print a stored access token (refreshed if needed), without asking anyone",
        "Print the stored access token for a client (--connector NAME, or the client inline), "
        "refreshed first if it is (nearly) expired. Without a usable token, nothing is printed.",
        f"\n  {EXIT_NO_TOKEN} (NOT_FOUND) also means: {NO_STORED_TOKEN}; nothing is printed.",
    )
    add_provider_options(p)
    p.add_argument("--delegated-to", metavar="ID", help="the delegate of a token you own")
    p.add_argument("--delegated-by", metavar="ID", help="read a token this identity delegated to you")
    p.set_defaults(run=run_token)

    group: argparse.ArgumentParser = commands.add_parser(
        "connectors",
        help="the room's OAuth client registrations (set and delete: room admins)",
        description="Connectors keep OAuth client registrations on the server, so participants "
        "ask for tokens by name and never see the client secret. Output never includes it.",
    )
    connectors = group.add_subparsers(dest="connectors_command", metavar="COMMAND", required=True)

    p = command(connectors, "list", "list the room's connectors as JSON")
    p.set_defaults(run=run_connectors_list)

    p = command(connectors, "get", "print a connector as JSON")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=run_connectors_get)

    p = command(
        connectors,
        "set",
        "create or replace a connector (room admin); prints it as JSON",
        "Create or replace a connector (room admin). The client secret comes from "
        "--client-secret-file or --client-secret-stdin; on replace, leaving both out keeps the "
        "stored secret.",
    )
    p.add_argument("name", metavar="NAME")
    add_client_options(p, required=True)
    p.set_defaults(run=run_connectors_set)

    p = command(connectors, "delete", "delete a connector (room admin); stored tokens stay")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=run_connectors_delete)
