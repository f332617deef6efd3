"""The shared backend: PostgreSQL, for several stateless replicas on one database.

Same rows and the same invariants as the SQLite store; PostgreSQL enforces them itself: primary
keys and the unique (type, name) index, check-and-set as one conditional statement, a request's
pending -> closed transition as `UPDATE ... WHERE state = 'pending'` (under READ COMMITTED a
second replica racing for the same row re-checks the condition after the first commits, so
exactly one wins), and leases as a conditional upsert. Values arrive sealed: the database never
sees plaintext.

The schema is created and migrated on start by numbered migrations, applied under a
transaction-scoped advisory lock so replicas starting together apply each exactly once.

Usage counters (secret_usage, room_usage) are kept by row triggers in the statement that writes,
the room's row locked before the owner's (every counted write in a room takes them in that
order, so they cannot deadlock). Each pooled connection carries this replica's caps (UsageCaps)
as settings (`roomsecrets.cap_*`), which the trigger compares with the counters it just updated,
under their row locks: concurrent writers, on any replica, queue on those rows, so a cap is never
overshot; a connection without them (another tool, an older replica) is not capped. A
replacement of the same size does not fire the triggers (WHEN). Pending requests are counted in
the transaction that stores one, under an advisory lock per room.

A lost connection (database restarting, network gone) surfaces as Unavailable; the pool drops
broken connections and reconnects on its own. Reads are retried once on a fresh connection (a
pooled connection can be dead after a database restart); writes are not, since a write whose
commit was in flight may or may not have happened — callers retry those with an etag.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

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

log = logging.getLogger(__name__)

T = TypeVar("T")

# Text key columns use the "C" collation: byte order, the same order SQLite gives, so page tokens
# and listings agree across backends (and comparisons are cheaper).
MIGRATIONS: tuple[str, ...] = (
    # 1: secrets, requests, leases
    """
    CREATE TABLE secrets (
      room TEXT COLLATE "C" NOT NULL,
      owner TEXT COLLATE "C" NOT NULL,
      delegated_to TEXT COLLATE "C" NOT NULL,
      secret_id TEXT COLLATE "C" NOT NULL,
      type TEXT COLLATE "C" NOT NULL,
      name TEXT COLLATE "C" NOT NULL,
      etag TEXT NOT NULL,
      crc32c BIGINT NOT NULL,
      size BIGINT NOT NULL,
      kek_id TEXT NOT NULL,
      sealed BYTEA NOT NULL,
      update_time DOUBLE PRECISION NOT NULL,
      PRIMARY KEY (room, owner, delegated_to, secret_id)
    );
    CREATE UNIQUE INDEX secrets_by_name
      ON secrets (room, owner, delegated_to, type, name) WHERE name <> '';
    CREATE INDEX secrets_by_delegate
      ON secrets (room, delegated_to, owner, secret_id) WHERE delegated_to <> '';
    CREATE INDEX secrets_by_kek ON secrets (kek_id);

    CREATE TABLE requests (
      request_id TEXT COLLATE "C" PRIMARY KEY,
      room TEXT COLLATE "C" NOT NULL,
      kind TEXT NOT NULL,
      requested_by TEXT COLLATE "C" NOT NULL,
      target TEXT COLLATE "C" NOT NULL,
      url TEXT NOT NULL,
      type TEXT NOT NULL,
      delegate_to TEXT COLLATE "C" NOT NULL,
      state TEXT NOT NULL,
      reason TEXT NOT NULL,
      created DOUBLE PRECISION NOT NULL,
      deadline DOUBLE PRECISION NOT NULL,
      secret_id TEXT NOT NULL,
      params BYTEA NOT NULL
    );
    CREATE INDEX requests_pending_by_target ON requests (room, target) WHERE state = 'pending';
    CREATE INDEX requests_pending_by_deadline ON requests (deadline) WHERE state = 'pending';

    CREATE TABLE leases (
      name TEXT COLLATE "C" PRIMARY KEY,
      holder TEXT NOT NULL,
      expires DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: presence of WatchRequests streams across replicas (see requests/pg_notifier.py)
    """
    CREATE TABLE replicas (
      replica TEXT COLLATE "C" PRIMARY KEY,
      heartbeat DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE listeners (
      replica TEXT COLLATE "C" NOT NULL REFERENCES replicas ON DELETE CASCADE,
      room TEXT COLLATE "C" NOT NULL,
      identity TEXT COLLATE "C" NOT NULL,
      PRIMARY KEY (room, identity, replica)
    );
    """,
    # 3: data keys wrapped under each key-encryption key, by every replica (crypto/rotation.py)
    """
    CREATE TABLE kek_wraps (
      kek_id TEXT COLLATE "C" PRIMARY KEY,
      wraps BIGINT NOT NULL
    );
    """,
    # 4: (name, type) rather than (type, name): the same uniqueness, and a lookup by name alone
    # is an index range too
    """
    CREATE UNIQUE INDEX secrets_by_name_type
      ON secrets (room, owner, delegated_to, name, type) WHERE name <> '';
    DROP INDEX secrets_by_name;
    """,
    # 5: where a row came from (store/base.py SecretKind); (type, name) is unique per kind, so an
    # answer to a request never clashes with or replaces a secret stored with SetSecret
    """
    ALTER TABLE secrets ADD COLUMN kind TEXT COLLATE "C" NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX secrets_by_kind_name_type
      ON secrets (room, owner, delegated_to, kind, name, type) WHERE name <> '';
    DROP INDEX secrets_by_name_type;
    """,
    # 6: usage counters and caps (see the module docstring). The triggers are created before the
    # counters are filled from the rows already there: CREATE TRIGGER locks out writers (of any
    # replica) until this transaction commits, so no row is missed or counted twice.
    """
    CREATE TABLE secret_usage (
      room TEXT COLLATE "C" NOT NULL,
      owner TEXT COLLATE "C" NOT NULL,
      secrets BIGINT NOT NULL,
      bytes BIGINT NOT NULL,
      PRIMARY KEY (room, owner)
    );
    CREATE TABLE room_usage (
      room TEXT COLLATE "C" PRIMARY KEY,
      secrets BIGINT NOT NULL,
      bytes BIGINT NOT NULL
    );
    CREATE FUNCTION roomsecrets_cap(name TEXT) RETURNS BIGINT LANGUAGE sql STABLE AS $$
      SELECT coalesce(nullif(current_setting('roomsecrets.cap_' || name, true), ''), '0')::BIGINT
    $$;
    CREATE FUNCTION roomsecrets_count(r TEXT, o TEXT, n BIGINT, b BIGINT) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
      room_secrets BIGINT; room_bytes BIGINT; owner_secrets BIGINT; owner_bytes BIGINT;
      cap TEXT;
    BEGIN
      IF r = '' THEN
        RETURN;  -- project records are not counted
      END IF;
      INSERT INTO room_usage AS u (room, secrets, bytes) VALUES (r, n, b)
        ON CONFLICT (room) DO UPDATE SET secrets = u.secrets + n, bytes = u.bytes + b
        RETURNING u.secrets, u.bytes INTO room_secrets, room_bytes;
      INSERT INTO secret_usage AS u (room, owner, secrets, bytes) VALUES (r, o, n, b)
        ON CONFLICT (room, owner) DO UPDATE SET secrets = u.secrets + n, bytes = u.bytes + b
        RETURNING u.secrets, u.bytes INTO owner_secrets, owner_bytes;
      cap := CASE
        WHEN n > 0 AND owner_secrets > nullif(roomsecrets_cap('owner_secrets'), 0) THEN 'owner_secrets'
        WHEN b > 0 AND owner_bytes > nullif(roomsecrets_cap('owner_bytes'), 0) THEN 'owner_bytes'
        WHEN n > 0 AND room_secrets > nullif(roomsecrets_cap('room_secrets'), 0) THEN 'room_secrets'
        WHEN b > 0 AND room_bytes > nullif(roomsecrets_cap('room_bytes'), 0) THEN 'room_bytes'
      END;
      IF cap IS NOT NULL THEN
        RAISE EXCEPTION 'roomsecrets usage cap reached: %', cap;
      END IF;
    END
    $$;
    CREATE FUNCTION roomsecrets_secrets_usage() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN
        PERFORM roomsecrets_count(NEW.room, NEW.owner, 1, NEW.size);
      ELSIF TG_OP = 'DELETE' THEN
        PERFORM roomsecrets_count(OLD.room, OLD.owner, -1, -OLD.size);
      ELSIF NEW.room = OLD.room AND NEW.owner = OLD.owner THEN
        PERFORM roomsecrets_count(NEW.room, NEW.owner, 0, NEW.size - OLD.size);
      ELSE  -- never done by the server, but counted right
        PERFORM roomsecrets_count(OLD.room, OLD.owner, -1, -OLD.size);
        PERFORM roomsecrets_count(NEW.room, NEW.owner, 1, NEW.size);
      END IF;
      RETURN NULL;
    END
    $$;
    CREATE TRIGGER secrets_usage_insert AFTER INSERT ON secrets
      FOR EACH ROW WHEN (NEW.room <> '') EXECUTE FUNCTION roomsecrets_secrets_usage();
    CREATE TRIGGER secrets_usage_delete AFTER DELETE ON secrets
      FOR EACH ROW WHEN (OLD.room <> '') EXECUTE FUNCTION roomsecrets_secrets_usage();
    CREATE TRIGGER secrets_usage_update AFTER UPDATE OF room, owner, size ON secrets
      FOR EACH ROW WHEN ((NEW.room <> '' OR OLD.room <> '')
        AND (NEW.size <> OLD.size OR NEW.room <> OLD.room OR NEW.owner <> OLD.owner))
      EXECUTE FUNCTION roomsecrets_secrets_usage();
    INSERT INTO room_usage (room, secrets, bytes)
      SELECT room, count(*), sum(size) FROM secrets WHERE room <> '' GROUP BY room;
    INSERT INTO secret_usage (room, owner, secrets, bytes)
      SELECT room, owner, count(*), sum(size) FROM secrets WHERE room <> '' GROUP BY room, owner;
    CREATE INDEX requests_pending_by_requester ON requests (room, requested_by) WHERE state = 'pending';
    """,
)
# Any constant: the key of the advisory lock that serialises migrations between replicas.
_MIGRATION_LOCK = 0x726F6F6D73656372  # "roomsecr"
# The first half of the (two-key) advisory lock that serialises storing requests in one room,
# the second being the room's hash: the pending requests counted are those there are.
_PENDING_LOCK = 0x726F6F6D  # "room"
_SECRET_CAPS = ("owner_secrets", "owner_bytes", "room_secrets", "room_bytes")
# Pending requests a requester asked, and a target is asked, in a room (each up to its cap: the
# partial indexes requests_pending_by_requester / _by_target find them).
_COUNT_PENDING = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM requests WHERE room=%(room)s AND requested_by=%(requester)s "
    "AND state='pending' AND deadline > %(now)s LIMIT %(asked)s) AS a), "
    "(SELECT count(*) FROM (SELECT 1 FROM requests WHERE room=%(room)s AND target=%(target)s "
    "AND state='pending' AND deadline > %(now)s LIMIT %(addressed)s) AS b)"
)

_VALUE_COLUMNS = (
    "room, owner, delegated_to, secret_id, type, name, etag, crc32c, size, sealed, update_time, kek_id, kind"
)
_LISTED_COLUMNS = _VALUE_COLUMNS.replace("sealed", "''::bytea AS sealed")  # listings never read values
_REQUEST_COLUMNS = (
    "request_id, room, kind, requested_by, target, url, type, delegate_to, state, reason, created, deadline, "
    "secret_id, params"
)
_KEY = "room=%s AND owner=%s AND delegated_to=%s AND secret_id=%s"
_GET_SECRET = f"SELECT {_VALUE_COLUMNS} FROM secrets WHERE {_KEY}"
_INSERT_SECRET = f"INSERT INTO secrets ({_VALUE_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})"
_UPSERT_SECRET = (
    f"{_INSERT_SECRET} ON CONFLICT (room, owner, delegated_to, secret_id) DO UPDATE SET "
    "type=excluded.type, name=excluded.name, etag=excluded.etag, crc32c=excluded.crc32c, "
    "size=excluded.size, sealed=excluded.sealed, update_time=excluded.update_time, kek_id=excluded.kek_id, "
    "kind=excluded.kind"
)
_UPDATE_SECRET_IF_ETAG = (
    "UPDATE secrets SET type=%s, name=%s, etag=%s, crc32c=%s, size=%s, sealed=%s, update_time=%s, "
    f"kek_id=%s, kind=%s WHERE {_KEY} AND etag=%s"
)

# How long a call waits for a pooled connection before failing with Unavailable: longer while the
# database answers (the pool is merely busy), short once it stopped answering, so that calls fail
# fast during an outage instead of running into their deadlines.
BUSY_WAIT, DOWN_WAIT = 5.0, 0.5

# Connection failures: the database restarting, unreachable, or the pool out of connections.
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


def _values(record: SecretRecord) -> tuple[Any, ...]:
    return (*record.key, *record[1:])  # column order: key, then the rest (sealed before update_time)


async def _put(
    conn: psycopg.AsyncConnection[Any], record: SecretRecord, condition: WriteCondition, caps: UsageCaps
) -> None:
    """Each condition is one statement, so check and write are atomic without a table lock. The
    usage triggers raise if it would pass a cap (the caller's transaction then writes nothing)."""
    k = record.key
    try:
        if condition.etag is not None:
            cur = await conn.execute(
                _UPDATE_SECRET_IF_ETAG,
                (
                    record.type,
                    record.name,
                    record.etag,
                    record.crc32c,
                    record.size,
                    record.sealed,
                    record.update_time,
                    record.kek_id,
                    record.kind,
                    *k,
                    condition.etag,
                ),
            )
            if cur.rowcount != 1:
                await _raise_etag_mismatch(conn, k)
        elif condition.absent:
            await conn.execute(_INSERT_SECRET, _values(record))
        else:
            await conn.execute(_UPSERT_SECRET, _values(record))
    except pg_errors.UniqueViolation as exc:
        if exc.diag.constraint_name == "secrets_pkey":  # only a plain INSERT (absent) can hit it
            raise EtagMismatch(f"secret {k.secret_id!r} already exists") from None
        raise AlreadyExists(
            f"another secret already has type {record.type!r} and name {record.name!r}"
        ) from None
    except pg_errors.RaiseException as exc:
        cap = (exc.diag.message_primary or "").removeprefix(CAP_REACHED)
        if cap not in _SECRET_CAPS:
            raise
        raise caps.refusal(cap, k.room, k.owner) from None


async def _raise_etag_mismatch(conn: psycopg.AsyncConnection[Any], key: SecretKey) -> None:
    cur = await conn.execute(f"SELECT 1 FROM secrets WHERE {_KEY}", key)
    if await cur.fetchone() is None:
        raise EtagMismatch(f"etag does not match: secret {key.secret_id!r} does not exist")
    raise EtagMismatch(f"etag does not match the current version of secret {key.secret_id!r}")


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Apply the migrations this database lacks; returns the schema version now in place."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"the database schema is version {current}, newer than this server knows "
                f"({len(MIGRATIONS)}): upgrade the server"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            await conn.execute(MIGRATIONS[version - 1].encode())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            log.info("database schema migrated to version %d", version)
    return len(MIGRATIONS)


class PostgresStore:
    def __init__(self, url: str, *, min_connections: int = 2, max_connections: int = 10) -> None:
        self.url = url
        # autocommit: a single statement commits by itself; multi-statement writes open an
        # explicit transaction. No statement holds a transaction open across an await elsewhere.
        self._pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=min_connections,
            max_size=max_connections,
            open=False,
            kwargs={"autocommit": True},
            timeout=BUSY_WAIT,
            reconnect_timeout=float("inf"),  # keep trying while the database is away
            name="roomsecrets",
            configure=self._configure,
        )
        self._checking: asyncio.Task[None] | None = None
        self._wait = BUSY_WAIT
        self._caps = NO_CAPS

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Every pooled connection carries the caps, which the usage triggers read."""
        await conn.execute(
            "SELECT " + ", ".join(f"set_config('roomsecrets.cap_{cap}', %s, false)" for cap in _SECRET_CAPS),
            tuple(str(getattr(self._caps, cap)) for cap in _SECRET_CAPS),
        )

    async def open(self, caps: UsageCaps = NO_CAPS) -> None:
        """Connect and migrate; fails (OSError) if the database cannot be reached."""
        self._caps = caps  # before the pool connects: _configure reads it
        try:
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                await migrate(conn)
            await self._pool.open(wait=True, timeout=10.0)
        except CONNECTION_ERRORS as exc:
            raise OSError(f"cannot reach the PostgreSQL database: {_describe(exc)}") from None

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
        await self._pool.close()

    # -- plumbing -----------------------------------------------------------------------------
    def _connection_lost(self, exc: BaseException) -> Unavailable:
        # Other pooled connections are likely dead too (the database restarted): have the pool
        # test its idle ones now instead of failing one call per stale connection.
        self._wait = DOWN_WAIT
        if self._checking is None or self._checking.done():
            self._checking = asyncio.get_running_loop().create_task(self._check_pool())
        return Unavailable(f"the database is unavailable: {_describe(exc)}")

    async def _check_pool(self) -> None:
        try:
            await self._pool.check()
        except Exception:  # best effort; the pool reconnects on its own anyway
            log.debug("pool check failed", exc_info=True)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection in a transaction; commit on success, roll back on any error."""
        try:
            async with self._pool.connection(self._wait) as conn, conn.transaction():
                yield conn
        except CONNECTION_ERRORS as exc:
            raise self._connection_lost(exc) from None
        self._wait = BUSY_WAIT

    async def _read(self, run: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        for attempt in range(2):
            try:
                async with self._pool.connection(self._wait) as conn:
                    result = await run(conn)
                self._wait = BUSY_WAIT
                return result
            except CONNECTION_ERRORS as exc:
                error = self._connection_lost(exc)
                if attempt == 1 or isinstance(exc, psycopg_pool.PoolTimeout):
                    raise error from None
        raise AssertionError("unreachable")

    async def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...] | None:
            cur = await conn.execute(sql, args)
            return await cur.fetchone()

        return await self._read(run)

    async def _all(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async def run(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

        return await self._read(run)

    # For the PostgreSQL notifier's presence rows (tables created by the migrations above).
    async def execute(self, sql: str, args: tuple[Any, ...]) -> int:
        async with self._write() as conn:
            cur = await conn.execute(sql.encode(), args)
            return cur.rowcount

    async def query_one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return await self._one(sql, args)

    # -- secrets ------------------------------------------------------------------------------
    async def get_secret(self, key: SecretKey) -> SecretRecord | None:
        row = await self._one(_GET_SECRET, key)
        return _secret(row) if row else None

    async def find_secrets(
        self, room: str, owner: str, delegated_to: str, kind: str, type_: str, name: str
    ) -> list[SecretRecord]:
        # Two statements, not `(type=%s OR %s='')`, which no index can serve.
        where = "room=%s AND owner=%s AND delegated_to=%s AND kind=%s AND name=%s AND name <> ''"
        args: tuple[str, ...]
        if type_:
            sql, args = f"{where} AND type=%s", (room, owner, delegated_to, kind, name, type_)
        else:
            sql, args = f"{where} ORDER BY type LIMIT 2", (room, owner, delegated_to, kind, name)
        return [
            _secret(r) for r in await self._all(f"SELECT {_VALUE_COLUMNS} FROM secrets WHERE {sql}", args)
        ]

    async def list_secrets(
        self, room: str, identity: str, after: tuple[str, str, str] | None, limit: int
    ) -> list[SecretRecord]:
        pages = []
        for sql, args in listing_queries(_LISTED_COLUMNS, room, identity, after, limit):
            pages.append([_secret(r) for r in await self._all(sql.replace("?", "%s"), args)])
        return merge_listing(pages, limit)

    async def list_owned(self, room: str, owner: str, type_: str, limit: int) -> list[SecretRecord]:
        rows = await self._all(
            f"SELECT {_VALUE_COLUMNS} FROM secrets "
            "WHERE room=%s AND owner=%s AND delegated_to='' AND type=%s ORDER BY secret_id LIMIT %s",
            (room, owner, type_, limit),
        )
        return [_secret(r) for r in rows]

    async def put_secret(self, record: SecretRecord, condition: WriteCondition) -> None:
        async with self._write() as conn:
            await _put(conn, record, condition, self._caps)

    async def delete_secret(self, key: SecretKey, condition: WriteCondition) -> bool:
        async with self._write() as conn:
            if condition.etag is None:
                cur = await conn.execute(f"DELETE FROM secrets WHERE {_KEY}", key)
                return cur.rowcount > 0
            cur = await conn.execute(f"DELETE FROM secrets WHERE {_KEY} AND etag=%s", (*key, condition.etag))
            if cur.rowcount != 1:
                await _raise_etag_mismatch(conn, key)
            return True

    async def delete_answers(
        self, room: str, identity: str, delegated_to: str, type_: str, name: str
    ) -> list[SecretKey]:
        deleted = "RETURNING room, owner, delegated_to, secret_id"
        async with self._write() as conn:  # one transaction
            # Owned (secrets_by_kind_name_type), then, if it is the delegation asked for, delegated
            # to the caller (secrets_by_delegate): an OR of the two would scan the whole room.
            cur = await conn.execute(
                "DELETE FROM secrets WHERE room=%s AND owner=%s AND delegated_to=%s AND kind='answer' "
                f"AND name=%s AND type=%s {deleted}",
                (room, identity, delegated_to, name, type_),
            )
            rows = await cur.fetchall()
            if delegated_to == identity:
                cur = await conn.execute(
                    "DELETE FROM secrets WHERE room=%s AND delegated_to=%s AND delegated_to <> '' "
                    f"AND kind='answer' AND name=%s AND type=%s {deleted}",
                    (room, delegated_to, name, type_),
                )
                rows += await cur.fetchall()
            return sorted({SecretKey(*row) for row in rows})

    async def usage(self, room: str, owner: str | None = None) -> Usage:
        if owner is None:
            row = await self._one("SELECT secrets, bytes FROM room_usage WHERE room=%s", (room,))
        else:
            row = await self._one(
                "SELECT secrets, bytes FROM secret_usage WHERE room=%s AND owner=%s", (room, owner)
            )
        return Usage(int(row[0]), int(row[1])) if row else Usage(0, 0)

    # -- requests -----------------------------------------------------------------------------
    async def create_request(self, record: RequestRecord) -> None:
        r = record
        caps = self._caps
        async with self._write() as conn:
            if caps.pending_asked or caps.pending_addressed:
                # Held until commit, on every replica: no request of this room is stored between
                # the count and the insert.
                await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_PENDING_LOCK, r.room))
                cur = await conn.execute(
                    _COUNT_PENDING,
                    {
                        "room": r.room,
                        "requester": r.requested_by,
                        "target": r.target,
                        "now": r.created,
                        "asked": caps.pending_asked,
                        "addressed": caps.pending_addressed,
                    },
                )
                asked, addressed = await cur.fetchone() or (0, 0)
                if caps.pending_asked and asked >= caps.pending_asked:
                    raise caps.refusal("pending_asked", r.room, r.requested_by)
                if caps.pending_addressed and addressed >= caps.pending_addressed:
                    raise caps.refusal("pending_addressed", r.room, r.target)
            await conn.execute(
                f"INSERT INTO requests ({_REQUEST_COLUMNS}) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
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

    async def get_request(self, request_id: str) -> RequestRecord | None:
        row = await self._one(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE request_id=%s", (request_id,))
        return _request(row) if row else None

    async def find_pending_request(
        self, room: str, requested_by: str, target: str, kind: str, url: str, type_: str, delegate_to: str
    ) -> RequestRecord | None:
        row = await self._one(
            f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE room=%s AND target=%s AND state='pending' "
            "AND requested_by=%s AND kind=%s AND url=%s AND type=%s AND delegate_to=%s AND deadline > %s "
            "ORDER BY created LIMIT 1",
            (room, target, requested_by, kind, url, type_, delegate_to, time.time()),
        )
        return _request(row) if row else None

    async def pending_requests_for(self, room: str, target: str, now: float) -> list[RequestRecord]:
        rows = await self._all(
            f"SELECT {_REQUEST_COLUMNS} FROM requests "
            "WHERE room=%s AND target=%s AND state='pending' AND deadline > %s ORDER BY created",
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
        async with self._write() as conn:
            cur = await conn.execute(
                "UPDATE requests SET state=%s, reason=%s, secret_id=%s "
                "WHERE request_id=%s AND state='pending'",
                (state.value, reason, secret.key.secret_id if secret else "", request_id),
            )
            if cur.rowcount != 1:
                return False
            if secret is not None:
                # Raising (a clash, a cap) rolls back the transition too.
                await _put(conn, secret, secret_condition, self._caps)
            return True

    async def expire_due(self, now: float) -> list[RequestRecord]:
        async with self._write() as conn:
            cur = await conn.execute(
                "UPDATE requests SET state='expired', reason='timed out' "
                f"WHERE state='pending' AND deadline <= %s RETURNING {_REQUEST_COLUMNS}",
                (now,),
            )
            return [_request(r) for r in await cur.fetchall()]

    # -- leases -------------------------------------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        now = time.time()
        async with self._write() as conn:
            cur = await conn.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (%s,%s,%s) "
                "ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, expires=excluded.expires "
                "WHERE leases.expires <= %s OR leases.holder = excluded.holder",
                (name, holder, now + ttl, now),
            )
            return cur.rowcount == 1

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._write() as conn:
            await conn.execute("DELETE FROM leases WHERE name=%s AND holder=%s", (name, holder))

    # -- key rotation -------------------------------------------------------------------------
    async def sealed_not_under(self, root_id: str, limit: int) -> list[tuple[SecretKey, bytes]]:
        prefix = f"{root_id}.g"
        rows = await self._all(
            "SELECT room, owner, delegated_to, secret_id, sealed FROM secrets "
            "WHERE kek_id <> %s AND substr(kek_id, 1, %s) <> %s LIMIT %s",
            (root_id, len(prefix), prefix, limit),
        )
        return [(SecretKey(r[0], r[1], r[2], r[3]), bytes(r[4])) for r in rows]

    async def kek_samples(self) -> dict[str, bytes]:
        # One index probe per distinct key (a few), not a pass over every value's index entry.
        samples: dict[str, bytes] = {}
        while row := await self._one(
            "SELECT kek_id, sealed FROM secrets WHERE kek_id > %s ORDER BY kek_id LIMIT 1",
            (max(samples, default=""),),
        ):
            samples[str(row[0])] = bytes(row[1])
        return samples

    async def reserve_wraps(self, kek_id: str, count: int) -> int:
        async with self._write() as conn:
            cur = await conn.execute(
                "INSERT INTO kek_wraps (kek_id, wraps) VALUES (%s, %s) "
                "ON CONFLICT (kek_id) DO UPDATE SET wraps = kek_wraps.wraps + excluded.wraps RETURNING wraps",
                (kek_id, count),
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    async def wrap_counts(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in await self._all("SELECT kek_id, wraps FROM kek_wraps", ())}

    async def replace_sealed(self, key: SecretKey, old: bytes, new: bytes, kek_id: str) -> bool:
        async with self._write() as conn:
            cur = await conn.execute(
                f"UPDATE secrets SET sealed=%s, kek_id=%s WHERE {_KEY} AND sealed=%s",
                (new, kek_id, *key, old),
            )
            return cur.rowcount == 1


def _describe(exc: BaseException) -> str:
    """The kind of failure, never the connection string or server text (which may hold a password)."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return "no database connection became free in time"
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}{f' (SQLSTATE {sqlstate})' if sqlstate else ''}"
