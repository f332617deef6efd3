"""Key management on both stores: rotate and re-wrap under load, retire the old key, and refuse
to start with a keyring that cannot open the stored data (naming the keys it needs)."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb

from .harness import Participants, ServerThread, test_settings
from .test_encrypted_store import Database

COMMAND = [sys.executable, "-m", "roomsecrets_server.cli.main"]


def keyring(data_dir: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((data_dir / "keyring.json").read_text())
    return doc


def key_ids(data_dir: Path) -> list[str]:
    return [str(k["id"]) for k in keyring(data_dir)["keys"]]  # type: ignore[attr-defined]


def start(data_dir: Path, database_url: str) -> ServerThread:
    return ServerThread(test_settings(data_dir, database_url=database_url)).start()


def seeded(data_dir: Path, database_url: str) -> tuple[str, bytes]:
    """A stopped server's data dir with one value in it; (the key id it is under, the value)."""
    server = start(data_dir, database_url)
    room = Participants(server)
    value = secrets.token_bytes(32)
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s", data=value), metadata=room.auth("alice"))
    room.close()
    server.stop()
    return key_ids(data_dir)[0], value


def test_a_missing_keyring_refuses_to_start_naming_the_keys_the_data_needs(
    data_dir: Path, database_url: str
) -> None:
    kek_id, _ = seeded(data_dir, database_url)
    (data_dir / "keyring.json").unlink()
    with pytest.raises(RuntimeError) as refused:
        start(data_dir, database_url)
    message = str(refused.value)
    assert "refusing to start" in message and f"lacks key-encryption keys {kek_id}" in message, message
    assert f"need keys {kek_id}" in message


def test_a_keyring_with_other_key_material_refuses_to_start(data_dir: Path, database_url: str) -> None:
    kek_id, _ = seeded(data_dir, database_url)
    doc = keyring(data_dir)
    original = (data_dir / "keyring.json").read_text()
    doc["keys"][0]["key"] = base64.b64encode(secrets.token_bytes(32)).decode()  # type: ignore[index]
    (data_dir / "keyring.json").write_text(json.dumps(doc))
    with pytest.raises(RuntimeError) as refused:
        start(data_dir, database_url)
    assert f"its keys {kek_id} do not open the data keys stored under them" in str(refused.value)
    assert doc["keys"][0]["key"] not in str(refused.value)  # type: ignore[index]
    # The right keyring back: it serves again, nothing lost.
    (data_dir / "keyring.json").write_text(original)
    start(data_dir, database_url).stop()


def test_rotate_rewrap_and_retire_under_load_loses_nothing(data_dir: Path, database_url: str) -> None:
    server = start(data_dir, database_url)
    room = Participants(server)
    try:
        md = room.auth("alice")
        written: dict[str, bytes] = {}
        for i in range(50):
            written[f"old{i}"] = secrets.token_bytes(40)
            room.stub.SetSecret(
                pb.SetSecretRequest(secret_id=f"old{i}", data=written[f"old{i}"]), metadata=md
            )
        (old,) = key_ids(data_dir)

        stop = threading.Event()
        failures: list[str] = []

        def load() -> None:
            n = 0
            while not stop.is_set():
                key, value = f"live{n % 20}", secrets.token_bytes(40)
                try:
                    room.stub.SetSecret(pb.SetSecretRequest(secret_id=key, data=value), metadata=md)
                    written[key] = value
                    got = room.stub.GetSecret(pb.GetSecretRequest(secret_id=f"old{n % 50}"), metadata=md)
                    assert got.data == written[f"old{n % 50}"]
                except (grpc.RpcError, AssertionError) as err:
                    failures.append(repr(err))
                n += 1

        writer = threading.Thread(target=load)
        writer.start()
        try:
            done = subprocess.run(
                [*COMMAND, "rewrap", "--rotate", "--retire", "--data-dir", str(data_dir),
                 "--database-url", database_url],
                capture_output=True, timeout=120,
            )  # fmt: skip
        finally:
            stop.set()
            writer.join(30)
        assert done.returncode == 0, done.stderr.decode()
        out = done.stdout.decode()
        (new,) = key_ids(data_dir)
        assert new != old and f"retired 1 key-encryption keys: {old}" in out, out
        assert failures == [], failures[:3]
        for secret_id, value in written.items():
            assert room.stub.GetSecret(pb.GetSecretRequest(secret_id=secret_id), metadata=md).data == value
    finally:
        room.close()
        server.stop()
    # The retired key is gone for good: a restart checks every stored value's key is there.
    server = start(data_dir, database_url)
    room = Participants(server)
    try:
        got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="old0"), metadata=room.auth("alice"))
        assert got.data == written["old0"]
        assert server.call(server.server.store.kek_samples()).keys() == {new}  # type: ignore[union-attr]
    finally:
        room.close()
        server.stop()


# -- automatic rotation before the AES-GCM nonce bound (crypto/rotation.py) ------------------------
LIMIT = 20  # wraps per generation in these tests; blocks are then one wrap each


def wraps_and_rows(db: Database) -> tuple[dict[str, int], dict[str, int]]:
    """(wraps the store counted per key id, values stored per key id)."""
    counted = {str(k): int(str(n)) for k, n in db.query("SELECT kek_id, wraps FROM kek_wraps")}
    stored = {
        str(k): int(str(n)) for k, n in db.query("SELECT kek_id, count(*) FROM secrets GROUP BY kek_id")
    }
    return counted, stored


def test_the_active_key_moves_to_new_generations_before_its_wrap_limit(
    data_dir: Path, database_url: str
) -> None:
    db = Database(data_dir, database_url)
    server = ServerThread(test_settings(data_dir, database_url=database_url, kek_rotate_after=LIMIT)).start()
    room = Participants(server)
    written: dict[str, bytes] = {}
    try:
        md = room.auth("alice")
        for i in range(3 * LIMIT):
            written[f"s{i}"] = secrets.token_bytes(24)
            room.stub.SetSecret(pb.SetSecretRequest(secret_id=f"s{i}", data=written[f"s{i}"]), metadata=md)
    finally:
        room.close()
        server.stop()
    (root,) = key_ids(data_dir)  # no new key file entry: generations are derived
    counted, stored = wraps_and_rows(db)
    assert set(stored) <= set(counted) and len(stored) >= 3, (counted, stored)
    for kek_id, rows in stored.items():
        assert kek_id == root or kek_id.startswith(f"{root}.g"), kek_id
        # Never fewer wraps counted than made (each row is one), never far past the limit.
        assert rows <= counted[kek_id] <= LIMIT + 2, (kek_id, counted, stored)
    lines = (data_dir / "audit.log").read_text().splitlines()
    rotations = [json.loads(line) for line in lines if '"kek.rotate"' in line]
    assert len(rotations) >= 2 and all(r["outcome"] == "ok" for r in rotations), rotations
    key_material = str(keyring(data_dir)["keys"][0]["key"])  # type: ignore[index]
    assert all(key_material not in line for line in lines)

    # A restart goes on with the newest generation and opens every value of every generation.
    server = ServerThread(test_settings(data_dir, database_url=database_url, kek_rotate_after=LIMIT)).start()
    room = Participants(server)
    try:
        md = room.auth("alice")
        for secret_id, value in written.items():
            assert room.stub.GetSecret(pb.GetSecretRequest(secret_id=secret_id), metadata=md).data == value
        newest = max(stored, key=lambda k: (len(k), k))
        room.stub.SetSecret(pb.SetSecretRequest(secret_id="after", data=b"x"), metadata=md)
        (after,) = db.query("SELECT kek_id FROM secrets WHERE secret_id='after'")
        assert str(after[0]) >= newest and str(after[0]).startswith(root), (after, newest)
    finally:
        room.close()
        server.stop()


def test_rewrap_leaves_generations_alone_and_rotate_retire_moves_them_to_a_fresh_key(
    data_dir: Path, database_url: str
) -> None:
    settings = test_settings(data_dir, database_url=database_url, kek_rotate_after=LIMIT)
    server = ServerThread(settings).start()
    room = Participants(server)
    try:
        md = room.auth("alice")
        for i in range(2 * LIMIT):
            room.stub.SetSecret(pb.SetSecretRequest(secret_id=f"s{i}", data=b"v%d" % i), metadata=md)
    finally:
        room.close()
        server.stop()
    (root,) = key_ids(data_dir)
    url = ["--database-url", database_url, "--kek-rotate-after", str(LIMIT)]
    plain = subprocess.run([*COMMAND, "rewrap", "--data-dir", str(data_dir), *url], capture_output=True)
    assert plain.returncode == 0 and b"re-wrapped 0 values" in plain.stdout, plain
    rotated = subprocess.run(
        [*COMMAND, "rewrap", "--rotate", "--retire", "--settle", "0", "--data-dir", str(data_dir), *url],
        capture_output=True,
    )
    assert rotated.returncode == 0, rotated.stderr.decode()
    assert f"retired 1 key-encryption keys: {root}".encode() in rotated.stdout, rotated.stdout
    (new,) = key_ids(data_dir)
    counted, stored = wraps_and_rows(Database(data_dir, database_url))
    assert all(k == new or k.startswith(f"{new}.g") for k in stored), stored
    assert sum(v for k, v in counted.items() if k.startswith(new)) >= 2 * LIMIT  # rewrap counted too
    server = ServerThread(settings).start()  # the startup check finds every key the data names
    room = Participants(server)
    try:
        md = room.auth("alice")
        for i in range(2 * LIMIT):
            assert room.stub.GetSecret(pb.GetSecretRequest(secret_id=f"s{i}"), metadata=md).data == b"v%d" % i
    finally:
        room.close()
        server.stop()


def test_a_keyring_whose_root_key_changed_refuses_to_start_naming_the_generations(
    data_dir: Path, database_url: str
) -> None:
    server = ServerThread(test_settings(data_dir, database_url=database_url, kek_rotate_after=2)).start()
    room = Participants(server)
    try:
        for i in range(6):
            room.stub.SetSecret(
                pb.SetSecretRequest(secret_id=f"s{i}", data=b"v"), metadata=room.auth("alice")
            )
    finally:
        room.close()
        server.stop()
    doc = keyring(data_dir)
    doc["keys"][0]["key"] = base64.b64encode(secrets.token_bytes(32)).decode()  # type: ignore[index]
    (data_dir / "keyring.json").write_text(json.dumps(doc))
    with pytest.raises(RuntimeError) as refused:
        start(data_dir, database_url)
    root = key_ids(data_dir)[0]
    assert f"its keys {root}, {root}.g1" in str(refused.value), refused.value


@pytest.mark.postgres_only
def test_replicas_share_one_wrap_count_and_read_each_others_generations(
    data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    """Two replicas sealing under one key: the store's count covers both, both move on, and each
    opens what the other sealed under a generation it had not reached itself."""
    second_dir = tmp_path / "second"
    a = ServerThread(test_settings(data_dir, database_url=database_url, kek_rotate_after=LIMIT)).start()
    shutil.copytree(data_dir, second_dir)  # the same keyring and dev key, as replicas need
    b = ServerThread(test_settings(second_dir, database_url=database_url, kek_rotate_after=LIMIT)).start()
    room_a, room_b = Participants(a), Participants(b)
    try:
        md = room_a.auth("alice")
        for i in range(3 * LIMIT):
            stub = (room_a if i % 2 else room_b).stub
            stub.SetSecret(pb.SetSecretRequest(secret_id=f"s{i}", data=b"v%d" % i), metadata=md)
        for room in (room_a, room_b):
            for i in range(3 * LIMIT):
                got = room.stub.GetSecret(pb.GetSecretRequest(secret_id=f"s{i}"), metadata=md)
                assert got.data == b"v%d" % i
    finally:
        room_a.close()
        room_b.close()
        a.stop()
        b.stop()
    counted, stored = wraps_and_rows(Database(data_dir, database_url))
    assert len(stored) >= 3, stored
    for kek_id, rows in stored.items():
        # Each replica may overrun a generation by the block it still holds: one wrap here.
        assert rows <= counted[kek_id] <= LIMIT + 2 * 2, (kek_id, counted, stored)


RACE = """
import os, sys, time
from pathlib import Path
from roomsecrets_server.auth.dev_key import ensure_dev_key
from roomsecrets_server.crypto.keyring import KeyringFile
data_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
keyring = KeyringFile(data_dir / "keyring.json")
keyring.ensure()
print(keyring.envelope().active_kek_id, ensure_dev_key(data_dir)[0])
"""


def test_processes_starting_together_on_a_fresh_data_dir_agree_on_one_key(tmp_path: Path) -> None:
    """`serve --workers N` starts N servers on a fresh data dir at once: each used to create its
    own keyring and dev key, the last write won, and the others sealed under a key the file no
    longer had (DATA_LOSS for their values). Creation is now create-if-absent, atomically."""
    data_dir, go = tmp_path / "data", tmp_path / "go"
    data_dir.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(data_dir), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    time.sleep(1.0)  # every process is waiting for the start
    go.touch()
    seen = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert len(seen) == 1, seen
    assert seen == {
        f"{key_ids(data_dir)[0]} {json.loads((data_dir / 'signing-key.json').read_text())['kid']}"
    }
    assert not [p.name for p in data_dir.iterdir() if p.name.startswith(".")], "temporary files left"
