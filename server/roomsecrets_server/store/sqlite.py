"""The embedded default backend: SQLite in WAL mode in the data directory.

Reads run inline on the event loop over a dedicated connection: an indexed point read from the
page cache takes microseconds, less than a hop to a thread would. Writes go through one writer
thread that group-commits whatever is queued in a single transaction (one fsync for the batch,
each write in its own savepoint so one failure does not sink the others). `synchronous=FULL`:
a write acknowledged OK is on disk.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import AlreadyExists, EtagMismatch, Unavailable
from .base import (
    ANY,
    RequestRecord,
    RequestState,
    SecretKey,
    SecretRecord,
    WriteCondition,
    listing_queries,
    merge_listing,
)
from .base import request_from_row as _request
from .base import secret_from_row as _secret

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
  room TEXT NOT NULL,
  owner TEXT NOT NULL,
  delegated_to TEXT NOT NULL,
  secret_id TEXT NOT NULL,
  type TEXT NOT NULL,
  name TEXT NOT NULL,
  etag TEXT NOT NULL,
  crc32c INTEGER NOT NULL,
  size INTEGER NOT NULL,
  kek_id TEXT NOT NULL,
  sealed BLOB NOT NULL,
  update_time REAL NOT NULL,
  PRIMARY KEY (room, owner, delegated_to, secret_id)
) WITHOUT ROWID;
-- (name, type) rather than (type, name): the same uniqueness, and a lookup by name alone (no
-- type given) is then an index range too. Created before the old order is dropped.
CREATE UNIQUE INDEX IF NOT EXISTS secrets_by_name_type
  ON secrets (room, owner, delegated_to, name, type) WHERE name != '';
DROP INDEX IF EXISTS secrets_by_name;
CREATE INDEX IF NOT EXISTS secrets_by_delegate
  ON secrets (room, delegated_to, owner, secret_id) WHERE delegated_to != '';
CREATE INDEX IF NOT EXISTS secrets_by_kek ON secrets (kek_id);

CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY,
  room TEXT NOT NULL,
  kind TEXT NOT NULL,
  requested_by TEXT NOT NULL,
  target TEXT NOT NULL,
  url TEXT NOT NULL,
  type TEXT NOT NULL,
  delegate_to TEXT NOT NULL,
  state TEXT NOT NULL,
  reason TEXT NOT NULL,
  created REAL NOT NULL,
  deadline REAL NOT NULL,
  secret_id TEXT NOT NULL,
  params BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_pending_by_target
  ON requests (room, target) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_pending_by_deadline
  ON requests (deadline) WHERE state = 'pending';

CREATE TABLE IF NOT EXISTS leases (
  name TEXT PRIMARY KEY,
  holder TEXT NOT NULL,
  expires REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS kek_wraps (
  kek_id TEXT PRIMARY KEY,
  wraps INTEGER NOT NULL
) WITHOUT ROWID;
"""

_VALUE_COLUMNS = (
    "room, owner, delegated_to, secret_id, type, name, etag, crc32c, size, sealed, update_time, kek_id"
)
_LISTED_COLUMNS = _VALUE_COLUMNS.replace("sealed", "x'' AS sealed")  # listings never read values
# Index searches all (tests/test_sqlite_store.py checks their plans): `(type=? OR ?='')` or
# `owner=? OR delegated_to=?` would make them scan, so each case is its own statement.
_BY_NAME = (
    f"SELECT {_VALUE_COLUMNS} FROM secrets "
    "WHERE room=? AND owner=? AND delegated_to=? AND name=? AND name != ''"
)
FIND_BY_NAME_AND_TYPE = f"{_BY_NAME} AND type=?"
FIND_BY_NAME = f"{_BY_NAME} ORDER BY type LIMIT 2"
DELETE_OWNED_BY_NAME = "DELETE FROM secrets WHERE room=? AND owner=? AND delegated_to=? AND name=? AND type=?"
# Without statistics the planner prefers the primary key's `room=?` range here: the whole room.
DELETE_DELEGATED_BY_NAME = (
    "DELETE FROM secrets INDEXED BY secrets_by_delegate "
    "WHERE room=? AND delegated_to=? AND delegated_to != '' AND name=? AND type=?"
)
NEXT_KEK_SAMPLE = "SELECT kek_id, sealed FROM secrets WHERE kek_id > ? ORDER BY kek_id LIMIT 1"
_REQUEST_COLUMNS = (
    "request_id, room, kind, requested_by, target, url, type, delegate_to, state, reason, created, deadline, "
    "secret_id, params"
)


_GET_SECRET = (
    f"SELECT {_VALUE_COLUMNS} FROM secrets WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?"
)
# Sealed records recently read by key. Only ciphertext is kept, and the whole cache is dropped as
# soon as any connection (our writer thread, a rewrap, another server process) commits, so a read
# never returns a row older than the last commit.
RECORD_CACHE_SIZE = 4096
_WAL_INDEX_HEADER = 48  # https://www.sqlite.org/walformat.html#the_wal_index_header


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _check_condition(conn: sqlite3.Connection, key: SecretKey, condition: WriteCondition) -> None:
    if condition == ANY:
        return
    row = conn.execute(
        "SELECT etag FROM secrets WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?",
        (key.room, key.owner, key.delegated_to, key.secret_id),
    ).fetchone()
    if condition.absent and row is not None:
        raise EtagMismatch(f"secret {key.secret_id!r} already exists")
    if condition.etag is not None:
        if row is None:
            raise EtagMismatch(f"etag does not match: secret {key.secret_id!r} does not exist")
        if row[0] != condition.etag:
            raise EtagMismatch(f"etag does not match the current version of secret {key.secret_id!r}")


_UPSERT = (
    f"INSERT INTO secrets ({_VALUE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (room, owner, delegated_to, secret_id) DO UPDATE SET type=excluded.type, "
    "name=excluded.name, etag=excluded.etag, crc32c=excluded.crc32c, size=excluded.size, "
    "sealed=excluded.sealed, update_time=excluded.update_time, kek_id=excluded.kek_id"
)
_INSERT_IF_ABSENT = (
    f"INSERT INTO secrets ({_VALUE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (room, owner, delegated_to, secret_id) DO NOTHING"
)
_UPDATE_IF_ETAG = (
    "UPDATE secrets SET type=?, name=?, etag=?, crc32c=?, size=?, sealed=?, update_time=?, kek_id=? "
    "WHERE room=? AND owner=? AND delegated_to=? AND secret_id=? AND etag=?"
)


def _put(conn: sqlite3.Connection, record: SecretRecord, condition: WriteCondition) -> None:
    """One statement, whose condition is part of it: it writes, or it changes nothing and raises
    (so the writer needs no savepoint around it). Only the primary key may be upserted: a clash
    on the name index must fail, never replace the other secret (INSERT OR REPLACE would)."""
    k, r = record.key, record
    fields = (r.type, r.name, r.etag, r.crc32c, r.size, r.sealed, r.update_time, r.kek_id)
    try:
        if condition.etag is not None:
            written = conn.execute(_UPDATE_IF_ETAG, (*fields, *k, condition.etag)).rowcount
        else:
            sql = _INSERT_IF_ABSENT if condition.absent else _UPSERT
            written = conn.execute(sql, (*k, *fields)).rowcount
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"another secret already has type {r.type!r} and name {r.name!r}") from None
    if not written:  # the condition failed (the rare path: look why, for the message)
        _check_condition(conn, k, condition)
        raise EtagMismatch(f"secret {k.secret_id!r} changed while it was written")


Job = Callable[[sqlite3.Connection], Any]


class _Writer:
    """One thread owning the write connection; group-commits queued jobs. A job runs inside a
    savepoint, so that one that fails halfway is undone alone, unless it is a single statement
    (`savepoint=False`), which SQLite already undoes by itself when it fails."""

    MAX_BATCH = 256

    def __init__(self, path: Path) -> None:
        self._conn = _connect(path)
        self._conn.executescript(SCHEMA)
        self._jobs: queue.SimpleQueue[tuple[Job, bool, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    async def run(self, job: Callable[[sqlite3.Connection], T], *, savepoint: bool = True) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((job, savepoint, future))
        return await future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.MAX_BATCH:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Job, bool, asyncio.Future[Any]]]) -> None:
        conn = self._conn
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job, savepoint, _ in batch:
                if savepoint:
                    conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, job(conn)))
                except Exception as exc:  # the job's own failure: undo just this job
                    if savepoint:
                        conn.execute("ROLLBACK TO job")
                    outcomes.append((False, exc))
                if savepoint:
                    conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = Unavailable(f"store write failed: {type(exc).__name__}")
            outcomes = [(False, failure)] * len(batch)
        # One wake-up per event loop (there is one) for the whole batch, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(future.get_loop(), []).append((future, ok, value))
        for loop, results in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, results)


def _resolve_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        _resolve(future, ok, value)


def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; the write itself still happened (or not)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class _CommitWatch:
    """Tells whether any connection committed since the last look.

    SQLite itself decides whether its page cache is still valid by comparing the WAL-index header
    in the shared-memory file (`<db>-shm`), which every commit rewrites. Reading those 48 bytes
    from a mapping costs a memory read; `PRAGMA data_version` gives the same answer but is a
    statement, which releases the GIL and so costs a thread switch per call under load.

    The mapping is safe only while SQLite's own liveness lock on the -shm file holds: SQLite
    truncates and rebuilds the file when it finds nobody else holding it. That lock is a POSIX
    record lock, and POSIX drops ALL of a process's locks on a file when the process closes ANY
    descriptor on it. So the descriptor (and the mapping's internal dup of it) stays open until
    the connections are closed: closing it earlier let another process (the `rewrap` CLI, a
    second replica) truncate the file under the mapping, and the next read died of SIGBUS.
    Falls back to the pragma when the file cannot be mapped.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._seen: object = None
        self._shm: mmap.mmap | None = None
        self._fd = -1
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the -shm exists from here
        try:
            self._fd = os.open(f"{path}-shm", os.O_RDONLY)
            if os.fstat(self._fd).st_size >= _WAL_INDEX_HEADER:
                self._shm = mmap.mmap(self._fd, _WAL_INDEX_HEADER, access=mmap.ACCESS_READ)
        except OSError:
            self._shm = None

    def changed(self) -> bool:
        now: object
        if self._shm is not None:
            now = self._shm[:_WAL_INDEX_HEADER]
        else:
            now = self._conn.execute("PRAGMA data_version").fetchone()
        if now == self._seen:
            return False
        self._seen = now
        return True

    def close(self) -> None:
        """Only after every connection of this process on the database is closed (see above)."""
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SqliteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _Writer(path)  # creates the schema first
        self._read = _connect(path)
        self._records: dict[SecretKey, SecretRecord] = {}
        self._commits = _CommitWatch(self._read, path)

    async def open(self) -> None:
        pass  # opened (and the schema created) in __init__: a local file needs no waiting

    async def close(self) -> None:
        self._writer.close()
        self._read.close()
        self._commits.close()  # after the connections: see _CommitWatch

    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._read.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(f"store read failed: {type(exc).__name__}") from None
        return row

    def _all(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._read.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise Unavailable(f"store read failed: {type(exc).__name__}") from None

    # -- secrets ------------------------------------------------------------------------------
    async def get_secret(self, key: SecretKey) -> SecretRecord | None:
        if self._commits.changed() or len(self._records) >= RECORD_CACHE_SIZE:
            self._records.clear()
        record = self._records.get(key)
        if record is None:
            row = self._one(_GET_SECRET, key)  # SecretKey is a tuple in column order
            if row is None:
                return None
            record = self._records[key] = _secret(row)
        return record

    async def find_secrets(
        self, room: str, owner: str, delegated_to: str, type_: str, name: str
    ) -> list[SecretRecord]:
        if type_:
            rows = self._all(FIND_BY_NAME_AND_TYPE, (room, owner, delegated_to, name, type_))
        else:
            rows = self._all(FIND_BY_NAME, (room, owner, delegated_to, name))
        return [_secret(r) for r in rows]

    async def list_secrets(
        self, room: str, identity: str, after: tuple[str, str, str] | None, limit: int
    ) -> list[SecretRecord]:
        queries = listing_queries(_LISTED_COLUMNS, room, identity, after, limit)
        return merge_listing([[_secret(r) for r in self._all(sql, args)] for sql, args in queries], limit)

    async def list_owned(self, room: str, owner: str, type_: str, limit: int) -> list[SecretRecord]:
        rows = self._all(
            f"SELECT {_VALUE_COLUMNS} FROM secrets "
            "WHERE room=? AND owner=? AND delegated_to='' AND type=? ORDER BY secret_id LIMIT ?",
            (room, owner, type_, limit),
        )
        return [_secret(r) for r in rows]

    async def put_secret(self, record: SecretRecord, condition: WriteCondition) -> None:
        await self._writer.run(lambda conn: _put(conn, record, condition), savepoint=False)

    async def delete_secret(self, key: SecretKey, condition: WriteCondition) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            _check_condition(conn, key, condition)
            cur = conn.execute(
                "DELETE FROM secrets WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?",
                (key.room, key.owner, key.delegated_to, key.secret_id),
            )
            return cur.rowcount > 0

        # The check only reads and raises before the one statement that writes: no savepoint.
        return await self._writer.run(job, savepoint=False)

    async def delete_secrets_by_name(
        self, room: str, owners_or_delegate: str, delegated_to: str, type_: str, name: str
    ) -> int:
        def job(conn: sqlite3.Connection) -> int:
            # Owned (secrets_by_name_type), then, if it is the delegation asked for, delegated to
            # the caller (secrets_by_delegate): an OR of the two would scan the whole room.
            count = conn.execute(
                DELETE_OWNED_BY_NAME, (room, owners_or_delegate, delegated_to, name, type_)
            ).rowcount
            if delegated_to == owners_or_delegate:
                count += conn.execute(DELETE_DELEGATED_BY_NAME, (room, delegated_to, name, type_)).rowcount
            return count

        return await self._writer.run(job)

    # -- requests -----------------------------------------------------------------------------
    async def create_request(self, record: RequestRecord) -> None:
        r = record

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO requests ({_REQUEST_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    r.request_id,
                    r.room,
                    r.kind,
                    r.requested_by,
                    r.target,
                    r.url,
                    r.type,
                    r.delegate_to,
                    r.state.value,
                    r.reason,
                    r.created,
                    r.deadline,
                    r.secret_id,
                    r.params,
                ),
            )

        await self._writer.run(job)

    async def get_request(self, request_id: str) -> RequestRecord | None:
        row = self._one(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE request_id=?", (request_id,))
        return _request(row) if row else None

    async def find_pending_request(
        self, room: str, requested_by: str, target: str, kind: str, url: str, type_: str, delegate_to: str
    ) -> RequestRecord | None:
        row = self._one(
            f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE room=? AND target=? AND state='pending' "
            "AND requested_by=? AND kind=? AND url=? AND type=? AND delegate_to=? AND deadline > ? "
            "ORDER BY created LIMIT 1",
            (room, target, requested_by, kind, url, type_, delegate_to, time.time()),
        )
        return _request(row) if row else None

    async def pending_requests_for(self, room: str, target: str, now: float) -> list[RequestRecord]:
        rows = self._all(
            f"SELECT {_REQUEST_COLUMNS} FROM requests "
            "WHERE room=? AND target=? AND state='pending' AND deadline > ? ORDER BY created",
            (room, target, now),
        )
        return [_request(r) for r in rows]

    async def close_request(
        self,
        request_id: str,
        state: RequestState,
        reason: str,
        *,
        secret: SecretRecord | None = None,
        secret_condition: WriteCondition = ANY,
    ) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE requests SET state=?, reason=?, secret_id=? WHERE request_id=? AND state='pending'",
                (state.value, reason, secret.key.secret_id if secret else "", request_id),
            )
            if cur.rowcount != 1:
                return False
            if secret is not None:
                _put(conn, secret, secret_condition)  # raising rolls back the transition too
            return True

        return await self._writer.run(job)

    async def expire_due(self, now: float) -> list[RequestRecord]:
        def job(conn: sqlite3.Connection) -> list[RequestRecord]:
            rows = conn.execute(
                "UPDATE requests SET state='expired', reason='timed out' "
                f"WHERE state='pending' AND deadline <= ? RETURNING {_REQUEST_COLUMNS}",
                (now,),
            ).fetchall()
            return [_request(r) for r in rows]

        return await self._writer.run(job)

    # -- leases -------------------------------------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cur = conn.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (?,?,?) "
                "ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, expires=excluded.expires "
                "WHERE leases.expires <= ? OR leases.holder = excluded.holder",
                (name, holder, now + ttl, now),
            )
            return cur.rowcount == 1

        return await self._writer.run(job)

    async def release_lease(self, name: str, holder: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM leases WHERE name=? AND holder=?", (name, holder))

        await self._writer.run(job)

    # -- key rotation -------------------------------------------------------------------------
    async def sealed_not_under(self, root_id: str, limit: int) -> list[tuple[SecretKey, bytes]]:
        prefix = f"{root_id}.g"
        rows = self._all(
            "SELECT room, owner, delegated_to, secret_id, sealed FROM secrets "
            "WHERE kek_id != ? AND substr(kek_id, 1, ?) != ? LIMIT ?",
            (root_id, len(prefix), prefix, limit),
        )
        return [(SecretKey(r[0], r[1], r[2], r[3]), r[4]) for r in rows]

    async def kek_samples(self) -> dict[str, bytes]:
        # One index probe per distinct key (a few), not a GROUP BY over every value's index entry.
        samples: dict[str, bytes] = {}
        while row := self._one(NEXT_KEK_SAMPLE, (max(samples, default=""),)):
            samples[str(row[0])] = bytes(row[1])
        return samples

    async def reserve_wraps(self, kek_id: str, count: int) -> int:
        def job(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "INSERT INTO kek_wraps (kek_id, wraps) VALUES (?, ?) "
                "ON CONFLICT (kek_id) DO UPDATE SET wraps = wraps + excluded.wraps RETURNING wraps",
                (kek_id, count),
            ).fetchone()
            return int(row[0])

        return await self._writer.run(job)

    async def wrap_counts(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._all("SELECT kek_id, wraps FROM kek_wraps", ())}

    async def replace_sealed(self, key: SecretKey, old: bytes, new: bytes, kek_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE secrets SET sealed=?, kek_id=? "
                "WHERE room=? AND owner=? AND delegated_to=? AND secret_id=? AND sealed=?",
                (new, kek_id, key.room, key.owner, key.delegated_to, key.secret_id, old),
            )
            return cur.rowcount == 1

        return await self._writer.run(job)
