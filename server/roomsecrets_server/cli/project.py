"""Project secrets commands (`keys`, `pull-secrets`, `services`, `dockerconfig`, `run`), through
the Python client (roomsecrets.project). Tokens need a `project` grant (admin, developer or
service: `roomsecrets token --project-role ...`).

Values are read from files or stdin, never from an argument (the process list shows arguments
to other local users). Only `keys get --show-values` and `dockerconfig` print values; `run`
hands the resolved environment to a command and prints nothing. No error message carries a
value: a bad line of an env file is reported by its number only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import grpc
from roomsecrets.errors import SecretsError
from roomsecrets.project import ProjectSecretsClient, PullSecretInfo, SecretKeyInfo, ServiceInfo

from ..project import launch
from .errors import EXIT_LOCAL, EXIT_OK, EXIT_USAGE, PROG, CliError, exit_codes_epilog, rpc_exit_code
from .room import client_options, connection_options, fail, jsonable, print_json, write_out

FLAVORS = ("docker", "acr", "gar")
# `run`: what a shell answers when it cannot start a command.
EXIT_CANNOT_EXECUTE = 126
EXIT_COMMAND_NOT_FOUND = 127
EXIT_NOT_FOUND = rpc_exit_code(grpc.StatusCode.NOT_FOUND)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTES = ("'", '"')
# Python ignores these; an exec'd command must start with the default dispositions.
_RESET_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))

ENV_FILE_HELP = (
    "KEY=VALUE lines: blank lines and lines starting with # are skipped, `export ` before KEY and "
    "whitespace around KEY and VALUE are ignored, and one pair of matching quotes around VALUE is "
    "removed (no escapes, no interpolation)."
)


# -- connection -----------------------------------------------------------------------------------
@contextmanager
def connect(args: argparse.Namespace) -> Iterator[ProjectSecretsClient]:
    client = ProjectSecretsClient(**client_options(args))
    try:
        yield client
    finally:
        client.close()


def not_found(what: str) -> CliError:
    return CliError(f"{grpc.StatusCode.NOT_FOUND.name}: {what} not found", EXIT_NOT_FOUND)


# -- reading values -------------------------------------------------------------------------------
def read_input(path: Path | None, stdin: bool, what: str) -> bytes:
    """The bytes of `path`, or of stdin when `stdin`."""
    if stdin:
        return sys.stdin.buffer.read()
    assert path is not None
    try:
        return path.read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {what} {path}: {error.strerror or error}", EXIT_LOCAL) from None


def parse_env_lines(raw: bytes, what: str) -> dict[str, str]:
    """KEY=VALUE lines (see ENV_FILE_HELP). Errors name the line, never its content."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise CliError(f"{what}: not UTF-8 text", EXIT_USAGE) from None
    pairs: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped.removeprefix("export ").lstrip()
        key, sep, value = stripped.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _NAME.fullmatch(key):
            raise CliError(
                f"{what}: line {number}: expected KEY=VALUE with KEY made of letters, digits and _ "
                "(not starting with a digit)",
                EXIT_USAGE,
            )
        if key in pairs:
            raise CliError(
                f"{what}: line {number}: {key} given again (first on line {first_line[key]})", EXIT_USAGE
            )
        if len(value) >= 2 and value[0] == value[-1] and value[0] in _QUOTES:
            value = value[1:-1]
        pairs[key], first_line[key] = value, number
    return pairs


def read_pairs(path: Path | None, stdin: bool, flag: str) -> dict[str, str]:
    pairs = parse_env_lines(read_input(path, stdin, flag), f"{flag} {path}" if path else flag)
    if not pairs:
        raise CliError(f"{flag}: no KEY=VALUE lines", EXIT_USAGE)
    return pairs


def read_password(args: argparse.Namespace) -> str:
    """The password from --password-file or --password-stdin ('' when neither); a trailing line
    break is dropped."""
    if args.password_stdin:
        flag = "--password-stdin"
    elif args.password_file is not None:
        flag = "--password-file"
    else:
        return ""
    raw = read_input(args.password_file, args.password_stdin, flag)
    try:
        password = raw.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise CliError(f"{flag}: the password is not UTF-8 text", EXIT_USAGE) from None
    if not password:
        raise CliError(f"{flag}: the password is empty", EXIT_USAGE)
    return password


def variable(text: str) -> tuple[str, str]:
    """A `--var NAME=VALUE` argument; the message never repeats the argument (it may be a value)."""
    key, sep, value = text.partition("=")
    if not sep or not _NAME.fullmatch(key):
        raise argparse.ArgumentTypeError("expected NAME=VALUE (NAME: letters, digits and _)")
    return key, value


def read_variables(args: argparse.Namespace) -> dict[str, str]:
    """--var-file, then --var (a --var overrides the file)."""
    variables: dict[str, str] = {}
    if args.var_file is not None:
        variables.update(parse_env_lines(read_input(args.var_file, False, "--var-file"), "--var-file"))
    variables.update(dict(args.variables))
    return variables


# -- JSON shapes ----------------------------------------------------------------------------------
def key_json(info: SecretKeyInfo, *, values: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": info.id,
        "name": info.name,
        "keys": list(info.keys),
        "etag": info.etag,
        "update_time": jsonable(info.update_time),
    }
    if values and info.data:
        body["data"] = dict(info.data)
    return body


def pull_json(info: PullSecretInfo) -> dict[str, Any]:
    """A pull secret as the server describes it (it never includes the password)."""
    return {k: jsonable(v) for k, v in asdict(info).items()}


def service_json(info: ServiceInfo, *, manifest: bool) -> dict[str, Any]:
    body = {k: jsonable(v) for k, v in asdict(info).items()}
    if not manifest:
        del body["manifest"]
    return body


def call(function: Callable[[], Any]) -> Any:
    try:
        return function()
    except SecretsError as error:
        raise fail(error) from None


# -- keys -----------------------------------------------------------------------------------------
def run_keys_create(args: argparse.Namespace) -> int:
    flag = "--stdin" if args.stdin else "--from-env-file"
    data = read_pairs(args.from_env_file, args.stdin, flag)
    with connect(args) as client:
        info = call(lambda: client.create_secret_key(args.name, data, id=args.id))
    print_json(key_json(info))
    return EXIT_OK


def run_keys_get(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info: SecretKeyInfo | None = call(lambda: client.get_secret_key(args.id))
    if info is None:
        raise not_found(f"secret key {args.id!r}")
    print_json(key_json(info, values=args.show_values))
    if args.show_values and not info.data and info.keys:
        print(
            f"{PROG}: note: the server returned no values (only project admins and the services "
            "that declare the key read them)",
            file=sys.stderr,
        )
    return EXIT_OK


def run_keys_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        keys: list[SecretKeyInfo] = call(client.list_secret_keys)
    print_json([key_json(k) for k in keys])
    return EXIT_OK


def run_keys_update(args: argparse.Namespace) -> int:
    additions: dict[str, str] = {}
    if args.set_stdin or args.set_from_file is not None:
        flag = "--set-stdin" if args.set_stdin else "--set-from-file"
        additions = read_pairs(args.set_from_file, args.set_stdin, flag)
    if not (args.name or additions or args.remove):
        raise CliError("nothing to update: give --name, --set-from-file, --set-stdin or --remove", EXIT_USAGE)
    with connect(args) as client:
        info = call(
            lambda: client.update_secret_key(
                args.id, set=additions, remove=args.remove, name=args.name, etag=args.etag
            )
        )
    print_json(key_json(info))
    return EXIT_OK


def run_keys_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        call(lambda: client.delete_secret_key(args.id, etag=args.etag))
    return EXIT_OK


# -- pull secrets ---------------------------------------------------------------------------------
def run_pull_create(args: argparse.Namespace) -> int:
    password = read_password(args)
    with connect(args) as client:
        info = call(
            lambda: client.create_pull_secret(
                args.name,
                server=args.server,
                username=args.username or "",
                password=password,
                email=args.email or "",
                flavor=args.flavor,
                id=args.id,
            )
        )
    print_json(pull_json(info))
    return EXIT_OK


def run_pull_update(args: argparse.Namespace) -> int:
    password = read_password(args)
    if not (args.name or args.server or args.username or password or args.email):
        raise CliError(
            "nothing to update: give --name, --server, --username, --password-file, "
            "--password-stdin or --email",
            EXIT_USAGE,
        )
    with connect(args) as client:
        info = call(
            lambda: client.update_pull_secret(
                args.id,
                name=args.name or "",
                server=args.server or "",
                username=args.username or "",
                password=password,
                email=args.email or "",
                etag=args.etag,
            )
        )
    print_json(pull_json(info))
    return EXIT_OK


def run_pull_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        pulls: list[PullSecretInfo] = call(client.list_pull_secrets)
    print_json([pull_json(p) for p in pulls])
    return EXIT_OK


def run_pull_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        call(lambda: client.delete_pull_secret(args.id, etag=args.etag))
    return EXIT_OK


# -- services -------------------------------------------------------------------------------------
def run_services_apply(args: argparse.Namespace) -> int:
    path = str(args.file)
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}", EXIT_LOCAL) from None
    try:
        manifest = raw.decode()
    except UnicodeDecodeError:
        raise CliError(f"{path}: the manifest is not UTF-8 text", EXIT_USAGE) from None
    with connect(args) as client:
        try:
            info = client.apply_service(manifest, etag=args.etag)
        except SecretsError as error:
            where = "" if path == "-" else f" (in {path})"
            raise CliError(f"{error}{where}", rpc_exit_code(error.code)) from None
    print_json(service_json(info, manifest=args.show_manifest))
    return EXIT_OK


def run_services_get(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info: ServiceInfo | None = call(lambda: client.get_service(args.name))
    if info is None:
        raise not_found(f"service {args.name!r}")
    print_json(service_json(info, manifest=True))
    return EXIT_OK


def run_services_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        services: list[ServiceInfo] = call(client.list_services)
    print_json([service_json(s, manifest=args.show_manifest) for s in services])
    return EXIT_OK


def run_services_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        call(lambda: client.delete_service(args.name, etag=args.etag))
    return EXIT_OK


# -- dockerconfig and run -------------------------------------------------------------------------
def run_dockerconfig(args: argparse.Namespace) -> int:
    variables = read_variables(args)
    with connect(args) as client:
        resolved = call(lambda: client.resolve_service(args.service, variables))
    document: bytes = resolved.docker_config_json
    if not document:
        raise CliError(
            f"{grpc.StatusCode.NOT_FOUND.name}: service {args.service!r} has no pull secret "
            "(container.pull_secret)",
            EXIT_NOT_FOUND,
        )
    if args.out == "-" and sys.stdout.isatty():
        document += b"\n"
    write_out(args.out, document)
    return EXIT_OK


def run_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CliError(f"run needs a command: {PROG} run --service NAME -- CMD [ARGS...]", EXIT_USAGE)
    variables = read_variables(args)
    with connect(args) as client:
        resolved = call(lambda: client.resolve_service(args.service, variables))
    for name in resolved.environment:  # the server refuses these too; never trust one place alone
        controls = launch.denied(name)
        if controls and name not in resolved.allowed_environment:
            raise CliError(f"service {args.service}: {launch.refusal(name, controls)}", EXIT_LOCAL)
    env = dict(os.environ)
    if not args.keep_token:
        env.pop("ROOMSECRETS_TOKEN", None)
    env.update(resolved.environment)
    exec_command(command, env)


def exec_command(command: list[str], env: dict[str, str]) -> NoReturn:
    """Become `command`: its exit code is ours, and signals sent to this process reach it
    directly. The command is searched in OUR `PATH`, never in `env`'s: a manifest does not choose
    which program runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    program = command[0] if "/" in command[0] else shutil.which(command[0])
    if program is None:
        raise CliError(f"{command[0]}: command not found", EXIT_COMMAND_NOT_FOUND)
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in _RESET_SIGNALS}
    try:
        os.execve(program, command, env)  # noqa: S606 - running the user's command is the point
    except (FileNotFoundError, NotADirectoryError):
        raise CliError(f"{command[0]}: command not found", EXIT_COMMAND_NOT_FOUND) from None
    except OSError as error:
        raise CliError(
            f"{command[0]}: cannot execute: {error.strerror or error}", EXIT_CANNOT_EXECUTE
        ) from None
    finally:  # reached only when the exec failed
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the parsers ----------------------------------------------------------------------------------
def add_variable_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, metavar="NAME", help="the service to resolve")
    parser.add_argument(
        "--var",
        dest="variables",
        type=variable,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a ServiceTemplate variable (repeatable; visible to other local users in `ps`: give "
        "obscure values in --var-file)",
    )
    parser.add_argument(
        "--var-file",
        type=Path,
        metavar="PATH",
        help="ServiceTemplate variables as NAME=VALUE lines (as an env file); --var overrides",
    )


def add_project_commands(subparsers: Any) -> None:
    conn = connection_options()

    def command(
        group: Any, name: str, help_text: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name,
            parents=[conn],
            help=help_text,
            description=description or help_text,
            epilog=exit_codes_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser

    def group(name: str, help_text: str, description: str) -> Any:
        parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help_text, description=description)
        return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)

    # keys
    keys = group(
        "keys",
        "project Secret Keys: named bundles of KEY=VALUE that services get as environment variables",
        "Manage the project's Secret Keys (writes: project admins). Values come from an env file "
        "or stdin and are printed only by `keys get --show-values`, to project admins.",
    )
    p = command(
        keys,
        "create",
        "create a secret key from KEY=VALUE lines; prints its metadata as JSON (never values)",
        "Create a secret key from an env file or stdin. " + ENV_FILE_HELP,
    )
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--id", help="id (default: the server assigns one)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-env-file", type=Path, metavar="PATH", help="read KEY=VALUE lines from a file")
    source.add_argument("--stdin", action="store_true", help="read KEY=VALUE lines from stdin")
    p.set_defaults(run=run_keys_create)

    p = command(
        keys,
        "get",
        "print a secret key's metadata as JSON (values only with --show-values)",
        "Print a secret key's id, name and variable names as JSON. With --show-values, `data` "
        "holds the values too, if the server returns them (project admins only).",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--show-values", action="store_true", help="include the values (project admins)")
    p.set_defaults(run=run_keys_get)

    p = command(keys, "list", "list the project's secret keys as JSON (never values)")
    p.set_defaults(run=run_keys_list)

    p = command(
        keys,
        "update",
        "set or remove variables of a secret key, or rename it; prints its metadata as JSON",
        "Set variables (added or replaced) from an env file or stdin, remove variables, or "
        "rename the key. " + ENV_FILE_HELP,
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--name", help="new display name")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--set-from-file", type=Path, metavar="PATH", help="KEY=VALUE lines to set, from a file"
    )
    source.add_argument("--set-stdin", action="store_true", help="KEY=VALUE lines to set, from stdin")
    p.add_argument(
        "--remove", action="extend", nargs="+", default=[], metavar="KEY", help="variables to remove"
    )
    p.add_argument("--etag", help="check-and-set: update only if the key is still at this etag")
    p.set_defaults(run=run_keys_update)

    p = command(keys, "delete", "delete a secret key")
    p.add_argument("id", metavar="ID")
    p.add_argument("--etag", help="check-and-set: delete only if the key is still at this etag")
    p.set_defaults(run=run_keys_delete)

    # pull secrets
    pulls = group(
        "pull-secrets",
        "project Image Pull Secrets: registry credentials (never printed)",
        "Manage the project's Image Pull Secrets (project admins). The password comes from a file "
        "or stdin and is never printed; `dockerconfig` renders a service's as .dockerconfigjson.",
    )

    def pull_options(parser: argparse.ArgumentParser, *, create: bool) -> None:
        parser.add_argument("--name", required=create, help="display name")
        parser.add_argument("--server", required=create, help="registry host, e.g. ghcr.io")
        parser.add_argument("--username", help="registry user (gar: default _json_key)")
        password = parser.add_mutually_exclusive_group(required=create)
        password.add_argument(
            "--password-file", type=Path, metavar="PATH", help="read the password from a file"
        )
        password.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        parser.add_argument("--email", help="email (default: by flavor)")

    p = command(
        pulls,
        "create",
        "create a pull secret; prints it as JSON (never the password)",
        "Create a pull secret. For gar, the password is the service account's JSON key.",
    )
    p.add_argument("--id", help="id (default: the server assigns one)")
    p.add_argument("--flavor", required=True, choices=FLAVORS, help="registry kind")
    pull_options(p, create=True)
    p.set_defaults(run=run_pull_create)

    p = command(
        pulls,
        "update",
        "change fields of a pull secret (others keep their values); prints it as JSON",
    )
    p.add_argument("id", metavar="ID")
    pull_options(p, create=False)
    p.add_argument("--etag", help="check-and-set: update only if the pull secret is still at this etag")
    p.set_defaults(run=run_pull_update)

    p = command(pulls, "list", "list the project's pull secrets as JSON (never passwords)")
    p.set_defaults(run=run_pull_list)

    p = command(pulls, "delete", "delete a pull secret")
    p.add_argument("id", metavar="ID")
    p.add_argument("--etag", help="check-and-set: delete only if the pull secret is still at this etag")
    p.set_defaults(run=run_pull_delete)

    # services
    services = group(
        "services",
        "project Service and ServiceTemplate manifests",
        "Apply, read and delete the project's Service and ServiceTemplate manifests (YAML; "
        "project admins and developers). An invalid manifest is refused whole; the error names "
        "the field and the line.",
    )
    p = command(services, "apply", "create or replace a service from a manifest; prints it as JSON")
    p.add_argument("file", metavar="FILE", help="the manifest (YAML); '-': stdin")
    p.add_argument("--etag", help="check-and-set: replace only if the service is still at this etag")
    p.add_argument("--show-manifest", action="store_true", help="include the manifest text")
    p.set_defaults(run=run_services_apply)

    p = command(services, "get", "print a service as JSON, with its manifest")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=run_services_get)

    p = command(services, "list", "list the project's services as JSON")
    p.add_argument("--show-manifest", action="store_true", help="include the manifests' text")
    p.set_defaults(run=run_services_list)

    p = command(services, "delete", "delete a service")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--etag", help="check-and-set: delete only if the service is still at this etag")
    p.set_defaults(run=run_services_delete)

    # dockerconfig
    p = command(
        subparsers,
        "dockerconfig",
        "print a service's pull secret as a .dockerconfigjson document",
        "Resolve a service (project admins, or the service's own token) and print its pull "
        "secret as a .dockerconfigjson document, e.g. for `kubectl create secret generic "
        "regcred --type=kubernetes.io/dockerconfigjson --from-file=.dockerconfigjson=/dev/stdin`. "
        f"A service without a pull secret is an error (exit {EXIT_NOT_FOUND}, NOT_FOUND).",
    )
    add_variable_options(p)
    p.add_argument(
        "--out",
        "-o",
        default="-",
        metavar="PATH",
        help="write the document to this file (created with mode 0600); '-' (default): stdout",
    )
    p.set_defaults(run=run_dockerconfig)

    # run
    p = command(
        subparsers,
        "run",
        "run a command with a service's resolved environment (prints no value)",
        "Resolve a service (project admins, or the service's own token) and exec CMD with the "
        "resolved environment added to the current one (resolved values win). ROOMSECRETS_TOKEN "
        "is removed from CMD's environment unless --keep-token. The CLI becomes CMD: CMD's exit "
        "code is the exit code, and signals reach it directly. Before exec, the codes below "
        f"apply; {EXIT_COMMAND_NOT_FOUND}: CMD was not found, {EXIT_CANNOT_EXECUTE}: it cannot "
        "be executed.",
    )
    add_variable_options(p)
    p.add_argument("--keep-token", action="store_true", help="leave ROOMSECRETS_TOKEN in CMD's environment")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the command to run")
    p.set_defaults(run=run_run)
