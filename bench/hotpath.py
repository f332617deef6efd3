"""Times each step of the real GetSecret (and SetSecret) handler in-process, without gRPC, on the
server's own objects (`RoomSecretsServer` on a fresh temp data dir): what the real server does per
call beyond the echo server, step by step, plus a few what-if variants that back the suggestions
in bench/README.md.

    python -m bench.hotpath [--payload-bytes 64] [--iterations 5000] [--repeats 5] [--cpu 0] [--json F]

Figures are microseconds per call (median of the repeats). They add up to less than the gap seen
under load: gRPC's per-call work, task switches and garbage collection come on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server import validate
from roomsecrets_server.app import RoomSecretsServer
from roomsecrets_server.auth import authority
from roomsecrets_server.auth.dev_key import mint_token
from roomsecrets_server.config import Settings
from roomsecrets_server.crypto.checksum import crc32c
from roomsecrets_server.rpc.gate import Gate, authorization
from roomsecrets_server.rpc.room_secrets import RoomSecretsServicer, secret_info
from roomsecrets_server.secrets import service as secrets_service
from roomsecrets_server.store import SecretKey
from roomsecrets_server.store import sqlite as sqlite_store

from ._common import GET_SECRET_ID, IDENTITY, ROOM, SECRET_NAME, SECRET_TYPE, payload

Sync = Callable[[], object]
Async = Callable[[], Awaitable[object]]


class FakeContext:
    """What the handler reads from a grpc.aio context on the success path: the metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = (("user-agent", "grpc-go/1.56.3"), ("authorization", f"Bearer {token}"))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class Timer:
    def __init__(self, iterations: int, repeats: int) -> None:
        self.iterations = iterations
        self.repeats = repeats
        self.rows: list[tuple[str, str, float]] = []

    def sync(self, group: str, label: str, fn: Sync) -> float:
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter_ns()
            for _ in range(self.iterations):
                fn()
            samples.append((time.perf_counter_ns() - start) / self.iterations / 1000)
        return self._add(group, label, samples)

    async def aio(self, group: str, label: str, fn: Async, iterations: int | None = None) -> float:
        n = iterations or self.iterations
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter_ns()
            for _ in range(n):
                await fn()
            samples.append((time.perf_counter_ns() - start) / n / 1000)
        return self._add(group, label, samples)

    def _add(self, group: str, label: str, samples: list[float]) -> float:
        value = statistics.median(samples)
        self.rows.append((group, label, value))
        return value


async def measure(data_dir: Path, payload_bytes: int, timer: Timer) -> None:
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0")
    server = RoomSecretsServer(settings)
    servicer = RoomSecretsServicer(
        Gate(server.verifier, server.audit), server.secrets, server.requests, server.oauth
    )
    secrets, audit, keyring = server.secrets, server.audit, server.keyring
    store = server.store
    assert isinstance(store, sqlite_store.SqliteStore)  # this profile reads SQLite directly
    token = mint_token(data_dir, identity=IDENTITY, room=ROOM)
    ctx: Any = FakeContext(token)
    principal = server.verifier.authenticate(authorization(ctx))
    value = payload(payload_bytes)
    await secrets.set_secret(
        principal,
        secret_id=GET_SECRET_ID,
        type_=SECRET_TYPE,
        name=SECRET_NAME,
        data=value,
        delegated_to="",
        for_identity="",
        etag="",
        data_crc32c=None,
    )
    key = SecretKey(ROOM, IDENTITY, "", GET_SECRET_ID)
    record = await store.get_secret(key)
    assert record is not None
    get_request = pb.GetSecretRequest(secret_id=GET_SECRET_ID)
    got = await servicer.GetSecret(get_request, ctx)
    assert got.data == value
    envelope = keyring.envelope()
    aad = secrets_service._aad(record.key, record.type, record.etag, record.kind, "")
    _, dek, body = envelope._unwrap(record.sealed)
    read_sql = (
        f"SELECT {sqlite_store._VALUE_COLUMNS} FROM secrets "
        "WHERE room=? AND owner=? AND delegated_to=? AND secret_id=?"
    )
    read_args = (key.room, key.owner, key.delegated_to, key.secret_id)
    conn = store._read
    version_sql, one_sql = "PRAGMA data_version", "SELECT 1"
    aead = AESGCM(dek)
    entry = {"ts": 1.0, "action": "get_secret", "room": ROOM, "actor": IDENTITY, "outcome": "ok"}
    encoder = json.JSONEncoder(separators=(",", ":"))

    def get_handler() -> Awaitable[object]:
        return servicer.GetSecret(get_request, ctx)

    def get_service() -> Awaitable[object]:
        return secrets.get_secret(
            principal, secret_id=GET_SECRET_ID, type_="", name="", delegated_to="", delegated_by=""
        )

    def scope() -> object:
        authority.readable_scope(principal, "", "")
        validate.secret_id(GET_SECRET_ID)
        return SecretKey(ROOM, IDENTITY, "", GET_SECRET_ID)

    def audit_record() -> Awaitable[None]:
        return audit.record("get_secret", room=ROOM, actor=IDENTITY, secret_id=GET_SECRET_ID, owner=IDENTITY)

    def response() -> object:
        return pb.GetSecretResponse(
            secret=secret_info(record, IDENTITY), data=value, data_crc32c=record.crc32c
        )

    rows: list[tuple[str, str, Any]] = [
        ("GetSecret, whole handler", "RoomSecretsServicer.GetSecret via @unary (all below)", get_handler),
        ("GetSecret, whole handler", "SecretsService.get_secret (no auth, no protobuf)", get_service),
    ]
    for group, label, afn in rows:
        await timer.aio(group, label, afn)
    g = "GetSecret, its steps"
    steps: list[tuple[str, Sync]] = [
        (
            "auth: authorization(ctx) + TokenVerifier.authenticate (cache hit)",
            lambda: server.verifier.authenticate(authorization(ctx)),
        ),
        ("validate: readable_scope + validate.secret_id + SecretKey", scope),
    ]
    for label, fn in steps:
        timer.sync(g, label, fn)
    label = "sqlite read: SqliteStore.get_secret (execute+fetchone+record)"
    await timer.aio(g, label, lambda: store.get_secret(key))
    steps = [
        ("decrypt: SecretsService.open (all three below)", lambda: secrets.open(record)),
        ("  KeyringFile.envelope() (monotonic check)", keyring.envelope),
        (
            "  _aad / place() (associated data)",
            lambda: secrets_service._aad(record.key, record.type, record.etag, record.kind, ""),
        ),
        (
            "  Envelope.open (KEK unwrap + AESGCM(dek) + decrypt)",
            lambda: envelope.open(record.sealed, aad),
        ),
        ("response: secret_info + GetSecretResponse(...)", response),
        ("(both servers) GetSecretResponse.SerializeToString", got.SerializeToString),
    ]
    for label, fn in steps:
        timer.sync(g, label, fn)
    await timer.aio(g, "audit: AuditLog.record (line built, one write, one loop iteration)", audit_record)

    g = "what-if variants"
    pending: list[tuple[float, str, str, str]] = []
    steps = [
        (
            "sqlite: conn.execute(same SQL).fetchone() only",
            lambda: conn.execute(read_sql, read_args).fetchone(),
        ),
        (
            "sqlite: conn.execute('PRAGMA data_version').fetchone()",
            lambda: conn.execute(version_sql).fetchone(),
        ),
        (
            "sqlite: conn.execute('SELECT 1').fetchone() (per-statement floor)",
            lambda: conn.execute(one_sql).fetchone(),
        ),
        (
            "crypto: KEK unwrap of the 32-byte DEK only (Envelope._unwrap)",
            lambda: envelope._unwrap(record.sealed),
        ),
        ("crypto: AESGCM(dek) construction only", lambda: AESGCM(dek)),
        (
            "crypto: AESGCM(dek).decrypt of the value (with a kept AESGCM)",
            lambda: aead.decrypt(body[:12], body[12:], aad),
        ),
        (
            "audit: json.dumps(entry, separators=...) (today)",
            lambda: json.dumps(entry, separators=(",", ":")),
        ),
        ("audit: one module-level JSONEncoder.encode(entry)", lambda: encoder.encode(entry)),
        (
            "audit: append a tuple, encode at flush (hot-path part)",
            lambda: pending.append((time.time(), "get_secret", ROOM, IDENTITY)),
        ),
        ("response: secret_info(record) alone", lambda: secret_info(record, IDENTITY)),
    ]
    for label, fn in steps:
        timer.sync(g, label, fn)
        pending.clear()

    g = "SetSecret, its steps"
    timer.sync(
        g,
        "seal: SecretsService.seal (DEK, 2x AES-GCM, crc32c, record)",
        lambda: secrets.seal(key, SECRET_TYPE, SECRET_NAME, value),
    )
    timer.sync(g, "crc32c(value)", lambda: crc32c(value))

    def set_one() -> Awaitable[object]:
        return secrets.set_secret(
            principal,
            secret_id="bench-set-hotpath",
            type_=SECRET_TYPE,
            name="",
            data=value,
            delegated_to="",
            for_identity="",
            etag="",
            data_crc32c=None,
        )

    label = "whole SecretsService.set_secret, one at a time (one fsync each)"
    await timer.aio(g, label, set_one, iterations=max(20, timer.iterations // 100))
    audit.flush()
    await server.store.close()
    await server.audit.close()


def format_rows(rows: Sequence[tuple[str, str, float]]) -> str:
    lines: list[str] = []
    group = ""
    for g, label, value in rows:
        if g != group:
            lines.append(f"\n{g}")
            group = g
        lines.append(f"  {value:9.1f} us  {label}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=0, help="pin this process to a CPU (-1: do not pin)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    timer = Timer(args.iterations, args.repeats)
    with tempfile.TemporaryDirectory(prefix="roomsecrets-hotpath-") as tmp:
        asyncio.run(measure(Path(tmp) / "data", args.payload_bytes, timer))
    print(f"payload {args.payload_bytes} B, {args.iterations} iterations x {args.repeats} repeats (median)")
    print(format_rows(timer.rows))
    if args.json:
        args.json.write_text(
            json.dumps([{"group": g, "step": s, "us": v} for g, s, v in timer.rows], indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
