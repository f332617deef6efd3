"""`roomsecrets oauth ...`, run as real subprocesses against the real server and a real OAuth
authorization server on loopback (tests/oauth_provider.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from .harness import Participants, ServerThread, test_settings
from .oauth_provider import OAuthProvider
from .test_cli import Cli, Lines, stderr_line
from .test_oauth import CLIENT_SECRET, REDIRECT, provider_allowed

INVALID_ARGUMENT = 64 + 3
PERMISSION_DENIED = 64 + 7
NOT_FOUND = 64 + 5
NO_TOKEN = NOT_FOUND


@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    # Long-lived access tokens: `oauth token` right after `oauth request` returns the same one.
    with OAuthProvider(access_token_lifetime=3600) as running:
        running.register_client("app", CLIENT_SECRET, [REDIRECT], scope="read write")
        yield running


@pytest.fixture
def server(data_dir: Path, database_url: str, provider: OAuthProvider) -> Iterator[ServerThread]:
    """The egress policy lets the server reach the test provider's loopback port, no other."""
    running = ServerThread(
        test_settings(data_dir, database_url=database_url, egress_allow=provider_allowed(provider))
    ).start()
    yield running
    running.stop()


@pytest.fixture
def alice(room: Participants) -> Cli:
    return Cli(room, "alice")


@pytest.fixture
def bob(room: Participants) -> Cli:
    return Cli(room, "bob")


@pytest.fixture
def admin(room: Participants) -> Cli:
    return Cli(room, "admin", admin=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(CLIENT_SECRET + "\n")
    return path


def inline(provider: OAuthProvider, secret_file: Path) -> list[str]:
    return [
        "--client-id", "app",
        "--authorization-endpoint", provider.authorization_endpoint,
        "--token-endpoint", provider.token_endpoint,
        "--client-secret-file", str(secret_file),
        "--scope", "read", "--scope", "write",
    ]  # fmt: skip


def set_connector(admin: Cli, provider: OAuthProvider, name: str = "example") -> dict[str, Any]:
    out = admin.ok(
        "oauth", "connectors", "set", name,
        "--client-id", "app",
        "--authorization-endpoint", provider.authorization_endpoint,
        "--token-endpoint", provider.token_endpoint,
        "--scope", "read write", "--param", "prompt=consent",
        "--client-secret-stdin",
        stdin=CLIENT_SECRET.encode() + b"\n",
    )  # fmt: skip
    made: dict[str, Any] = json.loads(out)
    return made


def watching_bob(bob: Cli, procs: list[subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], Lines]:
    """`watch` as bob, listening (its ready line read) until the test ends: a participant that
    stops listening has its pending requests cancelled after the grace (0.5 s in tests)."""
    watch = bob.popen("watch")
    procs.append(watch)
    assert watch.stdout is not None
    events = Lines(watch.stdout)
    assert events.next_json() == {"event": "ready", "pending": 0}
    return watch, events


# -- connectors -----------------------------------------------------------------------------------
def test_connectors_set_list_get_delete_never_show_the_secret(
    admin: Cli, alice: Cli, provider: OAuthProvider, secret_file: Path
) -> None:
    made = set_connector(admin, provider)
    assert made["name"] == "example" and made["client_id"] == "app"
    assert made["has_client_secret"] is True
    assert made["scopes"] == ["read", "write"] and made["extra_params"] == {"prompt": "consent"}
    assert made["authorization_endpoint"] == provider.authorization_endpoint
    assert "client_secret" not in made

    listed = alice.ok("oauth", "connectors", "list")
    got = alice.ok("oauth", "connectors", "get", "example")
    assert [c["name"] for c in json.loads(listed)] == ["example"]
    assert json.loads(got)["token_endpoint"] == provider.token_endpoint
    for out in (listed, got):
        assert CLIENT_SECRET.encode() not in out

    # Replacing without a secret keeps the stored one.
    replaced = admin.ok(
        "oauth", "connectors", "set", "example", "--client-id", "app",
        "--authorization-endpoint", provider.authorization_endpoint,
        "--token-endpoint", provider.token_endpoint,
    )  # fmt: skip
    kept = json.loads(replaced)
    assert kept["has_client_secret"] is True and kept["extra_params"] == {}
    # ... but not for other endpoints: the secret is never sent where it was not given for.
    repointed = admin(
        "oauth", "connectors", "set", "example", "--client-id", "app",
        "--authorization-endpoint", provider.authorization_endpoint,
        "--token-endpoint", "https://elsewhere.example/token",
    )  # fmt: skip
    assert repointed.returncode == INVALID_ARGUMENT
    assert "client.client_secret: is required when changing token_endpoint" in stderr_line(repointed)

    denied = alice(
        "oauth", "connectors", "set", "mine", "--client-id", "app",
        "--authorization-endpoint", provider.authorization_endpoint,
        "--token-endpoint", provider.token_endpoint,
        "--client-secret-file", str(secret_file),
    )  # fmt: skip
    assert denied.returncode == PERMISSION_DENIED
    assert stderr_line(denied).startswith("roomsecrets: PERMISSION_DENIED: ")
    assert CLIENT_SECRET.encode() not in denied.stderr + denied.stdout

    denied_delete = alice("oauth", "connectors", "delete", "example")
    assert denied_delete.returncode == PERMISSION_DENIED
    admin.ok("oauth", "connectors", "delete", "example")
    assert json.loads(alice.ok("oauth", "connectors", "list")) == []
    missing = alice("oauth", "connectors", "get", "example")
    assert missing.returncode == NOT_FOUND and missing.stdout == b""
    assert stderr_line(missing).startswith("roomsecrets: NOT_FOUND: ")


# -- the delegated authorization-code flow --------------------------------------------------------
def test_request_provide_token_end_to_end(
    admin: Cli,
    alice: Cli,
    bob: Cli,
    provider: OAuthProvider,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    set_connector(admin, provider)
    _, events = watching_bob(bob, procs)
    request = alice.popen(
        "oauth", "request", "--connector", "example", "--from-participant-id", "bob",
        "--redirect-uri", REDIRECT, "--delegate-to", "alice", "--timeout", "20",
    )  # fmt: skip
    procs.append(request)

    inbound = events.next_json()
    assert inbound["event"] == "oauth_request"
    assert inbound["authorization_url"].startswith(provider.authorization_endpoint)
    assert "prompt=consent" in inbound["authorization_url"]
    assert (inbound["requested_by"], inbound["delegate_to"]) == ("alice", "alice")
    assert request.poll() is None, "the request waits for the authorization"

    code, state = provider.authorize(inbound["authorization_url"])
    redirect = f"{REDIRECT}?{urlencode({'code': code, 'state': state})}"
    # The redirect (it holds the code) on stdin, not in argv where `ps` shows it.
    provided = bob(
        "oauth", "provide", "--request-id", inbound["request_id"], "--redirect-url-file", "-",
        stdin=redirect.encode() + b"\n",
    )  # fmt: skip
    assert provided.returncode == 0, provided.stderr
    assert provided.stdout == b""

    out, err = request.communicate(timeout=15)
    assert request.returncode == 0, err
    access_token = provider.issued_tokens[-1]["access_token"]
    assert out == f"{access_token}\n".encode()
    assert provider.token_requests["authorization_code"] == 1

    stored = alice.ok("oauth", "token", "--connector", "example", "--delegated-by", "bob")
    assert stored == f"{access_token}\n".encode()
    for line in events.seen:
        assert access_token.encode() not in line and CLIENT_SECRET.encode() not in line
    assert CLIENT_SECRET.encode() not in err + provided.stderr


def test_reject_reaches_the_waiting_request(
    alice: Cli,
    bob: Cli,
    provider: OAuthProvider,
    secret_file: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    _, events = watching_bob(bob, procs)
    request = alice.popen(
        "oauth", "request", *inline(provider, secret_file), "--from-participant-id", "bob",
        "--redirect-uri", REDIRECT, "--timeout", "20",
    )  # fmt: skip
    procs.append(request)
    inbound = events.next_json()
    assert inbound["event"] == "oauth_request" and inbound["client_id"] == "app"

    bob.ok("oauth", "reject", "--request-id", inbound["request_id"], "--error", "the user declined")
    out, err = request.communicate(timeout=15)
    assert request.returncode == PERMISSION_DENIED
    assert out == b""
    assert err.decode().startswith("roomsecrets: PERMISSION_DENIED: ")
    assert "the user declined" in err.decode()
    assert CLIENT_SECRET.encode() not in err
    assert provider.token_requests["authorization_code"] == 0


# -- no token, and bad input ----------------------------------------------------------------------
def test_token_with_nothing_stored_exits_not_found_and_prints_nothing(
    alice: Cli, provider: OAuthProvider, secret_file: Path
) -> None:
    done = alice("oauth", "token", *inline(provider, secret_file))
    assert done.returncode == NO_TOKEN
    assert done.stdout == b""
    assert stderr_line(done) == (
        "roomsecrets: no usable token stored (none yet, or it needs re-authorization)"
    )
    missing = alice("oauth", "token", "--connector", "nope")
    assert missing.returncode == NOT_FOUND and missing.stdout == b""
    assert stderr_line(missing).startswith("roomsecrets: NOT_FOUND: ")
    assert b"69 (NOT_FOUND) also means" in alice.ok("oauth", "token", "--help")


def test_usage_errors(alice: Cli, provider: OAuthProvider, secret_file: Path) -> None:
    asked = ["--from-participant-id", "bob", "--redirect-uri", REDIRECT]
    bad_param = alice("oauth", "request", "--connector", "c", "--param", "no-equals-sign", *asked)
    assert bad_param.returncode == 2 and b"argument --param: expected KEY=VALUE" in bad_param.stderr

    both = alice("oauth", "request", "--connector", "c", "--client-id", "app", *asked)
    assert both.returncode == 2
    assert "--connector cannot be combined with --client-id" in stderr_line(both)

    neither = alice("oauth", "token", "--client-id", "app")
    assert neither.returncode == 2
    assert "missing --authorization-endpoint, --token-endpoint" in stderr_line(neither)

    empty = secret_file.with_name("empty")
    empty.write_text("\n")
    no_secret = alice("oauth", "token", *inline(provider, empty))
    assert no_secret.returncode == 2 and "the client secret is empty" in stderr_line(no_secret)

    refused = alice(
        "oauth", "provide", "--request-id", "r1",
        "--redirect-url", f"{REDIRECT}?error=access_denied&state=s1",
    )  # fmt: skip
    assert refused.returncode == 1
    assert "refused the authorization: access_denied" in stderr_line(refused)
    no_code = alice("oauth", "provide", "--request-id", "r1", "--redirect-url", f"{REDIRECT}?state=s1")
    assert no_code.returncode == 2 and "no single `code`" in stderr_line(no_code)
    # The state is required: a redirect without it, or a code without --state, is refused
    # before any call (the server would refuse it too).
    for args, says in [
        (["--redirect-url", f"{REDIRECT}?code=c"], "--redirect-url: no single `state`"),
        (["--redirect-url", f"{REDIRECT}?code=c&state="], "--redirect-url: no single `state`"),
        (["--redirect-url-file", "-"], "--redirect-url-file: no single `state`"),
        (["--code", "c"], "--code needs --state"),
        (["--code-file", "-"], "--code-file needs --state"),
    ]:
        stateless = alice(
            "oauth", "provide", "--request-id", "r1", *args, stdin=f"{REDIRECT}?code=c\n".encode()
        )
        assert stateless.returncode == 2 and says in stderr_line(stateless), stateless.stderr
    clash = alice(
        "oauth", "provide", "--request-id", "r1",
        "--redirect-url", f"{REDIRECT}?code=c&state=s1", "--state", "s2",
    )  # fmt: skip
    assert clash.returncode == 2 and "--state differs" in stderr_line(clash)

    no_command = alice("oauth")
    assert no_command.returncode == 2
