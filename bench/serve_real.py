"""The real roomsecrets server for benchmarks: `roomsecrets_server.app.serve` with default settings
(SQLite store, keyring, audit log, dev signing key), on uvloop like `roomsecrets serve`.

    python -m bench.serve_real --data-dir D [--listen 127.0.0.1:0] [--no-uvloop] [--database-url URL]
                               [--workers N]

Prints `READY <port> <loop>` on stdout once serving; stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from roomsecrets_server.app import RoomSecretsServer, serve
from roomsecrets_server.config import Settings
from roomsecrets_server.workers import run_workers

from ._common import announce_ready, loop_name, run_loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_real", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port; port 0 picks a free one")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    parser.add_argument("--database-url", default="", help="a postgresql:// URL (default: SQLite)")
    parser.add_argument("--audit-buffered", action="store_true", help="buffer the audit log (fails open)")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers N (PostgreSQL only)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    settings = Settings(
        data_dir=args.data_dir,
        listen=args.listen,
        database_url=args.database_url,
        audit_buffered=args.audit_buffered,
        workers=args.workers,
    )
    loop = loop_name(not args.no_uvloop)
    if args.workers > 1:  # as `roomsecrets serve --workers N`: fork before any gRPC object
        settings.check()

        def serve_worker(worker_settings: Settings, ready: Callable[[], None]) -> None:
            run_loop(serve(worker_settings, lambda _: ready()), not args.no_uvloop)

        def all_ready(listen: str) -> None:
            announce_ready(int(listen.rsplit(":", 1)[1]), loop)

        return run_workers(settings, serve_worker, all_ready)

    def on_ready(server: RoomSecretsServer) -> None:
        announce_ready(server.port, loop)

    run_loop(serve(settings, on_ready), not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
