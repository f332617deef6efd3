"""Counting key-encryption key use, and rotating the active key before AES-GCM's nonce bound.

Every data key is wrapped by the active KEK with a random 96-bit nonce, and NIST SP 800-38D caps
one key at 2^32 such encryptions. Each process that seals (every replica, and `rewrap`) reserves
wraps in blocks from a counter in the store *before* using them, so the count is shared, survives
restarts, and a crash loses only unused reservations: an over-count, the safe side. When a
reservation takes the active key's total to `rotate_after`, sealing moves on to the key's next
generation (envelope.py), which every process derives by itself; the others follow at their next
reservation. The default, 2^30, leaves a 4x margin for the blocks other replicas still hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from .envelope import generation_id, split_generation
from .keyring import KeyringFile

log = logging.getLogger(__name__)

NONCE_BOUND = 2**32
DEFAULT_ROTATE_AFTER = 2**30
MAX_BLOCK = 4096


class WrapCounts(Protocol):
    async def reserve_wraps(self, kek_id: str, count: int) -> int: ...

    async def wrap_counts(self) -> dict[str, int]: ...


class KekRotation:
    """Installs itself as the keyring's wrap counter. `start()` before the first seal, `flush()`
    before closing the store. `on_rotate(old_id, new_id)` hears of each move to a new generation."""

    def __init__(
        self,
        store: WrapCounts,
        keyring: KeyringFile,
        *,
        rotate_after: int = DEFAULT_ROTATE_AFTER,
        on_rotate: Callable[[str, str], None] | None = None,
    ) -> None:
        if not 0 < rotate_after <= NONCE_BOUND // 2:
            raise ValueError(f"rotate_after must be between 1 and {NONCE_BOUND // 2}")
        self._store = store
        self._keyring = keyring
        self._rotate_after = rotate_after
        self._on_rotate = on_rotate
        # Small limits (tests) get small blocks, so that a few replicas cannot overrun them much.
        self._block = max(1, min(MAX_BLOCK, rotate_after // 64))
        self._left: dict[str, int] = {}  # reserved and not yet used, by key id
        self._unreserved: dict[str, int] = {}  # used beyond what was reserved, by key id
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        keyring.on_wrap = self.count

    async def start(self) -> None:
        """Seal under the active root key's newest generation any process reached, and reserve."""
        root_id = split_generation(self._keyring.envelope().active_kek_id)[0]
        counts = await self._store.wrap_counts()
        newest = max((g for r, g in map(split_generation, counts) if r == root_id), default=0)
        if newest:
            self._keyring.use_generation(root_id, newest)
        await self._reserve()

    def count(self, kek_id: str) -> None:
        """One data key was wrapped under `kek_id` (called by the envelope; must not block)."""
        left = self._left.get(kek_id, 0)
        if left > 0:
            self._left[kek_id] = left - 1
            if left - 1 > self._block // 2:
                return
        else:
            self._unreserved[kek_id] = self._unreserved.get(kek_id, 0) + 1
        if self._task is None or self._task.done():
            # Without a running loop (a synchronous caller) the next flush() records the wrap.
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.get_running_loop().create_task(self._reserve_logged())

    async def flush(self) -> None:
        """Record every wrap made beyond a reservation (before the store closes)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        async with self._lock:
            await self._record_unreserved(keep=None)

    async def _reserve_logged(self) -> None:
        try:
            await self._reserve()
        except Exception as error:  # the store is down: writes fail too; the next wrap retries
            log.warning("could not reserve key-encryption key wraps: %s", type(error).__name__)

    async def _reserve(self) -> None:
        async with self._lock:
            while True:
                active = self._keyring.envelope().active_kek_id
                await self._record_unreserved(keep=active)
                used = self._unreserved.get(active, 0)
                if used == 0 and self._left.get(active, 0) > self._block // 2:
                    return
                total = await self._store.reserve_wraps(active, used + self._block)
                self._take_unreserved(active, used)
                self._left[active] = self._left.get(active, 0) + self._block
                if total < self._rotate_after:
                    return
                if self._keyring.envelope().active_kek_id == active:
                    self._advance(active, total)

    def _advance(self, active: str, total: int) -> None:
        root_id, generation = split_generation(active)
        new_id = generation_id(root_id, generation + 1)
        # What is left of this key's block stays counted and unused: the safe side.
        self._left.pop(active, None)
        self._keyring.use_generation(root_id, generation + 1)
        log.info(
            "key-encryption key %s reached %d wraps (limit %d); sealing under %s",
            active,
            total,
            self._rotate_after,
            new_id,
        )
        if self._on_rotate is not None:
            self._on_rotate(active, new_id)

    async def _record_unreserved(self, *, keep: str | None) -> None:
        for kek_id, used in list(self._unreserved.items()):
            if kek_id != keep and used:
                await self._store.reserve_wraps(kek_id, used)
                self._take_unreserved(kek_id, used)

    def _take_unreserved(self, kek_id: str, used: int) -> None:
        # Wraps counted while the store call was in flight stay for the next reservation.
        rest = self._unreserved.get(kek_id, 0) - used
        if rest > 0:
            self._unreserved[kek_id] = rest
        else:
            self._unreserved.pop(kek_id, None)
