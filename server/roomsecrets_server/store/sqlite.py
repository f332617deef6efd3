"""The embedded default backend: SQLite in WAL mode in the data directory.

Reads run inline on the event loop over a dedicated connection: an indexed point read from the
page cache takes microseconds, less than a hop to a thread would. Writes go through one writer
thread that commits them in batches, one transaction and one fsync per batch (a write that may
fail halfway runs in its own savepoint, so one failure does not sink the others). The batches are
formed on the event loop by the same adaptive group window as the audit log's
(`batching.GroupWindow`): the writer alone commits too fast for writes to queue up behind it, so
without the window each write paid its own commit. `synchronous=FULL`: a write acknowledged OK is
on disk.

Records read by key are cached (ciphertext only) and the cache is checked against the WAL-index
header on every read, so any commit by another connection or process empties it. The writer's
own commits update it instead, when the header proves that no other commit came in between (see
`_RecordCache`): a SetSecret then finds the row it replaces without a statement.

Usage counters (secret_usage, room_usage) are kept by triggers on the secrets table, so every
connection's writes keep them, in the statement that writes. The caps (store/base.py UsageCaps)
are TEMP triggers on the writer connection only: BEFORE a row is added or grown they compare the
counters plus the change with the cap and RAISE(ABORT), which undoes that one statement and
nothing else in the batch. The writer serialises every write, so a cap is never overshot. A
replacement of the same or a smaller size only evaluates the triggers' WHEN clauses.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from ..batching import GroupWindow
from ..errors import AlreadyExists, EtagMismatch, Unavailable
from .base import (
    ANY,
    CAP_REACHED,
    NO_CAPS,
    RequestRecord,
    RequestState,
    SecretKey,
    SecretRecord,
    Usage,
    UsageCaps,
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
  kind TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (room, owner, delegated_to, secret_id)
) WITHOUT ROWID;
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
CREATE INDEX IF NOT EXISTS requests_pending_by_requester
  ON requests (room, requested_by) WHERE state = 'pending';

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
# Run after the tables exist and have every column (see _migrate). (name, type) rather than
# (type, name): the same uniqueness, and a lookup by name alone (no type given) is an index range
# too. Unique per kind: an answer to a request never clashes with (or replaces) a stored secret.
# Each index is created before the one it replaces is dropped.
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS secrets_by_kind_name_type
  ON secrets (room, owner, delegated_to, kind, name, type) WHERE name != '';
DROP INDEX IF EXISTS secrets_by_name;
DROP INDEX IF EXISTS secrets_by_name_type;
"""
# Columns added after a database was first created: (table, column, definition).
ADDED_COLUMNS = (("secrets", "kind", "TEXT NOT NULL DEFAULT ''"),)


# Secret rows and value bytes per (room, owner) and per room, kept by the triggers below in the
# statement that changes them. Project records (room "") are not counted. Created, and filled from
# the rows already there, in one transaction (see _add_usage_counters).
USAGE_COUNTERS = (
    """CREATE TABLE secret_usage (
  room TEXT NOT NULL,
  owner TEXT NOT NULL,
  secrets INTEGER NOT NULL,
  bytes INTEGER NOT NULL,
  PRIMARY KEY (room, owner)
) WITHOUT ROWID""",
    """CREATE TABLE room_usage (
  room TEXT PRIMARY KEY,
  secrets INTEGER NOT NULL,
  bytes INTEGER NOT NULL
) WITHOUT ROWID""",
    """CREATE TRIGGER secrets_usage_insert AFTER INSERT ON secrets WHEN NEW.room != '' BEGIN
  INSERT INTO secret_usage (room, owner, secrets, bytes) VALUES (NEW.room, NEW.owner, 1, NEW.size)
    ON CONFLICT (room, owner) DO UPDATE SET secrets = secrets + 1, bytes = bytes + excluded.bytes;
  INSERT INTO room_usage (room, secrets, bytes) VALUES (NEW.room, 1, NEW.size)
    ON CONFLICT (room) DO UPDATE SET secrets = secrets + 1, bytes = bytes + excluded.bytes;
END""",
    """CREATE TRIGGER secrets_usage_delete AFTER DELETE ON secrets WHEN OLD.room != '' BEGIN
  UPDATE secret_usage SET secrets = secrets - 1, bytes = bytes - OLD.size
    WHERE room = OLD.room AND owner = OLD.owner;
  UPDATE room_usage SET secrets = secrets - 1, bytes = bytes - OLD.size WHERE room = OLD.room;
END""",
    # Our statements never move a row to another (room, owner), but a counter must not depend on that.
    """CREATE TRIGGER secrets_usage_update AFTER UPDATE OF room, owner, size ON secrets
WHEN NEW.size != OLD.size OR NEW.room != OLD.room OR NEW.owner != OLD.owner BEGIN
  UPDATE secret_usage SET secrets = secrets - 1, bytes = bytes - OLD.size
    WHERE OLD.room != '' AND room = OLD.room AND owner = OLD.owner;
  UPDATE room_usage SET secrets = secrets - 1, bytes = bytes - OLD.size
    WHERE OLD.room != '' AND room = OLD.room;
  INSERT INTO secret_usage (room, owner, secrets, bytes)
    SELECT NEW.room, NEW.owner, 1, NEW.size WHERE NEW.room != ''
    ON CONFLICT (room, owner) DO UPDATE SET secrets = secrets + 1, bytes = bytes + excluded.bytes;
  INSERT INTO room_usage (room, secrets, bytes) SELECT NEW.room, 1, NEW.size WHERE NEW.room != ''
    ON CONFLICT (room) DO UPDATE SET secrets = secrets + 1, bytes = bytes + excluded.bytes;
END""",
    """INSERT INTO secret_usage (room, owner, secrets, bytes)
  SELECT room, owner, count(*), sum(size) FROM secrets WHERE room != '' GROUP BY room, owner""",
    """INSERT INTO room_usage (room, secrets, bytes)
  SELECT room, count(*), sum(size) FROM secrets WHERE room != '' GROUP BY room""",
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older database's up to date (idempotent)."""
    conn.executescript(SCHEMA)
    for table, column, definition in ADDED_COLUMNS:
        if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    conn.executescript(INDEXES)
    _add_usage_counters(conn)


def _add_usage_counters(conn: sqlite3.Connection) -> None:
    """A database created before usage counters gets them, counted from its rows, at its first
    open: under the write lock, so no row is written between the count and the triggers."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='secret_usage'").fetchone():
            for statement in USAGE_COUNTERS:
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _cap_triggers(caps: UsageCaps) -> list[str]:
    """TEMP triggers (on the connection that creates them) refusing a row added to, or grown in,
    a participant room past `caps`. BEFORE the write, so they read the counters as they are and
    add the change; an upsert that replaces an existing row is not an added one."""
    owned = "(SELECT {} FROM main.secret_usage WHERE room = NEW.room AND owner = NEW.owner)"
    roomwide = "(SELECT {} FROM main.room_usage WHERE room = NEW.room)"

    def refuse(cap: str, counter: str, change: str) -> str:
        limit = int(getattr(caps, cap))
        return f"SELECT RAISE(ABORT, '{CAP_REACHED}{cap}') WHERE coalesce({counter}, 0) + {change} > {limit};"

    added, grown = [], []
    for cap, counter in (
        ("owner_secrets", owned.format("secrets")),
        ("owner_bytes", owned.format("bytes")),
        ("room_secrets", roomwide.format("secrets")),
        ("room_bytes", roomwide.format("bytes")),
    ):
        if not getattr(caps, cap):
            continue
        if cap.endswith("_secrets"):
            added.append(refuse(cap, counter, "1"))
        else:
            added.append(refuse(cap, counter, "NEW.size"))
            grown.append(refuse(cap, counter, "NEW.size - OLD.size"))
    triggers = []
    if added:
        triggers.append(
            "CREATE TEMP TRIGGER secrets_cap_added BEFORE INSERT ON main.secrets "
            "WHEN NEW.room != '' AND NOT EXISTS (SELECT 1 FROM main.secrets WHERE room = NEW.room "
            "AND owner = NEW.owner AND delegated_to = NEW.delegated_to AND secret_id = NEW.secret_id) "
            f"BEGIN {' '.join(added)} END"
        )
    if grown:
        triggers.append(
            "CREATE TEMP TRIGGER secrets_cap_grown BEFORE UPDATE OF size ON main.secrets "
            f"WHEN NEW.room != '' AND NEW.size > OLD.size BEGIN {' '.join(grown)} END"
        )
    return triggers


def _refusal(error: sqlite3.IntegrityError, record: SecretRecord, caps: UsageCaps) -> Exception | None:
    """The cap's refusal, if a cap trigger raised `error`."""
    message = str(error)
    if not message.startswith(CAP_REACHED):
        return None
    return caps.refusal(message.removeprefix(CAP_REACHED), record.key.room, record.key.owner)


_VALUE_COLUMNS = (
    "room, owner, delegated_to, secret_id, type, name, etag, crc32c, size, sealed, update_time, kek_id, kind"
)
_LISTED_COLUMNS = _VALUE_COLUMNS.replace("sealed", "x'' AS sealed")  # listings never read values
# Index searches all (tests/test_sqlite_store.py checks their plans): `(type=? OR ?='')` or
# `owner=? OR delegated_to=?` would make them scan, so each case is its own statement.
_BY_NAME = (
    f"SELECT {_VALUE_COLUMNS} FROM secrets "
    "WHERE room=? AND owner=? AND delegated_to=? AND kind=? AND name=? AND name != ''"
)
FIND_BY_NAME_AND_TYPE = f"{_BY_NAME} AND type=?"
FIND_BY_NAME = f"{_BY_NAME} ORDER BY type LIMIT 2"
_DELETED = "RETURNING room, owner, delegated_to, secret_id"
DELETE_OWNED_ANSWERS = (
    "DELETE FROM secrets WHERE room=? AND owner=? AND delegated_to=? AND kind='answer' AND name=? "
    f"AND type=? {_DELETED}"
)
# Without statistics the planner prefers the primary key's `room=?` range here: the whole room.
DELETE_DELEGATED_ANSWERS = (
    "DELETE FROM secrets INDEXED BY secrets_by_delegate "
    "WHERE room=? AND delegated_to=? AND delegated_to != '' AND kind='answer' AND name=? AND type=? "
    f"{_DELETED}"
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
_CHANGE_COUNTER = slice(8, 12)  # iChange: +1 per committed transaction (native byte order)


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
    f"INSERT INTO secrets ({_VALUE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (room, owner, delegated_to, secret_id) DO UPDATE SET type=excluded.type, "
    "name=excluded.name, etag=excluded.etag, crc32c=excluded.crc32c, size=excluded.size, "
    "sealed=excluded.sealed, update_time=excluded.update_time, kek_id=excluded.kek_id, "
    "kind=excluded.kind"
)
_INSERT_IF_ABSENT = (
    f"INSERT INTO secrets ({_VALUE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (room, owner, delegated_to, secret_id) DO NOTHING"
)
_UPDATE_IF_ETAG = (
    "UPDATE secrets SET type=?, name=?, etag=?, crc32c=?, size=?, sealed=?, update_time=?, kek_id=?, "
    "kind=? WHERE room=? AND owner=? AND delegated_to=? AND secret_id=? AND etag=?"
)


def _put(conn: sqlite3.Connection, record: SecretRecord, condition: WriteCondition, caps: UsageCaps) -> None:
    """One statement, whose condition is part of it: it writes, or it changes nothing and raises
    (so the writer needs no savepoint around it; a cap trigger's RAISE undoes the statement too).
    Only the primary key may be upserted: a clash on the name index must fail, never replace the
    other secret (INSERT OR REPLACE would)."""
    k, r = record.key, record
    fields = (r.type, r.name, r.etag, r.crc32c, r.size, r.sealed, r.update_time, r.kek_id, r.kind)
    try:
        if condition.etag is not None:
            written = conn.execute(_UPDATE_IF_ETAG, (*fields, *k, condition.etag)).rowcount
        else:
            sql = _INSERT_IF_ABSENT if condition.absent else _UPSERT
            written = conn.execute(sql, (*k, *fields)).rowcount
    except sqlite3.IntegrityError as error:
        refusal = _refusal(error, record, caps)
        if refusal is not None:
            raise refusal from None
        raise AlreadyExists(f"another secret already has type {r.type!r} and name {r.name!r}") from None
    if not written:  # the condition failed (the rare path: look why, for the message)
        _check_condition(conn, k, condition)
        raise EtagMismatch(f"secret {k.secret_id!r} changed while it was written")


# Pending requests of one requester, or to one target, in a room, not past their deadline
# (requests_pending_by_requester / requests_pending_by_target); counted up to `limit` at most.
_PENDING = {
    column: f"SELECT count(*) FROM (SELECT 1 FROM requests WHERE room=? AND {column}=? "
    "AND state='pending' AND deadline > ? LIMIT ?)"
    for column in ("requested_by", "target")
}


def _pending(conn: sqlite3.Connection, column: str, room: str, identity: str, now: float, limit: int) -> int:
    return int(conn.execute(_PENDING[column], (room, identity, now, limit)).fetchone()[0])


Job = Callable[[sqlite3.Connection], Any]
# What a job does to cached records when it succeeds: (key, the row now stored, or None if
# deleted). None: not known (a delete by name, say), so a batch holding it empties the cache.
CacheEffects = Sequence[tuple[SecretKey, SecretRecord | None]] | None
NO_SECRETS: CacheEffects = ()  # the job writes no secrets row


class _Queued(NamedTuple):
    job: Job
    savepoint: bool
    effects: CacheEffects
    future: asyncio.Future[Any]


class _Writer:
    """One thread owning the write connection; commits the batches the event loop hands over.
    A job runs inside a savepoint, so that one that fails halfway is undone alone, unless it is a
    single statement (`savepoint=False`), which SQLite already undoes by itself when it fails.
    Each transaction is announced to the record cache before it commits (`_RecordCache.begin`)."""

    MAX_BATCH = 256

    def __init__(self, conn: sqlite3.Connection, cache: _RecordCache, group_window: float) -> None:
        self._conn = conn
        self._cache = cache
        self._open: list[_Queued] = []  # on the loop: the batch the group window keeps open
        self._group = GroupWindow(group_window, self._hand_over)
        self._batches: queue.SimpleQueue[list[_Queued] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    async def run(
        self, job: Callable[[sqlite3.Connection], T], *, savepoint: bool = True, effects: CacheEffects = None
    ) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._open.append(_Queued(job, savepoint, effects, future))
        self._group.added()
        return await future

    def _hand_over(self) -> None:
        batch, self._open = self._open, []
        self._batches.put(batch)

    def close(self) -> None:
        self._group.flush_now()
        self._batches.put(None)
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = self._batches.get()
            if batch is None:
                break
            while len(batch) < self.MAX_BATCH:  # batches that queued up meanwhile join this one
                try:
                    more = self._batches.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.extend(more)
            self._commit(batch)

    def _commit(self, batch: list[_Queued]) -> None:
        conn = self._conn
        outcomes: list[tuple[bool, Any]] = []
        effects: list[tuple[SecretKey, SecretRecord | None]] | None = []
        ours: _OwnCommit | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            before = self._cache.header()  # we hold the write lock: nobody else commits now
            for queued in batch:
                savepoint = queued.savepoint
                if savepoint:
                    conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, queued.job(conn)))
                except Exception as exc:  # the job's own failure: undo just this job
                    if savepoint:
                        conn.execute("ROLLBACK TO job")
                    outcomes.append((False, exc))
                else:
                    if queued.effects is None:
                        effects = None
                    elif effects is not None:
                        effects.extend(queued.effects)
                if savepoint:
                    conn.execute("RELEASE job")
            ours = self._cache.begin(before, effects)
            conn.execute("COMMIT")
            ours.committed(self._cache.header())
        except sqlite3.Error as exc:
            if ours is not None:
                ours.committed(None)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = Unavailable(f"store write failed: {type(exc).__name__}")
            outcomes = [(False, failure)] * len(batch)
        # One wake-up per event loop (there is one) for the whole batch, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for queued, (ok, value) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(queued.future.get_loop(), []).append((queued.future, ok, value))
        for loop, results in by_loop.items():
            loop.call_soon_threadsafe(self._deliver, results)

    def _deliver(self, results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
        self._cache.settle()
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
    """Reads what changes whenever any connection commits: the WAL-index header.

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
        self._shm: mmap.mmap | None = None
        self._fd = -1
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the -shm exists from here
        try:
            self._fd = os.open(f"{path}-shm", os.O_RDONLY)
            if os.fstat(self._fd).st_size >= _WAL_INDEX_HEADER:
                self._shm = mmap.mmap(self._fd, _WAL_INDEX_HEADER, access=mmap.ACCESS_READ)
        except OSError:
            self._shm = None

    def header(self) -> bytes | None:
        """The WAL-index header now (any thread); None when the file is not mapped."""
        return None if self._shm is None else self._shm[:_WAL_INDEX_HEADER]

    def version(self) -> object:
        """Changes whenever any connection commits: the header, or `PRAGMA data_version`."""
        if self._shm is not None:
            return self._shm[:_WAL_INDEX_HEADER]
        return self._conn.execute("PRAGMA data_version").fetchone()

    def close(self) -> None:
        """Only after every connection of this process on the database is closed (see above)."""
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _OwnCommit:
    """Our writer's transaction as the reader learns of it: announced before COMMIT with the
    header it started from and what it does to cached records, then `committed` (or not)."""

    __slots__ = ("after", "before", "done", "effects")

    def __init__(self, before: bytes, effects: CacheEffects) -> None:
        self.before = before
        self.effects = effects
        self.after: bytes | None = None
        self.done = False

    def committed(self, after: bytes | None) -> None:
        """After COMMIT, from the writer thread: the header then, or None if it failed."""
        self.after = after
        self.done = True  # set last: the reader looks at `after` only once this is True


def _counter(header: bytes) -> int:
    return int.from_bytes(header[_CHANGE_COUNTER], sys.byteorder)


class _RecordCache:
    """Sealed records read by key, valid as of the WAL-index header `_seen`.

    Any commit by another connection or process changes the header and empties the cache. Our
    own writer's commits update it instead, when they provably were the only commit in between:
    the writer reads the header right after BEGIN IMMEDIATE (under the write lock, so no other
    commit can follow it before ours) and right after COMMIT; if the reader's `_seen` is one of
    the two and the change counter moved by exactly one, that one commit was ours, and cached rows
    plus our own writes are the database as of `after`. A commit by anyone else, even one that
    slipped in before `after` was read, moves the counter by more or leaves the header different
    from `after`, and the cache is emptied as before. Between our COMMIT and the writer's report
    (it needs the GIL back), a read finds the header one commit ahead: it reads the database
    without touching the cache. Only the event loop calls `lookup`/`store`; the writer thread
    calls `begin` and `_OwnCommit.committed`.
    """

    def __init__(self, commits: _CommitWatch) -> None:
        self._commits = commits
        self._records: dict[SecretKey, SecretRecord] = {}
        self._seen: object = None
        self._own: collections.deque[_OwnCommit] = collections.deque()
        self.header = commits.header

    def begin(self, before: bytes | None, effects: CacheEffects) -> _OwnCommit:
        commit = _OwnCommit(before or b"", effects)
        if before is not None:  # without the mapped header, every commit empties the cache
            self._own.append(commit)
        return commit

    def settle(self) -> None:
        """Take in our commits that the writer has reported (also called as each batch's callers
        are resumed, so the queue stays short when nothing reads)."""
        own = self._own
        while own and own[0].done:
            self._apply(own.popleft())

    def usable(self) -> bool:
        """Bring the cache up to date; False: read the database this once, and cache nothing."""
        self.settle()
        own = self._own
        now = self._commits.version()
        if now == self._seen:
            return True
        if (
            own
            and own[0].before == self._seen
            and isinstance(now, bytes)
            and _counter(now) == (_counter(own[0].before) + 1) & 0xFFFFFFFF
        ):
            return False  # most likely our commit, not yet reported: settled on a later call
        self._records.clear()
        self._seen = now
        return True

    def _apply(self, commit: _OwnCommit) -> None:
        before, after = commit.before, commit.after
        if after is None or commit.effects is None or self._seen not in (before, after):
            return  # the next look at the header empties the cache
        if _counter(after) != (_counter(before) + 1) & 0xFFFFFFFF:
            return
        self._seen = after
        records = self._records
        for key, record in commit.effects:
            if record is None:
                records.pop(key, None)
            else:
                records[key] = record

    def lookup(self, key: SecretKey) -> SecretRecord | None:
        return self._records.get(key)

    def store(self, key: SecretKey, record: SecretRecord) -> None:
        if len(self._records) >= RECORD_CACHE_SIZE:
            self._records.clear()  # _seen stays: what is cached is still current
        self._records[key] = record


class SqliteStore:
    def __init__(self, path: Path, *, group_window: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write = _connect(path)
        _migrate(write)
        self._read = _connect(path)
        self._commits = _CommitWatch(self._read, path)
        self._cache = _RecordCache(self._commits)
        self._writer = _Writer(write, self._cache, group_window)
        self._caps = NO_CAPS

    async def open(self, caps: UsageCaps = NO_CAPS) -> None:
        # Opened (and the schema created) in __init__: a local file needs no waiting. The caps
        # are TEMP triggers of the writer's connection, so they are created by the writer.
        def job(conn: sqlite3.Connection) -> None:
            for name in ("secrets_cap_added", "secrets_cap_grown"):
                conn.execute(f"DROP TRIGGER IF EXISTS temp.{name}")
            for trigger in _cap_triggers(caps):
                conn.execute(trigger)

        await self._writer.run(job, effects=NO_SECRETS)
        self._caps = caps

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
        cache = self._cache
        usable = cache.usable()
        record = cache.lookup(key) if usable else None
        if record is None:
            row = self._one(_GET_SECRET, key)  # SecretKey is a tuple in column order
            if row is None:
                return None
            record = _secret(row)
            if usable:
                cache.store(key, record)
        return record

    async def find_secrets(
        self, room: str, owner: str, delegated_to: str, kind: str, type_: str, name: str
    ) -> list[SecretRecord]:
        if type_:
            rows = self._all(FIND_BY_NAME_AND_TYPE, (room, owner, delegated_to, kind, name, type_))
        else:
            rows = self._all(FIND_BY_NAME, (room, owner, delegated_to, kind, name))
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
        caps = self._caps
        await self._writer.run(
            lambda conn: _put(conn, record, condition, caps), savepoint=False, effects=((record.key, record),)
        )

    async def delete_secret(self, key: SecretKey, condition: WriteCondition) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            _check_condition(conn, key, condition)
            cur = conn.execute(
                "DELETE FROM secrets WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?",
                (key.room, key.owner, key.delegated_to, key.secret_id),
            )
            return cur.rowcount > 0

        # The check only reads and raises before the one statement that writes: no savepoint.
        return await self._writer.run(job, savepoint=False, effects=((key, None),))

    async def delete_answers(
        self, room: str, identity: str, delegated_to: str, type_: str, name: str
    ) -> list[SecretKey]:
        def job(conn: sqlite3.Connection) -> list[SecretKey]:
            # Owned (secrets_by_kind_name_type), then, if it is the delegation asked for, delegated
            # to the caller (secrets_by_delegate): an OR of the two would scan the whole room.
            rows = conn.execute(DELETE_OWNED_ANSWERS, (room, identity, delegated_to, name, type_)).fetchall()
            if delegated_to == identity:
                rows += conn.execute(DELETE_DELEGATED_ANSWERS, (room, delegated_to, name, type_)).fetchall()
            return sorted({SecretKey(*row) for row in rows})

        return await self._writer.run(job)

    async def usage(self, room: str, owner: str | None = None) -> Usage:
        if owner is None:
            row = self._one("SELECT secrets, bytes FROM room_usage WHERE room=?", (room,))
        else:
            row = self._one("SELECT secrets, bytes FROM secret_usage WHERE room=? AND owner=?", (room, owner))
        return Usage(int(row[0]), int(row[1])) if row else Usage(0, 0)

    # -- requests -----------------------------------------------------------------------------
    async def create_request(self, record: RequestRecord) -> None:
        r = record
        caps = self._caps

        def job(conn: sqlite3.Connection) -> None:
            # In the writer, which serialises writes: nothing is stored between count and insert.
            for cap, column, limit, identity in (
                ("pending_asked", "requested_by", caps.pending_asked, r.requested_by),
                ("pending_addressed", "target", caps.pending_addressed, r.target),
            ):
                if limit and _pending(conn, column, r.room, identity, r.created, limit) >= limit:
                    raise caps.refusal(cap, r.room, identity)
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

        await self._writer.run(job, effects=NO_SECRETS)

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
        caps = self._caps

        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE requests SET state=?, reason=?, secret_id=? WHERE request_id=? AND state='pending'",
                (state.value, reason, secret.key.secret_id if secret else "", request_id),
            )
            if cur.rowcount != 1:
                return False
            if secret is not None:
                _put(conn, secret, secret_condition, caps)  # raising rolls back the transition too
            return True

        return await self._writer.run(job, effects=None if secret else NO_SECRETS)

    async def expire_due(self, now: float) -> list[RequestRecord]:
        def job(conn: sqlite3.Connection) -> list[RequestRecord]:
            rows = conn.execute(
                "UPDATE requests SET state='expired', reason='timed out' "
                f"WHERE state='pending' AND deadline <= ? RETURNING {_REQUEST_COLUMNS}",
                (now,),
            ).fetchall()
            return [_request(r) for r in rows]

        return await self._writer.run(job, effects=NO_SECRETS)

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

        return await self._writer.run(job, effects=NO_SECRETS)

    async def release_lease(self, name: str, holder: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM leases WHERE name=? AND holder=?", (name, holder))

        await self._writer.run(job, effects=NO_SECRETS)

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

        return await self._writer.run(job, effects=NO_SECRETS)

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
