"""`roomsecrets`: run the server, mint development tokens, rotate keys, and use the room Secrets
API from a shell. `python -m roomsecrets_server.cli.main` is the same command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .errors import EXIT_INTERRUPTED, EXIT_LOCAL, PROG, CliError, exit_codes_epilog
from .oauth import add_oauth_commands
from .operator import add_rewrap, add_serve, add_token
from .project import add_project_commands
from .room import add_room_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="roomsecrets: secrets for rooms of humans, agents and services. Room commands "
        "take --address/--token (or ROOMSECRETS_ADDRESS / ROOMSECRETS_TOKEN). Only `get`, "
        "`request`, `keys get --show-values` and `dockerconfig` print secret values (`run` passes them "
        "to a command's environment), and only `oauth request` and `oauth token` print tokens.",
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve(subparsers)
    add_token(subparsers)
    add_room_commands(subparsers)
    add_oauth_commands(subparsers)
    add_project_commands(subparsers)
    add_rewrap(subparsers)
    for sub in subparsers.choices.values():
        sub.epilog = exit_codes_epilog()
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as error:
        print(f"{PROG}: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_LOCAL
    except (OSError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_LOCAL
    return code


if __name__ == "__main__":
    sys.exit(main())
