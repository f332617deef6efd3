"""grpcurl, the real binary, against the real server: reflection, health, and the Secrets API
with no .proto files on the command line. `make test` installs grpcurl into .tools/bin."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import Participants, ServerThread

REPO = Path(__file__).resolve().parents[1]


def grpcurl_binary() -> str:
    candidates = [REPO / ".tools" / "bin" / "grpcurl", Path(os.path.expanduser("~/go/bin/grpcurl"))]
    found = shutil.which("grpcurl")
    for path in [*candidates, *([Path(found)] if found else [])]:
        if path.is_file():
            return str(path)
    pytest.fail(
        "grpcurl is not installed: run `make tools` (go install github.com/fullstorydev/grpcurl/cmd/grpcurl)"
    )


def grpcurl(
    server: ServerThread, *args: str, token: str | None = None, data: dict[str, object] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [grpcurl_binary(), "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [server.address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_reflection_lists_the_services(server: ServerThread) -> None:
    listed = grpcurl(server, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "roomsecrets.v1.RoomSecrets" in services
    assert "grpc.health.v1.Health" in services
    described = grpcurl(server, "describe", "roomsecrets.v1.RoomSecrets")
    assert described.returncode == 0, described.stderr
    for method in (
        "SetSecret",
        "GetSecret",
        "ListSecrets",
        "RequestSecret",
        "WatchRequests",
        "RequestOAuthToken",
    ):
        assert f"rpc {method}" in described.stdout


def test_health_reports_serving_without_a_token(server: ServerThread) -> None:
    for service in ("", "roomsecrets.v1.RoomSecrets"):
        checked = grpcurl(server, "grpc.health.v1.Health/Check", data={"service": service})
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["status"] == "SERVING"


def test_set_get_list_through_grpcurl(room: Participants) -> None:
    token = room.token("alice")
    value = b"grpcurl-value-\x00\xff"
    written = grpcurl(
        room.server,
        "roomsecrets.v1.RoomSecrets/SetSecret",
        token=token,
        data={"secret_id": "from-grpcurl", "type": "text/plain", "data": base64.b64encode(value).decode()},
    )
    assert written.returncode == 0, written.stderr
    info = json.loads(written.stdout)["secret"]
    assert info["id"] == "from-grpcurl" and info["etag"]

    read = grpcurl(
        room.server, "roomsecrets.v1.RoomSecrets/GetSecret", token=token, data={"secret_id": "from-grpcurl"}
    )
    assert read.returncode == 0, read.stderr
    reply = json.loads(read.stdout)
    assert base64.b64decode(reply["data"]) == value
    assert reply["secret"]["type"] == "text/plain"

    listed = grpcurl(room.server, "roomsecrets.v1.RoomSecrets/ListSecrets", token=token, data={})
    assert listed.returncode == 0, listed.stderr
    assert [s["id"] for s in json.loads(listed.stdout)["secrets"]] == ["from-grpcurl"]


def test_grpcurl_exit_codes_carry_the_status(room: Participants) -> None:
    unauthenticated = grpcurl(room.server, "roomsecrets.v1.RoomSecrets/ListSecrets", data={})
    assert unauthenticated.returncode == 64 + 16, unauthenticated.stderr
    assert "Unauthenticated" in unauthenticated.stderr
    missing = grpcurl(
        room.server,
        "roomsecrets.v1.RoomSecrets/GetSecret",
        token=room.token("alice"),
        data={"secret_id": "nope"},
    )
    assert missing.returncode == 64 + 5, missing.stderr
    assert "NotFound" in missing.stderr
