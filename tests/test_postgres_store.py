"""The PostgreSQL store itself: versioned migrations applied once (also by replicas starting
together), no plaintext in the database, and clean failures for a database it cannot use."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.store.postgres import MIGRATIONS, migrate

from .harness import Participants, ServerThread, test_settings
from .postgres import PostgresCluster, free_port

pytestmark = pytest.mark.postgres_only

COMMAND = [sys.executable, "-m", "roomsecrets_server.cli.main"]


def versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_the_server_creates_the_schema_and_a_restart_applies_nothing_twice(
    data_dir: Path, database_url: str
) -> None:
    for _ in range(2):
        running = ServerThread(test_settings(data_dir, database_url=database_url)).start()
        running.stop()
        assert versions(database_url) == list(range(1, len(MIGRATIONS) + 1))


def test_replicas_migrating_at_once_apply_each_migration_exactly_once(database_url: str) -> None:
    async def one() -> int:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            return await migrate(conn)

    async def together() -> list[int]:
        return await asyncio.gather(*(one() for _ in range(5)))

    assert asyncio.run(together()) == [len(MIGRATIONS)] * 5
    assert versions(database_url) == list(range(1, len(MIGRATIONS) + 1))


def test_a_schema_newer_than_the_server_refuses_to_start(data_dir: Path, database_url: str) -> None:
    ServerThread(test_settings(data_dir, database_url=database_url)).start().stop()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(RuntimeError, match="newer than this server knows"):
        ServerThread(test_settings(data_dir, database_url=database_url)).start()


def test_the_database_never_holds_a_value_in_plaintext(room: Participants, postgres: PostgresCluster) -> None:
    value = b"plaintext-canary-7c1e9d"
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="k", type="api-key", name="svc", data=value),
        metadata=room.auth("alice"),
    )
    url = room.server.settings.database_url
    dump = subprocess.run(
        [str(postgres.bin / "pg_dump"), "--data-only", "--dbname", url], check=True, capture_output=True
    ).stdout
    assert b"api-key" in dump  # the row is there (metadata is not secret) ...
    assert value not in dump and value.hex().encode() not in dump  # ... its value only sealed


def test_an_unreachable_database_fails_the_start_without_echoing_the_url(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://roomsecrets:hunter2-password@127.0.0.1:{port}/db?connect_timeout=2"
    done = subprocess.run(
        [*COMMAND, "serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"],
        env={"ROOMSECRETS_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    err = done.stderr.decode()
    assert "cannot reach the PostgreSQL database" in err, err
    assert "hunter2-password" not in err


def test_a_database_url_that_is_not_postgresql_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [*COMMAND, "serve", "--data-dir", str(tmp_path), "--database-url", "mysql://x@y/z"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "database_url must be a postgresql:// URL" in done.stderr.decode()
