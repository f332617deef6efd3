"""The key-encryption keyring file: created on first run (mode 0600), rotated by `rewrap --rotate`.

File format (JSON): {"active": "<id>", "keys": [{"id": "<id>", "key": "<base64 32 bytes>",
"created": <unix seconds>}]}. The newest key is active; older keys stay to open old values until
`rewrap --retire` removes those no stored value uses any more.
A running server reloads the file when it changes (checked at most once a second), so a
rotation done by the CLI is picked up without a restart.

The file names the active *root* key; which generation of it seals (envelope.py) is not kept here
but counted in the store (rotation.py), which tells the keyring through `use_generation`.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from ..files import create_private, read_private, write_private
from .envelope import Envelope, generation_id, split_generation


def _new_key_entry() -> dict[str, object]:
    return {
        "id": f"kek-{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}",
        "key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "created": int(time.time()),
    }


class KeyringFile:
    """Loads the keyring into an Envelope, creating the file on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns = -1
        self._checked = 0.0
        self._envelope: Envelope | None = None
        self._generations: dict[str, int] = {}
        self.on_wrap: Callable[[str], None] | None = None

    def use_generation(self, root_id: str, generation: int) -> Envelope:
        """Seal under generation `generation` of `root_id` from now on (while it is the active root)."""
        self._generations[root_id] = generation
        return self.reload()

    def ensure(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            entry = _new_key_entry()
            create_private(self.path, json.dumps({"active": entry["id"], "keys": [entry]}, indent=2))

    def envelope(self) -> Envelope:
        """The current envelope; re-reads the file if it changed (at most one stat a second)."""
        now = time.monotonic()
        if self._envelope is None or now - self._checked >= 1.0:
            self._checked = now
            mtime = self.path.stat().st_mtime_ns
            if self._envelope is None or mtime != self._mtime_ns:
                self._envelope = self._load()
                self._mtime_ns = mtime
        return self._envelope

    def reload(self) -> Envelope:
        self._envelope = None
        return self.envelope()

    def rotate(self) -> str:
        """Add a new key and make it active. Returns its id."""
        doc = json.loads(self.path.read_text())
        entry = _new_key_entry()
        doc["keys"].append(entry)
        doc["active"] = entry["id"]
        write_private(self.path, json.dumps(doc, indent=2))
        self.reload()
        return str(entry["id"])

    def retire(self, in_use: set[str]) -> list[str]:
        """Remove every key that is neither active nor in `in_use`. Returns the removed ids."""
        doc = json.loads(self.path.read_text())
        keep = {split_generation(kek_id)[0] for kek_id in in_use} | {doc["active"]}
        removed = [str(k["id"]) for k in doc["keys"] if k["id"] not in keep]
        if removed:
            doc["keys"] = [k for k in doc["keys"] if k["id"] in keep]
            write_private(self.path, json.dumps(doc, indent=2))
            self.reload()
        return removed

    def restore(self, entries: list[dict[str, object]]) -> None:
        """Put removed key entries back (a value appeared under one of them after all)."""
        doc = json.loads(self.path.read_text())
        known = {k["id"] for k in doc["keys"]}
        doc["keys"].extend(e for e in entries if e["id"] not in known)
        write_private(self.path, json.dumps(doc, indent=2))
        self.reload()

    def entries(self) -> list[dict[str, object]]:
        return list(json.loads(self.path.read_text())["keys"])

    def _load(self) -> Envelope:
        doc = json.loads(read_private(self.path, "the keyring"))
        keys = {str(k["id"]): base64.b64decode(k["key"]) for k in doc["keys"]}
        root_id = str(doc["active"])
        active = generation_id(root_id, self._generations.get(root_id, 0))
        return Envelope(keys, active, on_wrap=self._wrapped)

    def _wrapped(self, kek_id: str) -> None:
        # Through here, so a counter installed after the envelope was built still hears of it.
        if self.on_wrap is not None:
            self.on_wrap(kek_id)
