"""The audit log: one JSON line per action — who did what to which secret or request id.

It never receives values, tokens or keys: its API takes only identities, ids and outcomes.
Entries are buffered as tuples and encoded and written every half second (and on close), so
auditing costs the hot path one tuple and a list append, not a write.
"""

from __future__ import annotations

import asyncio
import time
from json.encoder import encode_basestring_ascii as _escape
from pathlib import Path
from typing import IO


class AuditLog:
    FLUSH_SECONDS = 0.5

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = path.open("a", encoding="utf-8") if path else None
        self._buffer: list[tuple[float | str, ...]] = []
        self._task: asyncio.Task[None] | None = None

    def record(
        self,
        action: str,
        *,
        room: str,
        actor: str,
        outcome: str = "ok",
        secret_id: str = "",
        owner: str = "",
        delegated_to: str = "",
        request_id: str = "",
        target: str = "",
    ) -> None:
        if self._file is not None:
            self._buffer.append(
                (
                    time.time(),
                    action,
                    room,
                    actor,
                    outcome,
                    secret_id,
                    owner,
                    delegated_to,
                    request_id,
                    target,
                )
            )

    def start(self) -> None:
        if self._file is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_periodically())

    def flush(self) -> None:
        if self._file is not None and self._buffer:
            entries, self._buffer = self._buffer, []
            self._file.write("".join(_line(entry) for entry in entries))
            self._file.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_SECONDS)
            self.flush()


_FIELDS = (
    "ts",
    "action",
    "room",
    "actor",
    "outcome",
    "secret_id",
    "owner",
    "delegated_to",
    "request_id",
    "target",
)


_ALWAYS = frozenset(("action", "room", "actor", "outcome"))


def _line(entry: tuple[float | str, ...]) -> str:
    # Built by hand with json's own C string escaper (ASCII-only output, like json.dumps): the
    # same JSON object as json.dumps of a dict, at half the cost.
    out = ['{"ts":', repr(round(float(entry[0]), 6))]
    for name, value in zip(_FIELDS[1:], entry[1:], strict=True):
        if value or name in _ALWAYS:
            out.append(f',"{name}":{_escape(str(value))}')
    out.append("}\n")
    return "".join(out)
