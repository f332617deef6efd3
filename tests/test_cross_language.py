"""Participants in different languages through one real server: a JS participant asks a Python
participant for a secret and receives it; a Go participant asks a JS participant; one rejects and
the asker sees the reason. The JS and Go sides are the clients' example programs
(clients/js/examples/participant.ts, clients/go/cmd/roomsecrets-participant)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from roomsecrets import SecretRequest, SecretsClient

from .harness import Participants

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
GO = ROOT / "clients" / "go"


@pytest.fixture(scope="module")
def js_participant() -> list[str]:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules").is_dir():
        pytest.skip("node or clients/js/node_modules missing: run `make test`, which installs them")
    script = JS / "dist" / "examples" / "participant.js"
    if not script.exists():
        subprocess.run(["npm", "run", "build", "--silent"], cwd=JS, check=True)
    return [node, str(script)]


@pytest.fixture(scope="module")
def go_participant(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed")
    binary = tmp_path_factory.mktemp("go") / "roomsecrets-participant"
    subprocess.run([go, "build", "-o", str(binary), "./cmd/roomsecrets-participant"], cwd=GO, check=True)
    return [str(binary)]


@pytest.fixture
def js_server(room: Participants, js_participant: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A JS participant "js-bob" answering requests until its stdin closes."""
    process = subprocess.Popen(
        [*js_participant, "serve", f"http://{room.server.address}", room.token("js-bob")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    yield process
    assert process.stdin is not None
    process.stdin.close()
    process.wait(15)


def test_js_asks_python(room: Participants, js_participant: list[str]) -> None:
    def handler(request: SecretRequest) -> bytes:
        return b"py-secret-for:" + request.url.encode()

    with SecretsClient(room.server.address, room.token("py-bob"), secret_request_handler=handler):
        done = subprocess.run(
            [
                *js_participant,
                "ask",
                f"http://{room.server.address}",
                room.token("js-alice"),
                "py-bob",
                "repo-1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "py-secret-for:repo-1\n"


def test_go_asks_js_and_sees_a_rejection(
    room: Participants, js_server: subprocess.Popen[str], go_participant: list[str]
) -> None:
    ask = [*go_participant, "ask", room.server.address, room.token("go-alice"), "js-bob"]
    done = subprocess.run([*ask, "repo-2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "js-secret-for:repo-2\n"

    rejected = subprocess.run([*ask, "deny-this"], capture_output=True, text=True, timeout=60)
    assert rejected.returncode == 1
    assert rejected.stderr.startswith("PERMISSION_DENIED:") and "js says no" in rejected.stderr


def test_python_asks_go(room: Participants, go_participant: list[str]) -> None:
    process = subprocess.Popen(
        [*go_participant, "serve", room.server.address, room.token("go-bob")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        with SecretsClient(room.server.address, room.token("py-alice")) as alice:
            assert alice.request_secret("go-bob", "repo-3", timeout=20) == b"go-secret-for:repo-3"
            with pytest.raises(Exception, match="go says no"):
                alice.request_secret("go-bob", "deny-it", timeout=20)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(15)
