"""The audit log: lines are hand-built JSON (bench-driven) that must parse to exactly what
json.dumps would have written; every read, write, delete, request and answer is a structured
line; and it fails closed (a read whose line cannot be written is refused) unless configured to
buffer."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.audit import AuditLog
from roomsecrets_server.batching import GroupWindow
from roomsecrets_server.errors import Unavailable

from .harness import Participants, ServerThread, test_settings

AWKWARD = ["plain", 'quote " and \\ backslash', "tab\tnewline\n", "ünïcødé ☃ 𝄞", "\x00\x1f", "</script>"]


@pytest.mark.parametrize("text", AWKWARD)
async def test_audit_lines_are_json_objects_with_the_recorded_fields(tmp_path: Path, text: str) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    await audit.record("get_secret", room=text, actor="alice", secret_id=text, owner="alice")
    await audit.record("delete_secret", room="r", actor=text, outcome="not_found")
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


# -- fail closed ------------------------------------------------------------------------------------
async def test_fail_closed_record_raises_when_the_line_cannot_be_written() -> None:
    audit = AuditLog(Path("/dev/full"))  # every write fails with ENOSPC
    with pytest.raises(Unavailable) as refused:
        await audit.record("get_secret", room="r", actor="alice", secret_id="s")
    assert refused.value.reason == "AUDIT_UNAVAILABLE"
    await audit.close()


async def test_fail_closed_lines_of_one_loop_iteration_share_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    writes = counting_writes(monkeypatch)
    await asyncio.gather(
        *(audit.record("get_secret", room="r", actor=f"a{i}", secret_id="s") for i in range(50))
    )
    assert writes == [50]  # one write(2) for the 50 callers, each answered only after it
    await audit.record("exists", room="r", actor="late")  # the next iteration: its own write
    assert writes == [50, 1]
    await audit.close()
    assert len(path.read_text().splitlines()) == 51


def counting_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of lines in each write(2) the audit log makes from now on."""
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(data.count(b"\n"))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)  # the os module audit.py calls
    return writes


async def staggered(audit: AuditLog, callers: int, gap: float) -> float:
    """`callers` records arriving `gap` seconds apart, as gRPC hands calls over one event-loop
    iteration at a time; returns how long the last one took to be answered after it arrived."""

    async def one(i: int) -> float:
        await asyncio.sleep(i * gap)
        arrived = loop.time()
        await audit.record("get_secret", room="r", actor=f"a{i}", secret_id="s")
        return loop.time() - arrived

    loop = asyncio.get_running_loop()
    return (await asyncio.gather(*(one(i) for i in range(callers))))[-1]


async def test_a_lone_caller_never_waits_for_the_group_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog(tmp_path / "audit.log", group_window=3600)  # a wait would time the test out
    writes = counting_writes(monkeypatch)
    for i in range(GroupWindow.LEARN_EVERY - 1):
        await asyncio.wait_for(audit.record("get_secret", room="r", actor=f"a{i}"), 5)
    assert writes == [1] * (GroupWindow.LEARN_EVERY - 1)
    await audit.close()


async def test_calls_arriving_together_share_one_write_without_waiting_out_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 0.5
    audit = AuditLog(tmp_path / "audit.log", group_window=window)
    writes = counting_writes(monkeypatch)
    for i in range(GroupWindow.LEARN_EVERY - 1):  # alone: written at once, one by one
        await audit.record("exists", room="r", actor=f"a{i}")
    del writes[:]
    # This batch runs its full window and learns that 8 calls arrive together...
    await staggered(audit, 8, gap=0.005)
    assert writes == [8]
    # ...so the next 8, arriving in 8 different loop iterations, share one write that leaves as
    # soon as the 8th is in, not when the window ends.
    last_waited = await staggered(audit, 8, gap=0.005)
    assert writes == [8, 8]
    assert last_waited < window / 4, last_waited
    # Alone again: this one waits out the window (8 were expected) and teaches that; the next
    # is written at once.
    await audit.record("exists", room="r", actor="alone")
    assert writes == [8, 8, 1]
    assert await staggered(audit, 1, gap=0) < window / 4
    assert writes == [8, 8, 1, 1]
    await audit.close()
    assert len((tmp_path / "audit.log").read_text().splitlines()) == GroupWindow.LEARN_EVERY - 1 + 18


async def test_fail_closed_every_caller_of_a_failed_batch_is_refused_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = AuditLog(Path("/dev/full"))
    results = await asyncio.gather(
        *(audit.record("get_secret", room="r", actor=f"a{i}", secret_id="s") for i in range(5)),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [Unavailable] * 5
    assert "refusing 5 calls" in caplog.text
    audit.record_nowait("request_secret", room="r", actor="a", outcome="expired")  # never raises
    await asyncio.sleep(0)
    await audit.close()


async def test_a_cancelled_caller_still_has_its_line_written_and_others_are_not_disturbed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    cancelled = asyncio.ensure_future(audit.record("get_secret", room="r", actor="gone", secret_id="s"))
    other = asyncio.ensure_future(audit.record("get_secret", room="r", actor="stays", secret_id="s"))
    await asyncio.sleep(0)  # both lines queued
    cancelled.cancel()
    await other
    assert cancelled.cancelled()
    actors = [json.loads(line)["actor"] for line in path.read_text().splitlines()]
    assert actors == ["gone", "stays"]
    await audit.close()


async def test_buffered_record_never_raises_and_says_so_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(Path("/dev/full"), fail_closed=False)
    await audit.record("get_secret", room="r", actor="alice", secret_id="s")
    audit.flush()
    assert "audit log write failed" in caplog.text
    await audit.close()


@pytest.mark.parametrize("buffered", [False, True])
def test_a_read_is_refused_when_its_audit_line_cannot_be_written(
    data_dir: Path, database_url: str, buffered: bool
) -> None:
    server = ServerThread(test_settings(data_dir, database_url=database_url)).start()
    room = Participants(server)
    value = b"audited-value-91b2"
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s", data=value), metadata=room.auth("alice"))
    room.close()
    server.stop()
    settings = test_settings(
        data_dir, database_url=database_url, audit_log=Path("/dev/full"), audit_buffered=buffered
    )
    server = ServerThread(settings).start()
    room = Participants(server)
    try:
        get = pb.GetSecretRequest(secret_id="s")
        if buffered:  # fails open, by configuration
            assert room.stub.GetSecret(get, metadata=room.auth("alice")).data == value
            return
        with pytest.raises(grpc.RpcError) as refused:
            room.stub.GetSecret(get, metadata=room.auth("alice"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit log" in (refused.value.details() or "")
        assert value.decode() not in (refused.value.details() or "")
    finally:
        room.close()
        server.stop()


# -- every action is recorded -------------------------------------------------------------------------
def test_every_read_write_delete_request_and_answer_is_a_structured_line(
    room: Participants, data_dir: Path
) -> None:
    alice, bob = room.auth("alice"), room.auth("bob")
    stub = room.stub
    stub.SetSecret(pb.SetSecretRequest(secret_id="s", data=b"v1", delegated_to="bob"), metadata=alice)
    stub.GetSecret(pb.GetSecretRequest(secret_id="s", delegated_to="bob"), metadata=alice)
    stub.GetSecret(pb.GetSecretRequest(secret_id="s", delegated_by="alice"), metadata=bob)
    stub.Exists(pb.ExistsRequest(secret_id="s", delegated_to="bob"), metadata=alice)
    stub.ListSecrets(pb.ListSecretsRequest(), metadata=bob)
    stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="s", delegated_to="bob"), metadata=alice)
    watch = stub.WatchRequests(pb.WatchRequestsRequest(), metadata=bob)
    events = iter(watch)
    next(events)  # ready
    asked = stub.RequestSecret.future(
        pb.RequestSecretRequest(from_participant_id="bob", url="https://x.example", timeout=30),
        metadata=alice,
    )
    inbound = next(events).secret_request
    stub.ProvideSecret(pb.ProvideSecretRequest(request_id=inbound.request_id, data=b"given"), metadata=bob)
    assert asked.result(10).data == b"given"
    second = stub.RequestSecret.future(
        pb.RequestSecretRequest(from_participant_id="bob", url="https://y.example", timeout=30),
        metadata=alice,
    )
    while not (event := next(events)).HasField("secret_request"):
        pass
    stub.RejectSecret(
        pb.RejectSecretRequest(request_id=event.secret_request.request_id, error="no"), metadata=bob
    )
    with pytest.raises(grpc.RpcError):
        second.result(10)
    watch.cancel()  # type: ignore[no-untyped-call]

    lines = [json.loads(line) for line in (data_dir / "audit.log").read_text().splitlines()]
    seen = {(e["action"], e["actor"], e.get("secret_id", "")) for e in lines} | {
        (e["action"], e["actor"], e.get("request_id", "")) for e in lines
    }
    expected = {
        ("set_secret", "alice", "s"),
        ("get_secret", "alice", "s"),
        ("get_secret", "bob", "s"),
        ("exists", "alice", "s"),
        ("list_secrets", "bob", ""),
        ("delete_secret", "alice", "s"),
        ("watch_requests", "bob", ""),
        ("provide_secret", "bob", inbound.request_id),
        ("reject_secret", "bob", event.secret_request.request_id),
    }
    assert expected <= seen, expected - seen
    requested = [e for e in lines if e["action"] == "request_secret" and e["actor"] == "alice"]
    assert {e.get("request_id") for e in requested} >= {inbound.request_id, event.secret_request.request_id}
    for entry in lines:  # structured: who, where, what, outcome on every line
        assert {"ts", "action", "room", "actor", "outcome"} <= entry.keys()
        assert entry["room"] == "dev-project/room-1"  # the room, qualified by its project
    assert b"given" not in (data_dir / "audit.log").read_bytes()


async def test_a_lone_caller_relearns_less_and_less_often(tmp_path: Path) -> None:
    """Each full window costs a lone caller the window: once windows keep finding one line, they
    come every 32nd, 64th, 128th, ... batch (up to every 1,024th), not every 32nd."""
    window = 0.05
    audit = AuditLog(tmp_path / "audit.log", group_window=window)
    waited = [await staggered(audit, 1, gap=0) >= window / 2 for _ in range(300)]
    await audit.close()
    learned_at = [i + 1 for i, w in enumerate(waited) if w]
    assert learned_at == [32, 96, 224], learned_at
