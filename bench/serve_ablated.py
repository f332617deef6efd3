"""The real server with parts of the GetSecret path switched off, or replaced by a prototype of a
cheaper version, by monkeypatching in this process only (benchmark diagnosis; the server's code
is untouched). Comparing its CPU per call under load with the real server's shows what each part
costs *under load*, which in-process timings (bench.hotpath) understate.

    python -m bench.serve_ablated --data-dir D --ablate NAME,... [--gc-stats] [--no-uvloop]

Removals (upper bounds: what the part costs in total):
  audit         AuditLog.record does nothing
  sqlite        SqliteStore.get_secret answers from a dict once a key was read (no invalidation:
                GetSecret loads only)
  crypto        SecretsService.open answers from a dict once a sealed blob was opened
  response      secret_info() and GetSecretResponse(...) reuse the first message built
  handler       GetSecret returns the first reply it built: the real server's process, threads
                and services around an echo handler
  gc            the garbage collector is disabled once the server is up
SetSecret removals:
  set-read      SqliteStore.get_secret answers from a dict that put_secret keeps current (a
                process-local write-through cache: no other writer is checked)
  set-write     put_secret returns at once for the load's secrets (bench-set-*): no writer
                thread, no statement, no commit
  set-seal      SecretsService.seal reuses the first sealed blob (new etag each time)

Prototypes (the audit, data-key, record and SecretInfo prototypes that used to be here were
adopted by the server; see bench/README.md):
  opt-value-cache
                SecretsService.get_secret (by id) keeps decrypted values per key, emptied whenever
                `PRAGMA data_version` changes; scope checks and audit still run per call. Keeps
                plaintext in memory: a trade-off, not a free fix

--gc-stats prints collections per generation and the time spent in them to stderr at exit.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server import validate
from roomsecrets_server.app import RoomSecretsServer, serve
from roomsecrets_server.audit import AuditLog
from roomsecrets_server.auth import authority
from roomsecrets_server.auth.principal import Principal
from roomsecrets_server.config import Settings
from roomsecrets_server.errors import NotFound
from roomsecrets_server.rpc import room_secrets as rpc
from roomsecrets_server.secrets.service import SecretsService, SecretValue
from roomsecrets_server.store import SecretKey, SecretRecord
from roomsecrets_server.store.sqlite import SqliteStore

from ._common import announce_ready, loop_name, run_loop

CACHE_LIMIT = 10_000


# -- removals -------------------------------------------------------------------------------------
def no_audit() -> None:
    async def record(self: AuditLog, *args: Any, **kwargs: Any) -> None:
        pass

    AuditLog.record = record  # type: ignore[method-assign]


def _remembering_get(rows: dict[SecretKey, SecretRecord]) -> None:
    """SqliteStore.get_secret answers from `rows` once a key was read (never invalidated)."""
    original = SqliteStore.get_secret

    async def get_secret(self: SqliteStore, key: SecretKey) -> SecretRecord | None:
        found = rows.get(key)
        if found is None:
            found = await original(self, key)
            if found is not None:
                rows[key] = found
        return found

    SqliteStore.get_secret = get_secret  # type: ignore[method-assign]


def no_sqlite() -> None:
    _remembering_get({})


def no_crypto() -> None:
    original = SecretsService.open
    plain: dict[bytes, bytes] = {}

    def open_(self: SecretsService, record: SecretRecord) -> bytes:
        data = plain.get(record.sealed)
        if data is None:
            data = plain[record.sealed] = original(self, record)
        return data

    SecretsService.open = open_  # type: ignore[method-assign]


def no_response() -> None:
    original_info = rpc.secret_info
    infos: list[pb.SecretInfo] = []

    def secret_info(record: SecretRecord, caller: str) -> pb.SecretInfo:
        if not infos:
            infos.append(original_info(record, caller))
        return infos[0]

    replies: list[pb.GetSecretResponse] = []

    def get_secret_response(**fields: Any) -> pb.GetSecretResponse:
        if not replies:
            replies.append(pb.GetSecretResponse(**fields))
        return replies[0]

    rpc.secret_info = secret_info
    setattr(rpc, "pb", _ModuleProxy(pb, GetSecretResponse=get_secret_response))  # noqa: B010


def no_handler() -> None:
    original = rpc.RoomSecretsServicer.GetSecret
    replies: list[Any] = []

    async def get_secret(self: rpc.RoomSecretsServicer, request: Any, context: Any) -> Any:
        if not replies:
            replies.append(await original(self, request, context))
        return replies[0]

    rpc.RoomSecretsServicer.GetSecret = get_secret  # type: ignore[method-assign]


def no_set_read() -> None:
    original_put = SqliteStore.put_secret
    rows: dict[SecretKey, SecretRecord] = {}
    _remembering_get(rows)

    async def put_secret(self: SqliteStore, record: SecretRecord, condition: Any) -> None:
        await original_put(self, record, condition)
        rows[record.key] = record

    SqliteStore.put_secret = put_secret  # type: ignore[method-assign]


def no_set_write() -> None:
    original = SqliteStore.put_secret

    async def put_secret(self: SqliteStore, record: SecretRecord, condition: Any) -> None:
        if not record.key.secret_id.startswith("bench-set-"):  # the seeding still writes
            await original(self, record, condition)

    SqliteStore.put_secret = put_secret  # type: ignore[method-assign]


def no_set_seal() -> None:
    original = SecretsService.seal
    first: list[SecretRecord] = []

    def seal(
        self: SecretsService, key: SecretKey, type_: str, name: str, data: bytes, kind: str = ""
    ) -> SecretRecord:
        if not key.secret_id.startswith("bench-set-"):  # the seeding still seals properly
            return original(self, key, type_, name, data, kind)
        if not first:
            first.append(original(self, key, type_, name, data, kind))
        return first[0]._replace(key=key, etag=os.urandom(8).hex(), update_time=time.time())

    SecretsService.seal = seal  # type: ignore[method-assign]


class _ModuleProxy:
    def __init__(self, module: Any, **overrides: Any) -> None:
        self._module = module
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._module, name)


# -- prototypes -----------------------------------------------------------------------------------
def opt_value_cache() -> None:
    """GetSecret by id answers from a dict of decrypted values, emptied whenever `PRAGMA data_version`
    changes. Plaintext stays in memory after the call: a security trade-off, see bench/README.md."""
    original = SecretsService.get_secret
    values: dict[SecretKey, SecretValue] = {}
    seen: list[int] = [-1]

    async def get_secret(
        self: SecretsService,
        p: Principal,
        *,
        secret_id: str,
        type_: str,
        name: str,
        delegated_to: str,
        delegated_by: str,
    ) -> SecretValue:
        store = self._store
        if not secret_id or not isinstance(store, SqliteStore):
            return await original(
                self,
                p,
                secret_id=secret_id,
                type_=type_,
                name=name,
                delegated_to=delegated_to,
                delegated_by=delegated_by,
            )
        p.require_secrets()
        owner, delegated_to = authority.readable_scope(p, delegated_to, delegated_by)
        validate.secret_id(secret_id)
        version = store._one("PRAGMA data_version", ())
        if version is None or version[0] != seen[0] or len(values) >= CACHE_LIMIT:
            values.clear()
            seen[0] = version[0] if version else -1
        key = SecretKey(p.room, owner, delegated_to, secret_id)
        value = values.get(key)
        if value is None:
            record = await store.get_secret(key)
            if record is None:
                raise NotFound(f"secret {secret_id!r} not found")
            value = values[key] = SecretValue(record, self.open(record))
        await self._audit.record(
            "get_secret",
            room=p.room,
            actor=p.identity,
            secret_id=secret_id,
            owner=owner,
            delegated_to=delegated_to,
        )
        return value

    SecretsService.get_secret = get_secret  # type: ignore[method-assign]


def _gil_holding_append() -> Callable[[int, bytes], None]:
    """write(2) through ctypes.PyDLL, which keeps the GIL during the call (os.write releases it)."""
    libc = ctypes.PyDLL(None, use_errno=True)
    write = libc.write
    write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    write.restype = ctypes.c_ssize_t

    def append(fd: int, data: bytes) -> None:
        while data:
            n = write(fd, data, len(data))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            data = data[n:]

    return append


def opt_audit_gil_batched() -> None:
    """The batched fail-closed audit, its write made without releasing the GIL."""
    append = _gil_holding_append()

    def _append(self: AuditLog, data: bytes) -> None:
        assert self._fd is not None
        append(self._fd, data)

    AuditLog._append = _append  # type: ignore[method-assign]


ABLATIONS: dict[str, Callable[[], None]] = {
    "opt-audit-gil-batched": opt_audit_gil_batched,
    "audit": no_audit,
    "sqlite": no_sqlite,
    "crypto": no_crypto,
    "response": no_response,
    "handler": no_handler,
    "gc": lambda: None,  # applied once the server is up
    "opt-value-cache": opt_value_cache,
    "set-read": no_set_read,
    "set-write": no_set_write,
    "set-seal": no_set_seal,
}


class GcStats:
    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            gen = info["generation"]
            self.count[gen] += 1
            self.seconds[gen] += time.perf_counter() - self._start

    def report(self) -> None:
        print(
            f"GC collections {self.count}, seconds {[round(s, 4) for s in self.seconds]}",
            file=sys.stderr,
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_ablated",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--ablate", default="", help=f"comma-separated, from {', '.join(ABLATIONS)}")
    parser.add_argument("--gc-stats", action="store_true")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--write-group-window", type=float, default=None)
    parser.add_argument("--audit-group-window", type=float, default=None)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.ablate.split(",") if n.strip()]
    unknown = set(names) - set(ABLATIONS)
    if unknown:
        parser.error(f"unknown ablation(s): {', '.join(sorted(unknown))}")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    for name in names:
        ABLATIONS[name]()
    if args.gc_stats:
        stats = GcStats()
        gc.callbacks.append(stats.callback)
        atexit.register(stats.report)
    loop = loop_name(not args.no_uvloop)

    def on_ready(server: RoomSecretsServer) -> None:
        if "gc" in names:
            gc.collect()
            gc.disable()
        announce_ready(server.port, loop)

    windows = {
        name: value
        for name, value in (
            ("write_group_window", args.write_group_window),
            ("audit_group_window", args.audit_group_window),
        )
        if value is not None
    }
    settings = Settings(data_dir=args.data_dir, listen=args.listen, **windows)
    run_loop(serve(settings, on_ready), not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
