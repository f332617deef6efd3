"""The SQLite store keeps SQLite's own multi-process protocol intact while the server runs, so an
operator's `roomsecrets rewrap` (another process on the same file) cannot pull the shared-memory
file out from under the server."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.store import sqlite as store
from roomsecrets_server.store.base import listing_queries

from .harness import Participants

pytestmark = pytest.mark.sqlite_only

# SQLite's liveness ("DMS") lock on <db>-shm, os_unix.c: UNIX_SHM_DMS = UNIX_SHM_BASE +
# SQLITE_SHM_NLOCK, UNIX_SHM_BASE = (22 + SQLITE_SHM_NLOCK) * 4, SQLITE_SHM_NLOCK = 8. Every
# process with the database open holds it shared; a process that can take it exclusively
# concludes it is alone and truncates the file.
DMS_LOCK_BYTE = 128

# A separate process: POSIX record locks never conflict within one process.
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]))
except OSError:
    print("held")
else:
    print("free")
"""


def dms_lock(shm: Path) -> str:
    command = [sys.executable, "-c", PROBE, str(shm), str(DMS_LOCK_BYTE)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_probe_sees_a_plain_sqlite_connection_hold_the_lock(tmp_path: Path) -> None:
    """Checks the probe itself (the offset above), so the test below cannot pass vacuously."""
    path = tmp_path / "plain.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        assert dms_lock(Path(f"{path}-shm")) == "held"
    with closing(sqlite3.connect(path)) as conn:  # reopened, then the descriptor-closing mistake
        conn.execute("SELECT count(*) FROM t").fetchone()
        with open(f"{path}-shm", "rb"):
            pass
        assert dms_lock(Path(f"{path}-shm")) == "free"


def test_a_running_server_keeps_sqlites_shared_memory_lock(room: Participants) -> None:
    shm = Path(f"{room.server.settings.database_path}-shm")
    assert dms_lock(shm) == "held"
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="k", type="api-key", name="svc", data=b"v"), metadata=room.auth("alice")
    )
    got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="k"), metadata=room.auth("alice"))
    assert got.data == b"v"
    assert dms_lock(shm) == "held"


OPEN_AND_CLOSE = """
import sqlite3, sys
for _ in range(200):
    conn = sqlite3.connect(sys.argv[1], timeout=10)
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    conn.close()
"""


def test_reads_survive_another_process_opening_and_closing_the_database(room: Participants) -> None:
    """What `rewrap` or a backup tool does while the server serves. With the lock dropped, the
    other process truncated the -shm file under the server's mapping and this test's process (the
    server runs in it) died of SIGBUS: 5 crashes in 5 runs, as CI's `make test` did once."""
    alice = room.auth("alice")
    request = pb.SetSecretRequest(secret_id="k", type="api-key", name="svc", data=b"v")
    room.stub.SetSecret(request, metadata=alice)
    other = subprocess.Popen([sys.executable, "-c", OPEN_AND_CLOSE, str(room.server.settings.database_path)])
    reads = 0
    while other.poll() is None or reads < 50:
        assert room.stub.GetSecret(pb.GetSecretRequest(secret_id="k"), metadata=alice).data == b"v"
        reads += 1
    assert other.returncode == 0


# -- query plans: reads whose cost must not grow with the store ---------------------------------------
def plan(db: Path, sql: str, args: tuple[object, ...]) -> str:
    with closing(sqlite3.connect(db)) as conn:
        return " | ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))


def test_lookups_listings_and_startup_probes_are_index_searches(room: Participants) -> None:
    """Found by the benchmark suite: `(type=? OR ?='')`, `owner=? OR delegated_to=?` and a GROUP BY
    over every value made lookups by name, listing pages, DeleteRequestedSecret and start-up cost
    grow with the whole store. Each statement is now an index search, never a scan."""
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s", name="n", data=b"v"), metadata=room.auth("alice"))
    db = room.server.settings.data_dir / "roomsecrets.db"
    key = ("p/r", "alice", "", "answer", "n")
    statements: dict[str, tuple[str, tuple[object, ...]]] = {
        "by name and type": (store.FIND_BY_NAME_AND_TYPE, (*key, "t")),
        "by name alone": (store.FIND_BY_NAME, key),
        "delete answers, owned": (store.DELETE_OWNED_ANSWERS, ("p/r", "alice", "", "n", "t")),
        "delete answers, delegated": (store.DELETE_DELEGATED_ANSWERS, ("p/r", "bob", "n", "t")),
        "start-up key probe": (store.NEXT_KEK_SAMPLE, ("",)),
    }
    for after in (None, ("alice", "bob", "x"), ("bob", "", "x")):
        for n, query in enumerate(listing_queries(store._LISTED_COLUMNS, "p/r", "bob", after, 10)):
            statements[f"listing after {after}, {n}"] = query
    for what, (sql, args) in statements.items():
        shown = plan(db, sql, args)
        assert "SEARCH" in shown and "SCAN" not in shown, f"{what}: {shown}"
        # Narrowed to one participant's rows (or one key id), not a range of the whole room.
        assert re.search(r"\((room=\? AND (owner|delegated_to)=\?|kek_id>\?)", shown), f"{what}: {shown}"
