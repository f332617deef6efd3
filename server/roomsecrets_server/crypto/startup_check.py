"""Refuse to serve with a keyring that cannot open the stored data.

A missing keyring.json is recreated empty-handed on start, and a restored or copied one may hold
other key material under the same ids: either way the server would run and answer DATA_LOSS for
every value. Instead it checks, before serving, that every key-encryption key the stored values
name is in the keyring and unwraps one of their data keys.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import IntegrityError
from ..store import Store
from .envelope import Envelope


class KeyringMismatch(RuntimeError):
    """The keyring lacks, or has the wrong material for, keys the stored values need."""


async def check_keyring(store: Store, envelope: Envelope, keyring_path: Path) -> None:
    samples = await store.kek_samples()
    missing = sorted(kek_id for kek_id in samples if kek_id not in envelope)
    wrong: list[str] = []
    for kek_id, sealed in sorted(samples.items()):
        if kek_id in envelope:
            try:
                envelope.check_key(sealed)
            except IntegrityError:
                wrong.append(kek_id)
    problems = []
    if missing:
        problems.append(f"it lacks key-encryption keys {', '.join(missing)}")
    if wrong:
        problems.append(f"its keys {', '.join(wrong)} do not open the data keys stored under them")
    if problems:
        raise KeyringMismatch(
            f"refusing to start: the keyring {keyring_path} does not match the stored data: "
            f"{'; '.join(problems)}. The stored values need keys {', '.join(sorted(samples))}; "
            "restore the keyring.json they were written with"
        )
