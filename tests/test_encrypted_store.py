"""The encrypted store (SPEC §3): no plaintext at rest, private key files, ciphertext bound to its
place, tamper detection, durability across restarts, and online re-wrapping after key rotation."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.app import open_store
from roomsecrets_server.auth.principal import room_scope
from roomsecrets_server.config import Settings
from roomsecrets_server.crypto.envelope import Envelope
from roomsecrets_server.crypto.keyring import KeyringFile
from roomsecrets_server.secrets.rewrap import rewrap_all

from .harness import Participants, ServerThread, test_settings


class Servers:
    """Starts servers on a data dir; stops whichever are still running at the end of the test."""

    def __init__(self, data_dir: Path, database_url: str) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self._running: list[tuple[ServerThread, Participants]] = []

    def start(self, room: str = "room-1") -> Participants:
        server = ServerThread(test_settings(self.data_dir, database_url=self.database_url)).start()
        participants = Participants(server, room=room)
        self._running.append((server, participants))
        return participants

    def stop(self, participants: Participants) -> None:
        for entry in list(self._running):
            if entry[1] is participants:
                self._running.remove(entry)
                entry[1].close()
                entry[0].stop()
                return
        raise AssertionError("not a running server")

    def stop_all(self) -> None:
        while self._running:
            self.stop(self._running[-1][1])


@pytest.fixture
def servers(data_dir: Path, database_url: str) -> Iterator[Servers]:
    running = Servers(data_dir, database_url)
    yield running
    running.stop_all()


def fails(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    return err


class Database:
    """Direct access to the rows behind the server's back (the attacker with database access),
    on whichever store the test runs: SQL is written with `?` placeholders for both."""

    def __init__(self, data_dir: Path, url: str) -> None:
        self.data_dir, self.url = data_dir, url

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        if self.url:
            with psycopg.connect(self.url) as conn:
                return [
                    tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                    for row in conn.execute(sql.replace("?", "%s").encode(), args)
                ]
        with closing(sqlite3.connect(self.data_dir / "roomsecrets.db", timeout=10)) as conn:
            return conn.execute(sql, args).fetchall()

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> int:
        if self.url:
            with psycopg.connect(self.url, autocommit=True) as conn:
                return conn.execute(sql.replace("?", "%s").encode(), args).rowcount
        with closing(sqlite3.connect(self.data_dir / "roomsecrets.db", timeout=10)) as conn:
            with conn:
                cur = conn.execute(sql, args)
            return cur.rowcount


@pytest.fixture
def db(data_dir: Path, database_url: str) -> Database:
    return Database(data_dir, database_url)


def forms(value: bytes) -> list[bytes]:
    """The value and the encodings a careless store or log might write it in."""
    out = [
        value,
        base64.b64encode(value),
        base64.urlsafe_b64encode(value),
        base64.b64encode(value).rstrip(b"="),
        value.hex().encode(),
        value.hex().upper().encode(),
    ]
    # A prefix long enough to be unmistakable, in case a value is split or truncated.
    if len(value) > 24:
        out.append(value[:24])
    return out


def scan(data_dir: Path, values: list[bytes]) -> list[str]:
    """Where any of `values` (in any form) appears in any file under the data dir."""
    hits: list[str] = []
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert files, "no files in the data dir"
    for path in files:
        content = path.read_bytes()
        for value in values:
            for form in forms(value):
                if form in content:
                    hits.append(f"{path.name}: {form[:40]!r}")
    return hits


def set_secret(room: Participants, md: tuple[tuple[str, str], ...], **fields: object) -> pb.SecretInfo:
    response: pb.SetSecretResponse = room.stub.SetSecret(pb.SetSecretRequest(**fields), metadata=md)  # type: ignore[arg-type]
    return response.secret


def get_data(room: Participants, md: tuple[tuple[str, str], ...], secret_id: str, **fields: str) -> bytes:
    return bytes(room.stub.GetSecret(pb.GetSecretRequest(secret_id=secret_id, **fields), metadata=md).data)


# -- no plaintext at rest -----------------------------------------------------------------------------
@pytest.mark.sqlite_only  # PostgreSQL: tests/test_postgres_store.py greps pg_dump instead
def test_data_dir_holds_no_plaintext(servers: Servers, data_dir: Path) -> None:
    room = servers.start()
    alice = room.auth("alice")
    text_marker = f"MARKER{secrets.token_hex(16)}".encode()
    binary_marker = secrets.token_bytes(48)
    replaced_marker = f"OLDVALUE{secrets.token_hex(16)}".encode()
    values = [text_marker, binary_marker, replaced_marker]

    set_secret(room, alice, secret_id="by-id", type="text/plain", data=text_marker)
    set_secret(room, alice, type="git", name="https://example.com/r.git", data=binary_marker)
    set_secret(room, alice, secret_id="delegated", data=text_marker + b"-d", delegated_to="bob")
    set_secret(
        room, room.auth("installer", admin=True), secret_id="svc", data=binary_marker, for_identity="svc"
    )
    # A replaced (old) version must not linger in plaintext either.
    set_secret(room, alice, secret_id="replaced", data=replaced_marker)
    set_secret(room, alice, secret_id="replaced", data=b"new value")
    assert get_data(room, alice, "by-id") == text_marker
    assert get_data(room, room.auth("bob"), "delegated", delegated_by="alice") == text_marker + b"-d"

    # While running (WAL and shared memory files present) ...
    assert scan(data_dir, values) == []
    # ... and after a clean stop.
    servers.stop(room)
    assert scan(data_dir, values) == []
    assert (data_dir / "roomsecrets.db").exists()


def test_audit_log_records_actions_but_never_values(servers: Servers, data_dir: Path) -> None:
    room = servers.start()
    alice = room.auth("alice")
    marker = f"AUDITMARK{secrets.token_hex(16)}".encode()
    set_secret(room, alice, secret_id="audited", data=marker)
    assert get_data(room, alice, "audited") == marker
    room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="audited"), metadata=alice)
    # A refused check-and-set and a refused write carrying the value are audited or not, never leaked.
    fails(
        lambda: set_secret(room, alice, secret_id="audited", data=marker, etag="0000000000000000"),
        grpc.StatusCode.ABORTED,
    )
    token = room.token("alice")
    servers.stop(room)

    log = data_dir / "audit.log"
    content = log.read_bytes()
    for form in forms(marker):
        assert form not in content
    assert token.encode() not in content
    assert token.split(".")[2].encode() not in content  # not even the signature
    entries = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
    actions = [(e["action"], e.get("secret_id"), e["actor"], e["room"]) for e in entries]
    assert ("set_secret", "audited", "alice", ROOM_1) in actions
    assert ("get_secret", "audited", "alice", ROOM_1) in actions
    assert ("delete_secret", "audited", "alice", ROOM_1) in actions


def test_key_files_are_private(servers: Servers, data_dir: Path) -> None:
    room = servers.start()
    set_secret(room, room.auth("alice"), secret_id="s", data=b"v")  # also mints with the dev key
    for name in ("keyring.json", "signing-key.json"):
        mode = stat.S_IMODE((data_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"


def test_server_refuses_a_keyring_readable_by_others(data_dir: Path, servers: Servers) -> None:
    room = servers.start()
    servers.stop(room)
    (data_dir / "keyring.json").chmod(0o644)
    with pytest.raises(PermissionError):
        ServerThread(test_settings(data_dir, database_url=servers.database_url)).start()


# -- ciphertext bound to its place --------------------------------------------------------------------
# Rows are keyed by the room qualified by its project (auth/principal.py room_scope).
ROOM_1 = room_scope("dev-project", "room-1")
ROOM_2 = room_scope("dev-project", "room-2")


def copy_row(db: Database, source: tuple[str, str, str, str], target: tuple[str, str, str, str]) -> None:
    """Copy the sealed value (and what its associated data covers) from one row onto another."""
    rows = db.query(
        "SELECT sealed, etag, type, kek_id FROM secrets "
        "WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?",
        source,
    )
    assert len(rows) == 1
    changed = db.execute(
        "UPDATE secrets SET sealed=?, etag=?, type=?, kek_id=? "
        "WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?",
        (*rows[0], *target),
    )
    assert changed == 1


def assert_data_loss(err: grpc.RpcError, *values: bytes) -> None:
    """A DATA_LOSS that says what went wrong (not a bare "internal error") and never the value."""
    message = err.details() or ""
    assert message.strip() and message.lower() != "internal error", message
    assert "stored" in message.lower() or "integrity" in message.lower(), message
    for value in values:
        assert value.decode(errors="replace") not in message
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    reasons = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reasons.append(info.reason)
    assert reasons and all(reasons), "DATA_LOSS carries no google.rpc.ErrorInfo reason"


def test_ciphertext_copied_to_another_rooms_row_fails_to_open(
    servers: Servers, data_dir: Path, db: Database
) -> None:
    room1 = servers.start("room-1")
    room2 = Participants(room1.server, room="room-2")
    try:
        v1 = f"room-1-{secrets.token_hex(8)}".encode()
        v2 = f"room-2-{secrets.token_hex(8)}".encode()
        set_secret(room1, room1.auth("alice"), secret_id="shared", type="text/plain", data=v1)
        set_secret(room2, room2.auth("alice"), secret_id="shared", type="text/plain", data=v2)
    finally:
        room2.close()
    servers.stop(room1)

    copy_row(db, (ROOM_1, "alice", "", "shared"), (ROOM_2, "alice", "", "shared"))

    room1 = servers.start("room-1")
    room2 = Participants(room1.server, room="room-2")
    try:
        err = fails(
            lambda: get_data(room2, room2.auth("alice"), "shared"),
            grpc.StatusCode.DATA_LOSS,
        )
        assert_data_loss(err, v1, v2)
        # The server keeps serving: the original still opens, new writes work, also in room-2.
        assert get_data(room1, room1.auth("alice"), "shared") == v1
        set_secret(room1, room1.auth("alice"), secret_id="after", data=b"fresh")
        assert get_data(room1, room1.auth("alice"), "after") == b"fresh"
        set_secret(room2, room2.auth("alice"), secret_id="shared", data=b"overwritten")
        assert get_data(room2, room2.auth("alice"), "shared") == b"overwritten"
    finally:
        room2.close()


@pytest.mark.parametrize(
    ("target", "reader"),
    [
        ((ROOM_1, "bob", "", "s"), "bob"),  # another owner
        ((ROOM_1, "alice", "", "other-id"), "alice"),  # another id
        ((ROOM_1, "alice", "carol", "s"), "alice"),  # another delegation
    ],
)
def test_ciphertext_copied_to_another_place_in_the_room_fails_to_open(
    servers: Servers, data_dir: Path, db: Database, target: tuple[str, str, str, str], reader: str
) -> None:
    room = servers.start()
    value = f"alice-{secrets.token_hex(8)}".encode()
    set_secret(room, room.auth("alice"), secret_id="s", type="text/plain", data=value)
    _, owner, delegated_to, secret_id = target
    set_secret(
        room,
        room.auth(owner),
        secret_id=secret_id,
        type="text/plain",
        data=b"placeholder",
        delegated_to=delegated_to,
    )
    copy_row(db, (ROOM_1, "alice", "", "s"), target)  # the running server sees it at once
    err = fails(
        lambda: get_data(room, room.auth(reader), secret_id, delegated_to=delegated_to),
        grpc.StatusCode.DATA_LOSS,
    )
    assert_data_loss(err, value)
    assert get_data(room, room.auth("alice"), "s") == value


def _flip(index: int, mask: int = 0x01) -> Callable[[bytes], bytes]:
    def change(sealed: bytes) -> bytes:
        raw = bytearray(sealed)
        raw[index] ^= mask
        return bytes(raw)

    return change


def _truncate(length: int) -> Callable[[bytes], bytes]:
    return lambda sealed: sealed[:length]


TAMPERING: dict[str, Callable[[bytes], bytes]] = {
    "flip-last-byte": _flip(-1),
    "flip-ciphertext": _flip(-20),
    "flip-value-nonce": _flip(-30),
    "flip-wrapped-key": _flip(40),
    "flip-version": _flip(0),
    "flip-kek-id-char": _flip(2),
    "flip-kek-id-high-bit": _flip(2, 0x80),
    "flip-kek-id-length": _flip(1),
    "flip-kek-id-length-high-bit": _flip(1, 0x80),
    "truncate-to-empty": _truncate(0),
    "truncate-to-1": _truncate(1),
    "truncate-to-10": _truncate(10),
    "truncate-header": _truncate(30),
    "drop-last-byte": _truncate(-1),
    "drop-tag": _truncate(-16),
    "append-byte": lambda sealed: sealed + b"\x00",
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampered_sealed_blob_is_data_loss(servers: Servers, data_dir: Path, db: Database, how: str) -> None:
    room = servers.start()
    alice = room.auth("alice")
    value = f"tamper-{secrets.token_hex(16)}".encode()
    set_secret(room, alice, secret_id="victim", data=value)
    set_secret(room, alice, secret_id="bystander", data=b"fine")
    (sealed,) = db.query("SELECT sealed FROM secrets WHERE secret_id='victim'")[0]
    assert isinstance(sealed, bytes)
    tampered = TAMPERING[how](sealed)
    assert tampered != sealed
    assert db.execute("UPDATE secrets SET sealed=? WHERE secret_id='victim'", (tampered,)) == 1

    err = fails(lambda: get_data(room, alice, "victim"), grpc.StatusCode.DATA_LOSS)
    assert_data_loss(err, value)
    # Still serving.
    assert get_data(room, alice, "bystander") == b"fine"
    set_secret(room, alice, secret_id="victim", data=b"repaired")
    assert get_data(room, alice, "victim") == b"repaired"


@pytest.mark.parametrize(("column", "new_value"), [("etag", "0123456789abcdef"), ("type", "text/html")])
def test_changed_associated_data_column_is_data_loss(
    servers: Servers, data_dir: Path, db: Database, column: str, new_value: str
) -> None:
    room = servers.start()
    alice = room.auth("alice")
    value = f"aad-{secrets.token_hex(16)}".encode()
    set_secret(room, alice, secret_id="victim", type="text/plain", data=value)
    assert db.execute(f"UPDATE secrets SET {column}=? WHERE secret_id='victim'", (new_value,)) == 1  # noqa: S608
    err = fails(lambda: get_data(room, alice, "victim"), grpc.StatusCode.DATA_LOSS)
    assert_data_loss(err, value)


def test_a_row_changed_by_another_connection_is_never_served_from_the_read_cache(
    servers: Servers, data_dir: Path, db: Database
) -> None:
    """The server keeps recently read sealed rows; a commit by any other connection (here a
    direct write to the database file) must be seen by the very next read."""
    room = servers.start()
    alice = room.auth("alice")
    set_secret(room, alice, secret_id="cached", data=b"first")
    for _ in range(3):  # read repeatedly so the row is certainly cached
        assert get_data(room, alice, "cached") == b"first"
    assert db.execute("UPDATE secrets SET etag='0123456789abcdef' WHERE secret_id='cached'") == 1
    fails(lambda: get_data(room, alice, "cached"), grpc.StatusCode.DATA_LOSS)
    assert db.execute("DELETE FROM secrets WHERE secret_id='cached'") == 1
    fails(lambda: get_data(room, alice, "cached"), grpc.StatusCode.NOT_FOUND)


# -- durability ---------------------------------------------------------------------------------------
def test_acknowledged_values_survive_a_restart(servers: Servers, data_dir: Path) -> None:
    room = servers.start()
    alice = room.auth("alice")
    written: dict[str, tuple[bytes, str]] = {}
    for i in range(20):
        value = secrets.token_bytes(64 + i)
        info = set_secret(room, alice, secret_id=f"d{i}", data=value)
        written[f"d{i}"] = (value, info.etag)
    named = set_secret(room, alice, type="git", name="https://example.com/x.git", data=b"named")
    deleted = set_secret(room, alice, secret_id="deleted", data=b"bye")
    room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="deleted", etag=deleted.etag), metadata=alice)
    servers.stop(room)

    room = servers.start()
    alice = room.auth("alice")
    for secret_id, (value, etag) in written.items():
        got = room.stub.GetSecret(pb.GetSecretRequest(secret_id=secret_id), metadata=alice)
        assert got.data == value
        assert got.secret.etag == etag
    assert get_data(room, alice, "", type="git", name="https://example.com/x.git") == b"named"
    assert not room.stub.Exists(pb.ExistsRequest(secret_id="deleted"), metadata=alice).exists
    listed = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=alice)
    assert {s.id for s in listed.secrets} == {*written, named.id}


# -- rotation and rewrap ------------------------------------------------------------------------------
def rewrap(db: Database) -> int:
    async def run() -> int:
        store, _ = open_store(Settings(data_dir=db.data_dir, database_url=db.url))
        await store.open()
        try:
            return await rewrap_all(store, KeyringFile(db.data_dir / "keyring.json"))
        finally:
            await store.close()

    return asyncio.run(run())


def kek_ids(db: Database) -> tuple[set[object], set[str]]:
    """(kek_id column values, kek ids found in the sealed blobs' headers)."""
    rows = db.query("SELECT kek_id, sealed FROM secrets")
    return {r[0] for r in rows}, {Envelope.kek_id_of(bytes(r[1])) for r in rows if isinstance(r[1], bytes)}


def active_kek(data_dir: Path) -> str:
    return str(json.loads((data_dir / "keyring.json").read_text())["active"])


def write_some(room: Participants, count: int) -> dict[tuple[str, str], bytes]:
    written: dict[tuple[str, str], bytes] = {}
    for i in range(count):
        identity = "alice" if i % 2 else "bob"
        value = f"rw-{i}-{secrets.token_hex(8)}".encode()
        set_secret(room, room.auth(identity), secret_id=f"rw{i}", data=value)
        written[(identity, f"rw{i}")] = value
    return written


def test_rewrap_moves_every_value_to_the_new_key(servers: Servers, data_dir: Path, db: Database) -> None:
    room = servers.start()
    written = write_some(room, 12)
    old = active_kek(data_dir)
    assert kek_ids(db) == ({old}, {old})

    new = KeyringFile(data_dir / "keyring.json").rotate()
    assert new != old
    assert active_kek(data_dir) == new
    assert stat.S_IMODE((data_dir / "keyring.json").stat().st_mode) == 0o600

    assert rewrap(db) == len(written)
    assert kek_ids(db) == ({new}, {new})
    assert rewrap(db) == 0  # nothing left under the old key

    time.sleep(1.1)  # the running server reloads the keyring (checked at most once a second)
    for (identity, secret_id), value in written.items():
        assert get_data(room, room.auth(identity), secret_id) == value

    # New writes use the new key.
    set_secret(room, room.auth("carol"), secret_id="after-rotation", data=b"new")
    (row,) = db.query("SELECT kek_id, sealed FROM secrets WHERE secret_id='after-rotation'")
    assert row[0] == new
    assert isinstance(row[1], bytes)
    assert Envelope.kek_id_of(row[1]) == new
    assert get_data(room, room.auth("carol"), "after-rotation") == b"new"

    # And everything still opens after a restart.
    servers.stop(room)
    room = servers.start()
    for (identity, secret_id), value in written.items():
        assert get_data(room, room.auth(identity), secret_id) == value


def test_rewrapped_values_read_back_at_once_without_downtime(
    servers: Servers, data_dir: Path, db: Database
) -> None:
    """SPEC §3: rewrap moves everything to the newest key without downtime, so the running server
    must open values re-wrapped under a key it has not loaded yet (not fail until it reloads)."""
    room = servers.start()
    written = write_some(room, 6)
    new = KeyringFile(data_dir / "keyring.json").rotate()
    assert rewrap(db) == len(written)
    assert kek_ids(db)[0] == {new}
    for (identity, secret_id), value in written.items():
        assert get_data(room, room.auth(identity), secret_id) == value


def test_old_keys_still_open_values_after_rotation_without_rewrap(
    servers: Servers, data_dir: Path, db: Database
) -> None:
    room = servers.start()
    written = write_some(room, 4)
    old = active_kek(data_dir)
    new = KeyringFile(data_dir / "keyring.json").rotate()
    time.sleep(1.1)
    for (identity, secret_id), value in written.items():
        assert get_data(room, room.auth(identity), secret_id) == value
    set_secret(room, room.auth("carol"), secret_id="fresh", data=b"v")
    assert kek_ids(db)[0] == {old, new}
