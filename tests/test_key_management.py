"""Key management on both stores: rotate and re-wrap under load, retire the old key, and refuse
to start with a keyring that cannot open the stored data (naming the keys it needs)."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb

from .harness import Participants, ServerThread, test_settings

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
