"""Fill a data dir with many sealed secrets fast, in-process, through the server's own objects.

100,000 SetSecret calls would take minutes; this takes seconds and writes the very rows the server
would: `RoomSecretsServer(settings)` opens the data dir as `roomsecrets serve` does (keyring,
dev signing key, SQLite schema), `SecretsService.seal` seals each value bound to its row (room,
owner, delegated_to, id, type, etag), the key-encryption key's wrap count is reserved in the store
(KekRotation, as a server does), and `Store.put_secret` writes the rows, many queued at once so
the store's writer thread group-commits them (up to 256 a transaction). No server may run on the
data dir meanwhile.

    python -m bench.seed_store --data-dir D --count 100000 [--identity bench-user] [--room bench-room]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from roomsecrets_server.app import RoomSecretsServer
from roomsecrets_server.auth.principal import room_scope
from roomsecrets_server.config import Settings
from roomsecrets_server.store import ABSENT, SecretKey

from ._common import IDENTITY, ROOM, payload

PROJECT = "dev-project"  # the project of dev tokens minted with mint_token's default
SEED_TYPE = "text/plain"
BATCH = 2048  # rows sealed and queued at once


@dataclass(frozen=True)
class Seeded:
    data_dir: Path
    count: int
    seconds: float
    db_bytes: int


async def seed_secrets(
    data_dir: Path,
    *,
    count: int,
    identity: str = IDENTITY,
    room: str = ROOM,
    project: str = PROJECT,
    value_bytes: int = 64,
) -> Seeded:
    """Store `count` secrets owned by `identity` in `room` of `project` (named seed-0000001, ...,
    type text/plain, ids like the server assigns: random uuid4 hex, so rows land all over the
    primary-key B-tree as they would)."""
    started = time.monotonic()
    server = RoomSecretsServer(Settings(data_dir=data_dir, listen="127.0.0.1:0"))
    try:
        await server.store.open()
        await server.kek_rotation.start()
        scope = room_scope(project, room)
        value = payload(value_bytes)
        for first in range(0, count, BATCH):
            records = [
                server.secrets.seal(
                    SecretKey(scope, identity, "", uuid.uuid4().hex), SEED_TYPE, f"seed-{i:07d}", value
                )
                for i in range(first, min(count, first + BATCH))
            ]
            await asyncio.gather(*(server.store.put_secret(r, ABSENT) for r in records))
        await server.kek_rotation.flush()
    finally:
        await server.store.close()
        await server.audit.close()
    stored = count_secrets(data_dir, room_scope(project, room), identity)
    if stored != count:
        raise RuntimeError(f"seeding {data_dir}: {stored} secrets stored, expected {count}")
    db = Settings(data_dir=data_dir).database_path
    size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
    return Seeded(data_dir, count, time.monotonic() - started, size)


def count_secrets(data_dir: Path, scope: str, owner: str) -> int:
    path = Settings(data_dir=data_dir).database_path
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT count(*) FROM secrets WHERE room=? AND owner=?", (scope, owner)).fetchone()
    finally:
        conn.close()
    return int(row[0])


def seed(data_dir: Path, count: int, *, identity: str = IDENTITY, room: str = ROOM) -> Seeded:
    """Synchronous wrapper (its own event loop)."""
    return asyncio.run(seed_secrets(data_dir, count=count, identity=identity, room=room))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seed_store", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--identity", default=IDENTITY)
    parser.add_argument("--room", default=ROOM)
    args = parser.parse_args(argv)
    done = seed(args.data_dir, args.count, identity=args.identity, room=args.room)
    print(
        f"seeded {done.count} secrets for {args.identity} in {done.seconds:.1f}s "
        f"({done.db_bytes / 2**20:.1f} MiB on disk) in {done.data_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
