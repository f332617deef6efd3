"""Pieces shared by the benchmark servers and drivers: the event loop, the payload, the ready line."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = PROTO_ROOT / "roomsecrets" / "v1" / "room_secrets.proto"
SERVICE = "roomsecrets.v1.RoomSecrets"

# What every server prints on stdout once it accepts calls: `READY <port> <loop>`.
READY = "READY"

IDENTITY = "bench-user"
ROOM = "bench-room"
GET_SECRET_ID = "bench-get"
SECRET_TYPE = "application/octet-stream"
SECRET_NAME = "bench"


def payload(size: int) -> bytes:
    """The fixed value every benchmark stores and returns: `size` pseudo-random bytes, seed 0."""
    return random.Random(0).randbytes(size)


def loop_name(use_uvloop: bool) -> str:
    if use_uvloop:
        try:
            import uvloop  # noqa: F401, PLC0415 - optional dependency
        except ImportError:
            return "asyncio"
        return "uvloop"
    return "asyncio"


def run_loop(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    """Run `main` on uvloop when asked for and importable (as `roomsecrets serve` does), else asyncio."""
    if loop_name(use_uvloop) == "uvloop":
        import uvloop  # noqa: PLC0415

        uvloop.run(main)
    else:
        asyncio.run(main)


def announce_ready(port: int, loop: str) -> None:
    print(f"{READY} {port} {loop}", flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
