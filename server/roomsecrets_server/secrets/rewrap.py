"""Re-wrap every data key under the newest key-encryption key, online.

Only the small wrapped-key header of each value changes; values are never decrypted. Each row
is swapped with check-and-set on its old bytes, so a concurrent write simply wins (and is
already under the newest key once the server has reloaded the keyring, within a second).
"""

from __future__ import annotations

import asyncio
import time

from ..crypto.envelope import split_generation
from ..crypto.keyring import KeyringFile
from ..store import Store

BATCH = 500


async def rewrap_all(store: Store, keyring: KeyringFile, *, settle_seconds: float = 10.0) -> int:
    """Returns how many values were re-wrapped. Loops until none is left under an older key."""
    envelope = keyring.reload()
    active = envelope.active_kek_id
    # Generations of the active key (crypto/rotation.py) share its root: those values stay put.
    root_id = split_generation(active)[0]
    moved = 0
    give_up = time.monotonic() + settle_seconds
    while True:
        rows = await store.sealed_not_under(root_id, BATCH)
        if not rows:
            return moved
        changed = 0
        for key, sealed in rows:
            if await store.replace_sealed(key, sealed, envelope.rewrap(sealed), active):
                changed += 1
        moved += changed
        if changed == 0:
            # Rows under an old key keep appearing: a server that has not reloaded the keyring
            # yet is still writing with the previous key. Wait for it, within reason.
            if time.monotonic() > give_up:
                raise TimeoutError(f"{len(rows)} values are still written under an older key")
            await asyncio.sleep(0.2)
