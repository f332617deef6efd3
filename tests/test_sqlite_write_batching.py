"""The SQLite store's batched commits and its write-through record cache.

Writes arriving together share one commit (fewer transactions than writes, every write on disk
before its call returns), a lone write does not wait out the window, and the records our own
commits wrote are served from the cache only while no other connection has committed since. The
transaction count is read where SQLite itself keeps it: the change counter of the WAL-index
header in `<db>-shm` (https://www.sqlite.org/walformat.html).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.batching import GroupWindow
from roomsecrets_server.errors import EtagMismatch
from roomsecrets_server.store import ABSENT, ANY, SecretKey, SecretRecord, WriteCondition
from roomsecrets_server.store import sqlite as sqlite_store
from roomsecrets_server.store.sqlite import SqliteStore

from .harness import Participants

pytestmark = pytest.mark.sqlite_only


@contextlib.asynccontextmanager
async def opened(db: Path, group_window: float = 0.01) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(db, group_window=group_window)
    try:
        yield store
    finally:
        await store.close()


def commits(db: Path) -> int:
    """Transactions committed so far (the WAL-index header's change counter)."""
    with open(f"{db}-shm", "rb") as shm:
        return int.from_bytes(shm.read(12)[8:12], sys.byteorder)


def record(secret_id: str, etag: str, value: bytes = b"sealed", room: str = "p/r") -> SecretRecord:
    return SecretRecord(
        key=SecretKey(room, "alice", "", secret_id),
        type="api-key",
        name="",
        etag=etag,
        crc32c=0,
        size=len(value),
        sealed=value,
        update_time=1.5,
        kek_id="k1",
    )


def read_directly(db: Path, key: SecretKey) -> tuple[str, bytes] | None:
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT etag, sealed FROM secrets WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?",
            tuple(key),
        ).fetchone()
    return (row[0], bytes(row[1])) if row else None


def statements(store: SqliteStore) -> list[str]:
    """Every statement the store's read connection runs from now on."""
    seen: list[str] = []
    store._read.set_trace_callback(seen.append)
    return seen


async def staggered_puts(store: SqliteStore, records: list[SecretRecord], gap: float) -> None:
    """Each write from its own task, started `gap` seconds apart: arriving in different event-loop
    iterations, as calls from gRPC do."""

    async def put(i: int) -> None:
        await asyncio.sleep(i * gap)
        await store.put_secret(records[i], ABSENT)

    await asyncio.gather(*(put(i) for i in range(len(records))))


async def test_writes_arriving_together_share_one_commit_and_are_each_on_disk(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    window = 0.5
    async with opened(db, window) as store:
        alone = [record(f"alone{i}", "e") for i in range(GroupWindow.LEARN_EVERY - 1)]
        start = commits(db)
        for r in alone:  # one at a time: each commits at once, on its own
            await store.put_secret(r, ABSENT)
        assert commits(db) - start == len(alone)
        # The next batch runs its full window: 8 writes arriving 5 ms apart share one commit.
        together = [record(f"together{i}", "e") for i in range(8)]
        start = commits(db)
        await staggered_puts(store, together, gap=0.005)
        assert commits(db) - start == 1
        # It learned that 8 arrive together: the next 8 commit as soon as the 8th is in.
        again = [record(f"again{i}", "e") for i in range(8)]
        start, began = commits(db), time.monotonic()
        await staggered_puts(store, again, gap=0.005)
        assert time.monotonic() - began < window / 2
        assert commits(db) - start == 1
        for r in alone + together + again:  # every acknowledged write is committed
            assert read_directly(db, r.key) == (r.etag, r.sealed)


async def test_a_lone_write_does_not_wait_out_the_window(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    async with opened(db, 3600) as store:  # a wait would time the test out
        for i in range(10):
            await asyncio.wait_for(store.put_secret(record(f"s{i}", "e"), ABSENT), timeout=30)
            assert read_directly(db, record(f"s{i}", "e").key) is not None


async def test_a_failing_write_in_a_batch_fails_alone(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    async with opened(db, 0.05) as store:
        await store.put_secret(record("taken", "e0"), ABSENT)
        outcomes = await asyncio.gather(
            store.put_secret(record("a", "e1"), ABSENT),
            store.put_secret(record("taken", "e2"), ABSENT),  # exists: refused
            store.put_secret(record("b", "e3"), ABSENT),
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], EtagMismatch)
        assert read_directly(db, record("taken", "").key) == ("e0", b"sealed")
        assert read_directly(db, record("a", "").key) == ("e1", b"sealed")
        # The cache holds only what succeeded.
        got = await store.get_secret(record("taken", "").key)
        assert got is not None and got.etag == "e0"


async def test_our_own_writes_are_read_back_from_the_cache(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    async with opened(db) as store:
        first = record("s", "e1")
        assert await store.get_secret(first.key) is None  # the cache has looked at the database
        ran = statements(store)
        await store.put_secret(first, ABSENT)
        assert await store.get_secret(first.key) == first
        second = record("s", "e2", b"newer")
        await store.put_secret(second, WriteCondition(etag="e1"))
        assert await store.get_secret(second.key) == second
        assert ran == [], ran  # both answered without a statement
        assert await store.delete_secret(second.key, ANY)
        assert await store.get_secret(second.key) is None  # dropped from the cache, not stale


async def test_another_connections_commit_empties_the_cache(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    async with opened(db) as store:
        ours = record("s", "ours")
        await store.put_secret(ours, ABSENT)
        assert await store.get_secret(ours.key) == ours
        with closing(sqlite3.connect(db)) as other:
            other.execute("UPDATE secrets SET etag='theirs', sealed=x'00' WHERE secret_id='s'")
            other.commit()
        got = await store.get_secret(ours.key)
        assert got is not None and (got.etag, got.sealed) == ("theirs", b"\x00")
        # And a write of ours after theirs is cached on top of what they wrote.
        after = record("s", "ours-again")
        await store.put_secret(after, WriteCondition(etag="theirs"))
        assert await store.get_secret(after.key) == after


def header(counter: int, salt: int = 0) -> bytes:
    raw = bytearray(48)
    raw[8:12] = counter.to_bytes(4, sys.byteorder)
    raw[40:48] = salt.to_bytes(8, "big")  # anything else in the header
    return bytes(raw)


class FakeWatch:
    def __init__(self, now: bytes) -> None:
        self.now = now

    def header(self) -> bytes:
        return self.now

    def version(self) -> object:
        return self.now


def cache_at(now: bytes) -> tuple[sqlite_store._RecordCache, FakeWatch]:
    watch = FakeWatch(now)
    cache = sqlite_store._RecordCache(watch)  # type: ignore[arg-type]
    assert cache.usable()  # first look: empty and current
    return cache, watch


def test_record_cache_takes_in_only_a_commit_that_was_provably_ours() -> None:
    """The rules, one case each, with headers whose change counter is set by hand."""
    old, new = record("a", "e1"), record("a", "e2")
    cases = {
        # (header the reader last saw, before, after, header now): taken in?
        "ours alone": (header(5), header(5), header(6), header(6), True),
        "counter +2: another commit slipped in before `after` was read": (
            header(5),
            header(5),
            header(7),
            header(7),
            False,
        ),
        "reader saw something else before our BEGIN": (header(4), header(5), header(6), header(6), False),
        "another commit after ours": (header(5), header(5), header(6), header(7, salt=1), False),
        "reader already at `after`": (header(5), header(5), header(6), header(6), True),
        "counter wraps": (header(2**32 - 1), header(2**32 - 1), header(0), header(0), True),
    }
    for name, (seen, before, after, now, taken) in cases.items():
        cache, watch = cache_at(seen)
        cache.store(old.key, old)
        if name == "reader already at `after`":
            watch.now = after
            assert cache.usable()  # saw the change first: emptied at `after`
        commit = cache.begin(before, [(new.key, new)])
        commit.committed(after)
        watch.now = now
        cache.settle()
        usable = cache.usable()
        assert usable, name
        assert cache.lookup(new.key) == (new if taken else None), name


def test_record_cache_reads_around_an_unreported_commit_and_never_takes_a_failed_one() -> None:
    old, new = record("a", "e1"), record("a", "e2")
    cache, watch = cache_at(header(5))
    cache.store(old.key, old)
    commit = cache.begin(header(5), [(new.key, new)])
    watch.now = header(6)  # COMMIT done, the writer has not reported yet
    assert not cache.usable()  # read the database this once, keep the cache
    commit.committed(header(6))
    assert cache.usable() and cache.lookup(new.key) == new

    cache, watch = cache_at(header(5))
    cache.store(old.key, old)
    commit = cache.begin(header(5), [(new.key, new)])
    commit.committed(None)  # COMMIT failed; someone else committed instead
    watch.now = header(6)
    assert cache.usable() and cache.lookup(old.key) is None  # emptied

    cache, watch = cache_at(header(5))
    cache.store(old.key, old)
    commit = cache.begin(header(5), None)  # effects not known (a delete by name, say)
    commit.committed(header(6))
    watch.now = header(6)
    assert cache.usable() and cache.lookup(old.key) is None


FOREIGN_WRITER = """
import random, sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
rng = random.Random(int(sys.argv[2]))
deadline = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < deadline:
    n += 1
    conn.execute(
        "UPDATE secrets SET etag=?, sealed=? WHERE secret_id=?",
        (f"theirs-{n}", b"theirs", f"s{rng.randrange(8)}"),
    )
    time.sleep(rng.random() / 500)
print(n)
"""


async def test_the_cache_never_serves_a_row_older_than_the_last_commit_under_a_foreign_writer(
    tmp_path: Path,
) -> None:
    """Our batched writes and another process's commits interleave at random; whenever a read
    starts after both sides have stopped writing, it must see the database's row."""
    db = tmp_path / "db.sqlite"
    rng = random.Random(7)
    async with opened(db, 0.002) as store:
        keys = [record(f"s{i}", "e0").key for i in range(8)]
        for i in range(8):
            await store.put_secret(record(f"s{i}", "e0"), ABSENT)
        for round_ in range(6):
            other = subprocess.Popen(
                [sys.executable, "-c", FOREIGN_WRITER, str(db), str(round_), "0.4"],
                stdout=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 0.4
            n = 0
            while time.monotonic() < deadline:
                n += 1
                batch = [
                    store.put_secret(record(f"s{rng.randrange(8)}", f"ours-{round_}-{n}-{j}", b"ours"), ANY)
                    for j in range(rng.randrange(1, 6))
                ]
                reads = [store.get_secret(rng.choice(keys)) for _ in range(3)]
                await asyncio.gather(*batch, *reads)
            out, _ = other.communicate(timeout=60)
            assert other.returncode == 0 and int(out) > 0
            for key in keys:  # both sides quiet: every read is the database's row
                got = await store.get_secret(key)
                assert got is not None
                assert (got.etag, got.sealed) == read_directly(db, key), (round_, key)


def test_concurrent_set_secret_calls_are_each_durable_and_read_back(room: Participants) -> None:
    """Through the API: 32 callers at once, each write acknowledged is on disk and read back."""
    db = room.server.settings.database_path
    start = commits(db)

    def put(i: int) -> str:
        reply = room.stub.SetSecret(
            pb.SetSecretRequest(secret_id=f"k{i}", type="api-key", data=f"value-{i}".encode()),
            metadata=room.auth("alice"),
        )
        return str(reply.secret.etag)

    with ThreadPoolExecutor(32) as pool:
        etags = list(pool.map(put, range(32)))
    assert commits(db) - start <= 32  # never more transactions than writes (here usually fewer)
    for i, etag in enumerate(etags):
        got = room.stub.GetSecret(pb.GetSecretRequest(secret_id=f"k{i}"), metadata=room.auth("alice"))
        assert (got.data, got.secret.etag) == (f"value-{i}".encode(), etag)
