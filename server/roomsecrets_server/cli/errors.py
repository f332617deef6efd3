"""How the CLI fails: one line on stderr (`roomsecrets: CODE: message`) and an exit code that
says what went wrong. Call failures exit with 64 + the gRPC status code, as grpcurl does."""

from __future__ import annotations

import grpc

PROG = "roomsecrets"

EXIT_OK = 0
EXIT_LOCAL = 1  # a local problem: a file that cannot be read, bad input, a failed startup
EXIT_USAGE = 2  # bad flags or configuration
EXIT_INTERRUPTED = 130
RPC_EXIT_BASE = 64


class CliError(Exception):
    """A failure the CLI reports as one line and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_LOCAL) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def rpc_exit_code(code: grpc.StatusCode) -> int:
    return RPC_EXIT_BASE + int(code.value[0])


def exit_codes_epilog() -> str:
    lines = [
        "exit codes:",
        f"  {EXIT_OK:<4} success",
        f"  {EXIT_LOCAL:<4} local error (unreadable file, bad input, the server failed to start)",
        f"  {EXIT_USAGE:<4} usage or configuration error",
        f"  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C)",
        f"  {RPC_EXIT_BASE}+N the call failed with gRPC status N (as grpcurl):",
    ]
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            lines.append(f"       {rpc_exit_code(code):<3} {code.name}")
    lines.append("  `get` of a missing secret exits with NOT_FOUND's code.")
    return "\n".join(lines)
