"""The project commands of `roomsecrets` (keys, pull-secrets, services, dockerconfig, run), run as
real subprocesses against the real server."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Participants
from .test_cli import Cli, Lines, stderr_line

PY = sys.executable
OPENAI = "sk-openai-first-Zq81"
OPENAI_ROTATED = "sk-openai-second-Wx42"
DB_PASSWORD = "db-pass-p7#Hq"
DB_URL = "postgres://api:db-pass-p7#Hq@db:5432/app"
REGISTRY = "registry.example"
REGISTRY_USER = "robot$api"
REGISTRY_PASSWORD = "reg-pass-Lk3=9"
LOG_LEVEL = "debug"
SECRET_VALUES = (OPENAI, OPENAI_ROTATED, DB_PASSWORD, DB_URL, REGISTRY_PASSWORD)

MANIFEST = f"""\
version: v1
kind: Service
metadata:
  name: api
  description: The public API server.
container:
  image: {REGISTRY}/api:1.2
  command: api-server --port 8080
  secrets: [openai, db]
  pull_secret: regcred
  environment:
    - name: LOG_LEVEL
      value: {LOG_LEVEL}
"""

PLAIN = """\
version: v1
kind: Service
metadata: {name: plain}
container:
  image: registry.example/plain:1
  environment:
    - {name: GREETING, value: hello}
"""

PRINT_OPENAI = "import os, sys; print(os.environ['OPENAI_API_KEY']); sys.exit(7)"
WAIT_FOR_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
    "sys.exit(3)\n"
)


@pytest.fixture
def admin(room: Participants) -> Cli:
    return Cli(room, "ops", project_role="admin")


@pytest.fixture
def developer(room: Participants) -> Cli:
    return Cli(room, "dev", project_role="developer")


@pytest.fixture
def api(room: Participants) -> Cli:
    return Cli(room, "api", project_role="service", service="api")


@pytest.fixture
def project(admin: Cli, tmp_path: Path) -> Path:
    """openai and db keys, the regcred pull secret and the `api` service, created by the admin."""
    openai = tmp_path / "openai.env"
    openai.write_text(f"# the OpenAI key\n\nOPENAI_API_KEY={OPENAI}\n")
    db = tmp_path / "db.env"
    db.write_text(f'export DB_PASSWORD="{DB_PASSWORD}"\nDATABASE_URL = {DB_URL}\n')
    created = json.loads(
        admin.ok("keys", "create", "--name", "OpenAI", "--id", "openai", "--from-env-file", str(openai))
    )
    assert (created["id"], created["name"], created["keys"]) == ("openai", "OpenAI", ["OPENAI_API_KEY"])
    created = json.loads(
        admin.ok("keys", "create", "--name", "Database", "--id", "db", "--from-env-file", str(db))
    )
    assert created["keys"] == ["DATABASE_URL", "DB_PASSWORD"]

    out = admin.ok(
        "pull-secrets", "create", "--name", "Registry", "--id", "regcred", "--flavor", "docker",
        "--server", REGISTRY, "--username", REGISTRY_USER, "--password-stdin",
        stdin=f"{REGISTRY_PASSWORD}\n".encode(),
    )  # fmt: skip
    pull = json.loads(out)
    assert (pull["id"], pull["flavor"], pull["server"], pull["username"]) == (
        "regcred",
        "docker",
        REGISTRY,
        REGISTRY_USER,
    )
    assert "password" not in pull

    manifest = tmp_path / "api.yaml"
    manifest.write_text(MANIFEST)
    applied = json.loads(admin.ok("services", "apply", str(manifest)))
    assert (applied["name"], applied["kind"]) == ("api", "Service")
    assert "manifest" not in applied
    shown = json.loads(admin.ok("services", "apply", str(manifest), "--show-manifest"))
    assert shown["manifest"] == MANIFEST
    return tmp_path


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# -- run ------------------------------------------------------------------------------------------
def test_run_execs_the_command_with_the_resolved_environment(project: Path, api: Cli) -> None:
    done = api("run", "--service", "api", "--", PY, "-c", PRINT_OPENAI)
    assert done.returncode == 7, done.stderr
    assert done.stdout == f"{OPENAI}\n".encode()
    assert done.stderr == b""

    show = "import os; print(os.environ['DB_PASSWORD'], os.environ['LOG_LEVEL'], os.environ['KEEP'])"
    env_before = api.env.copy()
    api.env["KEEP"] = "from-parent"
    api.env["LOG_LEVEL"] = "overridden"
    try:
        out = api.ok("run", "--service", "api", "--", PY, "-c", show)
    finally:
        api.env = env_before
    assert out.decode().split() == [DB_PASSWORD, LOG_LEVEL, "from-parent"], "resolved values win"

    has_token = "import os; print('ROOMSECRETS_TOKEN' in os.environ)"
    assert api.ok("run", "--service", "api", "--", PY, "-c", has_token) == b"False\n"
    assert api.ok("run", "--service", "api", "--keep-token", "--", PY, "-c", has_token) == b"True\n"


def test_run_sees_a_rotated_key(project: Path, admin: Cli, api: Cli) -> None:
    out = admin.ok(
        "keys", "update", "openai", "--set-stdin", stdin=f"OPENAI_API_KEY={OPENAI_ROTATED}\n".encode()
    )
    assert json.loads(out)["keys"] == ["OPENAI_API_KEY"]
    assert OPENAI_ROTATED.encode() not in out
    done = api("run", "--service", "api", "--", PY, "-c", PRINT_OPENAI)
    assert done.returncode == 7, done.stderr
    assert done.stdout == f"{OPENAI_ROTATED}\n".encode()


def test_run_signals_reach_the_command(
    project: Path, api: Cli, stop_later: list[subprocess.Popen[bytes]]
) -> None:
    proc = api.popen("run", "--service", "api", "--", PY, "-c", WAIT_FOR_SIGTERM)
    stop_later.append(proc)
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    assert lines.next(timeout=20) == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 42


def test_run_usage_and_exec_errors(project: Path, api: Cli) -> None:
    missing = api("run", "--service", "api")
    assert missing.returncode == 2
    assert "run needs a command" in stderr_line(missing)
    also_missing = api("run", "--service", "api", "--")
    assert also_missing.returncode == 2

    not_found = api("run", "--service", "api", "--", "no-such-command-xyz", "arg")
    assert not_found.returncode == 127
    assert stderr_line(not_found) == "roomsecrets: no-such-command-xyz: command not found"
    assert not_found.stdout == b""

    not_executable = project / "script.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    cannot = api("run", "--service", "api", "--", str(not_executable))
    assert cannot.returncode == 126
    assert "cannot execute" in stderr_line(cannot)


def test_run_with_another_services_token_is_denied(project: Path, room: Participants) -> None:
    other = Cli(room, "other", project_role="service", service="other")
    done = other("run", "--service", "api", "--", PY, "-c", PRINT_OPENAI)
    assert done.returncode == 64 + 7
    line = stderr_line(done)
    assert line.startswith("roomsecrets: PERMISSION_DENIED: ")
    assert done.stdout == b""
    for value in SECRET_VALUES:
        assert value.encode() not in done.stderr


# -- dockerconfig ---------------------------------------------------------------------------------
def test_dockerconfig_prints_the_pull_secret(project: Path, admin: Cli, api: Cli, tmp_path: Path) -> None:
    doc = json.loads(api.ok("dockerconfig", "--service", "api"))
    entry = doc["auths"][REGISTRY]
    assert base64.b64decode(entry["auth"]).decode() == f"{REGISTRY_USER}:{REGISTRY_PASSWORD}"
    assert (entry["username"], entry["password"]) == (REGISTRY_USER, REGISTRY_PASSWORD)

    target = tmp_path / "config.json"
    api.ok("dockerconfig", "--service", "api", "--out", str(target))
    assert json.loads(target.read_bytes()) == doc
    assert target.stat().st_mode & 0o777 == 0o600

    # A new password (from a file) shows in the next document.
    password_file = tmp_path / "password"
    password_file.write_text("reg-pass-new\n")
    updated = admin.ok("pull-secrets", "update", "regcred", "--password-file", str(password_file))
    assert b"reg-pass-new" not in updated
    entry = json.loads(api.ok("dockerconfig", "--service", "api"))["auths"][REGISTRY]
    assert base64.b64decode(entry["auth"]).decode() == f"{REGISTRY_USER}:reg-pass-new"

    plain = tmp_path / "plain.yaml"
    plain.write_text(PLAIN)
    admin.ok("services", "apply", str(plain))
    none = admin("dockerconfig", "--service", "plain")
    assert none.returncode == 64 + 5
    assert none.stdout == b""
    assert "has no pull secret" in stderr_line(none)


# -- values stay out of output --------------------------------------------------------------------
def test_values_are_never_printed(project: Path, admin: Cli, developer: Cli, api: Cli) -> None:
    outputs = [
        admin("keys", "get", "openai"),
        admin("keys", "get", "db"),
        admin("keys", "list"),
        admin("services", "get", "api"),
        admin("services", "list", "--show-manifest"),
        admin("pull-secrets", "list"),
        developer("keys", "get", "openai", "--show-values"),
        developer("keys", "list"),
        developer("services", "get", "api"),
        developer("pull-secrets", "list"),
        api("run", "--service", "api", "--", PY, "-c", "pass"),
    ]
    for done in outputs:
        assert done.returncode == 0, done.stderr
        for value in SECRET_VALUES:
            assert value.encode() not in done.stdout + done.stderr, done.args

    meta = json.loads(admin.ok("keys", "get", "openai"))
    assert meta == {**meta, "id": "openai", "name": "OpenAI", "keys": ["OPENAI_API_KEY"]}
    assert "data" not in meta
    dev_view = developer("keys", "get", "openai", "--show-values")
    assert "data" not in json.loads(dev_view.stdout)
    assert b"returned no values" in dev_view.stderr

    service = json.loads(admin.ok("services", "get", "api"))
    assert service["manifest"] == MANIFEST and service["kind"] == "Service"
    assert [s["name"] for s in json.loads(admin.ok("services", "list"))] == ["api"]
    assert "manifest" not in json.loads(admin.ok("services", "list"))[0]
    pulls = json.loads(admin.ok("pull-secrets", "list"))
    assert [p["id"] for p in pulls] == ["regcred"] and "password" not in pulls[0]

    # The admin reads values only when asked.
    shown = json.loads(admin.ok("keys", "get", "db", "--show-values"))
    assert shown["data"] == {"DB_PASSWORD": DB_PASSWORD, "DATABASE_URL": DB_URL}


def test_developers_cannot_write_keys_or_resolve(project: Path, developer: Cli) -> None:
    denied = developer("keys", "create", "--name", "x", "--stdin", stdin=b"A=secret-a\n")
    assert denied.returncode == 64 + 7
    assert stderr_line(denied).startswith("roomsecrets: PERMISSION_DENIED: ")
    assert b"secret-a" not in denied.stderr
    resolve = developer("dockerconfig", "--service", "api")
    assert resolve.returncode == 64 + 7 and resolve.stdout == b""


# -- keys: env files, update, delete --------------------------------------------------------------
def test_invalid_env_file_lines_name_the_line_not_the_value(admin: Cli, tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("# comment\nGOOD=fine\nsk-leaked-value-123\n")
    done = admin("keys", "create", "--name", "bad", "--from-env-file", str(env_file))
    assert done.returncode == 2
    line = stderr_line(done)
    assert "line 3" in line and "sk-leaked-value-123" not in line
    bad_name = admin("keys", "create", "--name", "bad", "--stdin", stdin=b"1BAD=hidden-value-456\n")
    assert bad_name.returncode == 2
    assert "line 1" in stderr_line(bad_name) and b"hidden-value-456" not in bad_name.stderr
    twice = admin("keys", "create", "--name", "bad", "--stdin", stdin=b"A=one-value\nA=two-value\n")
    assert twice.returncode == 2
    assert "line 2: A given again (first on line 1)" in stderr_line(twice)
    assert b"-value" not in twice.stderr
    empty = admin("keys", "create", "--name", "empty", "--stdin", stdin=b"# nothing\n\n")
    assert empty.returncode == 2 and "no KEY=VALUE lines" in stderr_line(empty)
    unreadable = admin("keys", "create", "--name", "x", "--from-env-file", str(tmp_path / "missing.env"))
    assert unreadable.returncode == 1 and "cannot read" in stderr_line(unreadable)
    bad_var = admin("run", "--service", "api", "--var", "obscure-value-789", "--", PY)
    assert bad_var.returncode == 2 and b"obscure-value-789" not in bad_var.stderr


def test_keys_update_remove_rename_and_delete(admin: Cli) -> None:
    created = json.loads(
        admin.ok("keys", "create", "--name", "Mixed", "--stdin", stdin=b"A=1\nB='two words'\n")
    )
    key_id = created["id"]
    assert key_id and created["keys"] == ["A", "B"]
    assert json.loads(admin.ok("keys", "get", key_id, "--show-values"))["data"] == {
        "A": "1",
        "B": "two words",
    }

    nothing = admin("keys", "update", key_id)
    assert nothing.returncode == 2 and "nothing to update" in stderr_line(nothing)
    renamed = json.loads(admin.ok("keys", "update", key_id, "--name", "Renamed", "--remove", "A"))
    assert (renamed["name"], renamed["keys"]) == ("Renamed", ["B"])
    stale = admin("keys", "update", key_id, "--remove", "B", "--etag", created["etag"])
    assert stale.returncode == 64 + 10
    assert stderr_line(stale).startswith("roomsecrets: ABORTED: ")

    listed = json.loads(admin.ok("keys", "list"))
    assert [k["id"] for k in listed] == [key_id]
    admin.ok("keys", "delete", key_id, "--etag", renamed["etag"])
    missing = admin("keys", "get", key_id)
    assert missing.returncode == 64 + 5
    assert stderr_line(missing) == f"roomsecrets: NOT_FOUND: secret key {key_id!r} not found"


def test_pull_secrets_update_list_delete(admin: Cli, tmp_path: Path) -> None:
    created = json.loads(
        admin.ok(
            "pull-secrets", "create", "--name", "GAR", "--flavor", "gar", "--server", "europe-docker.pkg.dev",
            "--password-stdin", stdin=b'{"type": "service_account"}',
        )
    )  # fmt: skip
    assert (created["flavor"], created["username"], created["email"]) == (
        "gar",
        "_json_key",
        "none@google.com",
    )
    nothing = admin("pull-secrets", "update", created["id"])
    assert nothing.returncode == 2
    updated = json.loads(admin.ok("pull-secrets", "update", created["id"], "--email", "ops@example.com"))
    assert updated["email"] == "ops@example.com" and updated["server"] == "europe-docker.pkg.dev"
    assert [p["id"] for p in json.loads(admin.ok("pull-secrets", "list"))] == [created["id"]]
    admin.ok("pull-secrets", "delete", created["id"])
    assert json.loads(admin.ok("pull-secrets", "list")) == []
    gone = admin("pull-secrets", "delete", created["id"])
    assert gone.returncode == 64 + 5


# -- services -------------------------------------------------------------------------------------
def test_invalid_manifest_names_the_field_and_line(admin: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST + "    - name: 9BAD\n      value: x\n")
    done = admin("services", "apply", str(bad))
    assert done.returncode == 64 + 3
    line = stderr_line(done)
    assert line.startswith("roomsecrets: INVALID_ARGUMENT: container.environment[1].name: line 14: "), line
    assert str(bad) in line
    assert admin("services", "get", "api").returncode == 64 + 5, "an invalid manifest is refused whole"


def test_services_get_list_delete(project: Path, admin: Cli, developer: Cli) -> None:
    plain = project / "plain.yaml"
    plain.write_text(PLAIN)
    applied = json.loads(developer.ok("services", "apply", "-", stdin=PLAIN.encode()))
    assert applied["name"] == "plain"
    assert sorted(s["name"] for s in json.loads(developer.ok("services", "list"))) == ["api", "plain"]
    developer.ok("services", "delete", "plain", "--etag", applied["etag"])
    missing = admin("services", "get", "plain")
    assert missing.returncode == 64 + 5
    assert stderr_line(missing) == "roomsecrets: NOT_FOUND: service 'plain' not found"


def test_run_finds_the_command_in_the_callers_path_not_the_manifests(
    project: Path, admin: Cli, room: Participants
) -> None:
    """A manifest's PATH (allowed by an admin) reaches the command's environment, but never
    chooses which program `run` starts."""
    decoy_dir = project / "decoy"
    decoy_dir.mkdir()
    marker = project / "decoy-ran"
    decoy = decoy_dir / "true"
    decoy.write_text(f"#!/bin/sh\ntouch {marker}\n")
    decoy.chmod(0o755)
    manifest = project / "pathy.yaml"
    manifest.write_text(
        "version: v1\nkind: Service\nmetadata: {name: pathy}\ncontainer:\n  image: r.example/p:1\n"
        f"  allow_environment: [PATH]\n  environment:\n    - {{name: PATH, value: '{decoy_dir}'}}\n"
    )
    admin.ok("services", "apply", str(manifest))
    pathy = Cli(room, "pathy", project_role="service", service="pathy")
    done = pathy("run", "--service", "pathy", "--", "true")
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "the manifest's PATH chose the program"
    show = "import os; print(os.environ['PATH'])"
    assert pathy.ok("run", "--service", "pathy", "--", PY, "-c", show).decode().strip() == str(decoy_dir)


def test_a_developer_cannot_give_a_service_bash_env(project: Path, room: Participants) -> None:
    """BASH_ENV names code bash runs before the command, next to every secret it was given: a
    developer's manifest setting it is refused when applied."""
    manifest = project / "evil.yaml"
    manifest.write_text(
        "version: v1\nkind: Service\nmetadata: {name: api}\ncontainer:\n  image: r.example/a:1\n"
        "  environment:\n    - {name: BASH_ENV, value: /tmp/steal.sh}\n"
    )
    developer = Cli(room, "dev", project_role="developer")
    done = developer("services", "apply", str(manifest))
    assert done.returncode == 64 + 3, done.stderr  # INVALID_ARGUMENT
    assert "container.environment[0].name" in stderr_line(done)
