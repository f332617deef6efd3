"""Audit lines are hand-built JSON (bench-driven); they must parse to exactly what json.dumps
would have written, whatever characters an identity or id contains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from roomsecrets_server.audit import AuditLog

AWKWARD = ["plain", 'quote " and \\ backslash', "tab\tnewline\n", "ünïcødé ☃ 𝄞", "\x00\x1f", "</script>"]


@pytest.mark.parametrize("text", AWKWARD)
async def test_audit_lines_are_json_objects_with_the_recorded_fields(tmp_path: Path, text: str) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    audit.record("get_secret", room=text, actor="alice", secret_id=text, owner="alice")
    audit.record("delete_secret", room="r", actor=text, outcome="not_found")
    await audit.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert isinstance(first.pop("ts"), float)
    assert first == {
        "action": "get_secret",
        "room": text,
        "actor": "alice",
        "outcome": "ok",
        "secret_id": text,
        "owner": "alice",
    }
    second.pop("ts")
    assert second == {"action": "delete_secret", "room": "r", "actor": text, "outcome": "not_found"}
    assert all(line.isascii() for line in lines)
