"""The `roomsecrets` command, run as a real subprocess against the real server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import jwt
import pytest
from roomsecrets.client import SecretsClient
from roomsecrets_server.cli.main import build_parser
from roomsecrets_server.cli.operator import settings_from_args
from roomsecrets_server.config import Settings

from .harness import Participants, ServerThread, test_settings
from .test_tls import Pki

COMMAND = [sys.executable, "-m", "roomsecrets_server.cli.main"]
URL = "https://git.example/repo.git"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMSECRETS_")}
    env.update(extra)
    return env


def run(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*(command or COMMAND), *args],
        input=stdin,
        capture_output=True,
        env=env if env is not None else clean_env(),
        timeout=30,
        check=False,
    )


class Cli:
    """Runs room commands as one participant (address and token through the environment)."""

    def __init__(self, room: Participants, identity: str, **token_kwargs: Any) -> None:
        self.env = clean_env(
            ROOMSECRETS_ADDRESS=room.server.address, ROOMSECRETS_TOKEN=room.token(identity, **token_kwargs)
        )

    def __call__(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return run(*args, env=self.env, stdin=stdin)

    def ok(self, *args: str, stdin: bytes | None = None) -> bytes:
        done = self(*args, stdin=stdin)
        assert done.returncode == 0, (args, done.returncode, done.stderr)
        return done.stdout

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*COMMAND, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )


class Lines:
    """Reads a process's stream line by line on a thread, so tests can wait with a timeout."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.seen: list[bytes] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.put(line)

    def next(self, timeout: float = 10) -> bytes:
        line = self.lines.get(timeout=timeout)
        self.seen.append(line)
        return line

    def next_json(self, timeout: float = 10) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.next(timeout))
        return value


def stderr_line(done: subprocess.CompletedProcess[bytes]) -> str:
    text = done.stderr.decode().strip()
    assert "\n" not in text, f"expected one line on stderr, got {text!r}"
    return text


@pytest.fixture
def alice(room: Participants) -> Cli:
    return Cli(room, "alice")


@pytest.fixture
def bob(room: Participants) -> Cli:
    return Cli(room, "bob")


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# -- token ----------------------------------------------------------------------------------------
def test_token_mints_a_dev_token_the_server_accepts(server: ServerThread, data_dir: Path) -> None:
    done = run(
        "token", "--data-dir", str(data_dir), "--identity", "alice", "--room", "demo",
        "--role", "agent", "--admin", "--ttl", "120", "--project", "p1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = done.stdout.decode().strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["name"], claims["sub"]) == ("alice", "p1")
    assert 110 <= claims["exp"] - claims["iat"] <= 120
    grants = {g["name"]: g["scope"] for g in claims["grants"]}
    assert grants["room"] == "demo" and grants["role"] == "agent"
    assert "secrets" in grants["api"] and "admin" in grants["api"]
    with SecretsClient(server.address, token) as client:
        assert client.list_secrets() == []

    no_grant = run(
        "token", "--data-dir", str(data_dir), "--identity", "bob", "--room", "demo", "--no-secrets"
    )
    assert no_grant.returncode == 0
    denied = run("list", "--address", server.address, "--token", no_grant.stdout.decode().strip())
    assert denied.returncode == 64 + 7, denied.stderr
    assert stderr_line(denied).startswith("roomsecrets: PERMISSION_DENIED: ")


def test_token_in_a_new_data_dir_says_it_created_a_key(tmp_path: Path) -> None:
    done = run("token", "--data-dir", str(tmp_path / "fresh"), "--identity", "a", "--room", "r")
    assert done.returncode == 0 and done.stdout.count(b".") == 2
    assert b"created a new development signing key" in done.stderr
    assert (tmp_path / "fresh" / "signing-key.json").stat().st_mode & 0o777 == 0o600


# -- storage --------------------------------------------------------------------------------------
def test_set_get_list_exists_delete(alice: Cli, tmp_path: Path) -> None:
    value = "sk-live-1234567890"
    out = alice.ok("set", "--id", "openai", "--type", "text/plain", "--name", "OpenAI", "--text", value)
    assert value.encode() not in out
    info = json.loads(out)
    assert "data_crc32c" not in info, "a checksum of a short secret would help guess it"
    assert (info["id"], info["type"], info["name"], info["size"]) == (
        "openai",
        "text/plain",
        "OpenAI",
        len(value),
    )

    assert alice.ok("get", "--id", "openai") == value.encode()
    target = tmp_path / "value.txt"
    alice.ok("get", "--id", "openai", "--out", str(target))
    assert target.read_bytes() == value.encode()
    assert target.stat().st_mode & 0o777 == 0o600, "a secret written to a file is private"

    listed = alice.ok("list")
    assert value.encode() not in listed
    assert [s["id"] for s in json.loads(listed)] == ["openai"]
    assert alice.ok("exists", "--id", "openai") == b"true\n"

    alice.ok("delete", "openai")
    assert alice.ok("exists", "--id", "openai") == b"false\n"
    missing = alice("get", "--id", "openai")
    assert missing.returncode == 64 + 5
    assert missing.stdout == b""
    assert stderr_line(missing) == "roomsecrets: NOT_FOUND: secret 'openai' not found"
    gone = alice("delete", "--id", "openai")
    assert gone.returncode == 64 + 5
    assert stderr_line(gone) == "roomsecrets: NOT_FOUND: secret 'openai' not found"


def test_value_sources_and_binary_values(alice: Cli, tmp_path: Path) -> None:
    binary = bytes(range(256))
    source = tmp_path / "in.bin"
    source.write_bytes(binary)
    alice.ok("set", "--id", "from-file", "--in", str(source))
    alice.ok("set", "--id", "from-stdin", "--in", "-", stdin=binary)
    alice.ok("set", "--id", "from-b64", "--base64", base64.b64encode(binary).decode())
    for secret_id in ("from-file", "from-stdin", "from-b64"):
        assert alice.ok("get", "--id", secret_id) == binary
    # Addressed by (type, name): the server assigns the id.
    info = json.loads(alice.ok("set", "--type", "git", "--name", URL, "--text", "tok"))
    assert info["id"] and info["name"] == URL
    assert alice.ok("get", "--type", "git", "--name", URL) == b"tok"


def test_usage_errors(alice: Cli, server: ServerThread) -> None:
    both = alice("set", "--id", "x", "--text", "a", "--base64", "YQ==")
    assert both.returncode == 2 and b"not allowed with argument" in both.stderr
    neither = alice("set", "--id", "x")
    assert neither.returncode == 2 and b"one of the arguments" in neither.stderr
    bad_b64 = alice("set", "--id", "x", "--base64", "not base64!")
    assert bad_b64.returncode == 2
    assert stderr_line(bad_b64) == "roomsecrets: --base64: not valid base64"
    no_token = run("list", "--address", server.address)
    assert no_token.returncode == 2 and "no token" in stderr_line(no_token)


def test_call_errors_exit_with_64_plus_the_status_code(alice: Cli, server: ServerThread) -> None:
    bad_token = run("list", "--address", server.address, "--token", "garbage")
    assert bad_token.returncode == 64 + 16
    assert stderr_line(bad_token).startswith("roomsecrets: UNAUTHENTICATED: ")

    invalid = alice("set", "--id", "has space", "--text", "hidden-value")
    assert invalid.returncode == 64 + 3
    line = stderr_line(invalid)
    assert line.startswith("roomsecrets: INVALID_ARGUMENT: secret_id: ")
    assert "hidden-value" not in line

    info = json.loads(alice.ok("set", "--id", "cas", "--text", "v1"))
    alice.ok("set", "--id", "cas", "--text", "v2", "--etag", info["etag"])
    stale = alice("set", "--id", "cas", "--text", "v3-secret", "--etag", info["etag"])
    assert stale.returncode == 64 + 10
    assert stderr_line(stale).startswith("roomsecrets: ABORTED: etag does not match")
    assert b"v3-secret" not in stale.stderr + stale.stdout

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = run("list", "--address", f"127.0.0.1:{closed_port}", "--token", "t")
    assert unreachable.returncode == 64 + 14
    assert stderr_line(unreachable).startswith("roomsecrets: UNAVAILABLE: ")


def test_help_documents_the_exit_codes() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert b"69  NOT_FOUND" in done.stdout and b"80  UNAUTHENTICATED" in done.stdout
    sub = run("get", "--help")
    assert b"exit codes:" in sub.stdout and b"--delegated-by" in sub.stdout


def test_console_script_is_the_same_command() -> None:
    script = Path(sys.executable).with_name("roomsecrets")
    if not script.exists():
        pytest.skip("console script not installed next to the interpreter")
    done = run("--version", command=[str(script)])
    assert done.returncode == 0 and done.stdout.startswith(b"roomsecrets ")


# -- requests -------------------------------------------------------------------------------------
def test_request_and_provide_between_two_processes(
    alice: Cli, bob: Cli, stop_later: list[subprocess.Popen[bytes]]
) -> None:
    value = b"correct horse battery staple"
    watch = bob.popen("watch")
    stop_later.append(watch)
    assert watch.stdout is not None
    events = Lines(watch.stdout)
    assert events.next_json() == {"event": "ready", "pending": 0}

    request = alice.popen(
        "request", "--from-participant-id", "bob", "--url", URL, "--type", "git",
        "--delegate-to", "alice", "--timeout", "20",
    )  # fmt: skip
    stop_later.append(request)
    inbound = events.next_json()
    assert inbound["event"] == "secret_request"
    assert (inbound["url"], inbound["type"], inbound["delegate_to"], inbound["requested_by"]) == (
        URL,
        "git",
        "alice",
        "alice",
    )

    provided = bob("provide", "--request-id", inbound["request_id"], "--in", "-", stdin=value)
    assert provided.returncode == 0, provided.stderr
    assert provided.stdout == b"" and value not in provided.stderr
    out, err = request.communicate(timeout=15)
    assert request.returncode == 0, err
    assert out == value

    closed = events.next_json()
    assert closed == {
        "event": "request_closed",
        "request_id": inbound["request_id"],
        "state": "provided",
        "reason": "",
    }
    watch.send_signal(signal.SIGTERM)
    assert watch.wait(10) == 0
    assert all(value not in line for line in events.seen), "watch never prints values"

    # Bob's stored answer, delegated to alice: delete-requested forces a new prompt next time.
    alice.ok("delete-requested", "--url", URL, "--type", "git", "--delegated-to", "alice")
    again = alice("delete-requested", "--url", URL, "--type", "git", "--delegated-to", "alice")
    assert again.returncode == 64 + 5


def test_reject_and_timeout_reach_the_requester(
    alice: Cli, bob: Cli, stop_later: list[subprocess.Popen[bytes]]
) -> None:
    watch = bob.popen("watch", "--count", "3")
    stop_later.append(watch)
    assert watch.stdout is not None
    events = Lines(watch.stdout)
    assert events.next_json()["event"] == "ready"

    request = alice.popen("request", "--from-participant-id", "bob", "--url", "u1", "--timeout", "20")
    stop_later.append(request)
    inbound = events.next_json()
    bob.ok("reject", "--request-id", inbound["request_id"], "--error", "ask me later")
    _, err = request.communicate(timeout=15)
    assert request.returncode == 64 + 7
    assert err.decode().startswith("roomsecrets: PERMISSION_DENIED: ")
    assert "ask me later" in err.decode()

    started = time.monotonic()
    timed_out = alice("request", "--from-participant-id", "bob", "--url", "u2", "--timeout", "1")
    assert timed_out.returncode == 64 + 4, timed_out.stderr
    assert stderr_line(timed_out).startswith("roomsecrets: DEADLINE_EXCEEDED: ")
    assert time.monotonic() - started < 30  # the 1 s timeout, not the 300 s default
    assert watch.poll() is None

    # The third request ends `watch --count 3`; bob no longer listens, so it is cancelled.
    last = alice("request", "--from-participant-id", "bob", "--url", "u3", "--timeout", "20")
    assert watch.wait(10) == 0
    assert last.returncode == 64 + 9
    assert "stopped listening" in stderr_line(last)

    nobody = alice("request", "--from-participant-id", "carol", "--url", "u4", "--timeout", "10")
    assert nobody.returncode == 64 + 9
    assert "not listening" in stderr_line(nobody)


def test_watch_exits_unavailable_when_the_server_ends_the_stream(tmp_path: Path) -> None:
    running = ServerThread(test_settings(tmp_path / "data")).start()
    participants = Participants(running)
    watch = Cli(participants, "bob").popen("watch")
    try:
        assert watch.stdout is not None and watch.stderr is not None
        assert Lines(watch.stdout).next_json()["event"] == "ready"
        running.stop()  # graceful: ends the WatchRequests streams
        assert watch.wait(10) == 64 + 14
        stderr = watch.stderr.read()
        assert stderr.startswith(b"roomsecrets: UNAVAILABLE: ") and b"shutting down" in stderr, stderr
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
        participants.close()


# -- operator commands ----------------------------------------------------------------------------
def test_rewrap_rotate_while_the_server_serves(
    server: ServerThread, room: Participants, data_dir: Path
) -> None:
    alice = Cli(room, "alice")
    values = {f"s{n}": f"value-{n}".encode() for n in range(3)}
    with SecretsClient(server.address, room.token("alice")) as client:
        for secret_id, value in values.items():
            client.set_secret(secret_id, data=value)

        done = run(
            "rewrap", "--rotate", "--data-dir", str(data_dir), "--database-url", server.settings.database_url
        )
        assert done.returncode == 0, done.stderr
        out = done.stdout.decode()
        assert re.search(r"re-wrapped 3 values under key-encryption key kek-", out), out
        keyring = json.loads((data_dir / "keyring.json").read_text())
        assert len(keyring["keys"]) == 2 and keyring["active"] == keyring["keys"][1]["id"]
        for key in keyring["keys"]:
            assert key["key"] not in out + done.stderr.decode(), "no key material is printed"

        for secret_id, value in values.items():
            assert alice.ok("get", "--id", secret_id) == value
        client.set_secret("after", data=b"new")  # new writes use the new key
        content = client.get_secret("after")
        assert content is not None and content.data == b"new"

    # Nothing left under the old key: a second rewrap moves nothing.
    again = run("rewrap", "--data-dir", str(data_dir), "--database-url", server.settings.database_url)
    assert again.returncode == 0 and b"re-wrapped 0 values" in again.stdout


def test_rewrap_refuses_a_data_dir_without_a_keyring(tmp_path: Path) -> None:
    done = run("rewrap", "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert stderr_line(done).startswith("roomsecrets: no keyring at ")
    assert not (tmp_path / "keyring.json").exists()


@contextlib.contextmanager
def serving(*args: str, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str, bytes]]:
    """`roomsecrets serve --listen 127.0.0.1:0 ARGS`: (process, address, ready line) once it
    serves; killed on the way out if the test did not stop it."""
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--listen", "127.0.0.1:0", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        log = Lines(proc.stderr)
        ready = b""
        while b"serving on" not in ready:
            ready = log.next(timeout=15)
        match = re.search(rb"serving on (127\.0\.0\.1:(\d+)) ", ready)
        assert match and int(match.group(2)) > 0, ready
        yield proc, match.group(1).decode(), ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_prints_the_ready_line_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "served"
    env = clean_env(ROOMSECRETS_DATA_DIR=str(data_dir))
    with serving("--listener-grace", "0.5", env=env) as (proc, address, ready):
        assert b"roomsecrets token --data-dir" in ready
        token = run("token", "--data-dir", str(data_dir), "--identity", "alice", "--room", "r")
        with SecretsClient(address, token.stdout.decode().strip()) as client:
            client.set_secret("k", data=b"v")
            content = client.get_secret("k")
            assert content is not None and content.data == b"v"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert (data_dir / "keyring.json").stat().st_mode & 0o777 == 0o600


def test_serve_pins_issuer_and_audience_and_token_mints_them(tmp_path: Path) -> None:
    data_dir = tmp_path / "pinned"
    env = clean_env(ROOMSECRETS_DATA_DIR=str(data_dir), ROOMSECRETS_TOKEN_ISSUER="https://id.example")
    with serving("--token-audience", "rs-prod", env=env) as (proc, address, _):
        base = ("token", "--data-dir", str(data_dir), "--identity", "alice", "--room", "r")
        pinned = run(*base, "--issuer", "https://id.example", "--audience", "rs-prod")
        claims = jwt.decode(pinned.stdout.decode().strip(), options={"verify_signature": False})
        assert (claims["iss"], claims["aud"]) == ("https://id.example", "rs-prod")
        with SecretsClient(address, pinned.stdout.decode().strip()) as client:
            assert client.list_secrets() == []
        plain = run(*base).stdout.decode().strip()
        refused = run("list", "--address", address, "--token", plain)
        assert stderr_line(refused).startswith("roomsecrets: UNAUTHENTICATED: "), refused.stderr
        assert b"issuer (iss)" in refused.stderr or b"'iss'" in refused.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_serve_on_a_taken_port_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.decode().splitlines()[-1].startswith("roomsecrets: cannot start the server: ")


def test_serve_refuses_plaintext_on_a_public_address(tmp_path: Path) -> None:
    done = run("serve", "--data-dir", str(tmp_path), "--listen", "0.0.0.0:0")
    assert done.returncode == 2
    assert "refusing plaintext" in stderr_line(done)


def test_serve_flags_and_environment_map_to_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        [
            "serve", "--data-dir", "d", "--listen", "0.0.0.0:7000", "--max-value-bytes", "2048",
            "--listener-grace", "1.5", "--shutdown-grace", "2", "--tls-cert", "c.pem", "--tls-key", "k.pem",
            "--tls-client-ca", "ca.pem", "--allow-insecure-remote", "--jwt-public-key", "a.pem",
            "--jwt-public-key", "b.pem", "--jwks", "keys.json", "--no-dev-key", "--audit-log", "audit.jsonl",
        ]
    )  # fmt: skip
    assert settings_from_args(args) == Settings(
        data_dir=Path("d"),
        listen="0.0.0.0:7000",
        max_value_bytes=2048,
        listener_grace=1.5,
        shutdown_grace=2.0,
        jwt_public_keys=(Path("a.pem"), Path("b.pem")),
        jwks_files=(Path("keys.json"),),
        dev_signing_key=False,
        tls_cert=Path("c.pem"),
        tls_key=Path("k.pem"),
        tls_client_ca=Path("ca.pem"),
        allow_insecure_remote=True,
        audit_log=Path("audit.jsonl"),
    )
    monkeypatch.setenv("ROOMSECRETS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ROOMSECRETS_LISTEN", "127.0.0.1:6000")
    monkeypatch.setenv("ROOMSECRETS_MAX_VALUE_BYTES", "4096")
    from_env = settings_from_args(build_parser().parse_args(["serve"]))
    assert (from_env.data_dir, from_env.listen, from_env.max_value_bytes) == (
        tmp_path,
        "127.0.0.1:6000",
        4096,
    )
    assert from_env.dev_key_on and from_env.listener_grace == Settings(data_dir=tmp_path).listener_grace
    flag_wins = settings_from_args(build_parser().parse_args(["serve", "--listen", "127.0.0.1:1"]))
    assert flag_wins.listen == "127.0.0.1:1"


def test_room_commands_over_mutual_tls(tmp_path: Path, data_dir: Path) -> None:
    pki = Pki(tmp_path / "pki")
    settings = test_settings(
        data_dir, tls_cert=pki.files["server"], tls_key=pki.files["server-key"], tls_client_ca=pki.files["ca"]
    )
    running = ServerThread(settings).start()
    try:
        token_file = tmp_path / "token"
        token_file.write_text(Participants(running).token("alice") + "\n")
        common = [
            "--address",
            running.address,
            "--token-file",
            str(token_file),
            "--tls-ca",
            str(pki.files["ca"]),
        ]
        client_cert = [
            "--client-cert",
            str(pki.files["client"]),
            "--client-key",
            str(pki.files["client-key"]),
        ]
        done = run("set", *common, *client_cert, "--id", "tls", "--text", "over-mtls")
        assert done.returncode == 0, done.stderr
        assert run("get", *common, *client_cert, "--id", "tls").stdout == b"over-mtls"
        refused = run("get", *common, "--id", "tls")
        assert refused.returncode == 64 + 14
        half = run("get", *common, "--client-cert", str(pki.files["client"]), "--id", "tls")
        assert half.returncode == 2 and "both --client-cert and --client-key" in stderr_line(half)
    finally:
        running.stop()
