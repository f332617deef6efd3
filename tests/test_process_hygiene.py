"""Process hygiene of a real `roomsecrets serve` (the venv's console script, as a subprocess):
key files others may read are refused, everything the server creates is private (and an older
data dir is tightened), no core dumps and not dumpable, the open-files soft limit raised,
connections that never complete the HTTP/2 handshake closed after a bound (so they lock clients
out only until then), the dev key off beside production keys, and no secret in argv in the README.
Servers the suite runs in-process keep the test process as it was."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import resource
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from roomsecrets.client import SecretsClient
from roomsecrets.errors import SecretsError
from roomsecrets.project import ProjectSecretsClient
from roomsecrets_server.app import server_options
from roomsecrets_server.auth.dev_key import DEV_KEY_FILE, mint_service_token, mint_token
from roomsecrets_server.cli.main import build_parser
from roomsecrets_server.cli.operator import settings_from_args
from roomsecrets_server.config import Settings
from roomsecrets_server.errors import FailedPrecondition

from .harness import ServerThread
from .test_cli import Lines, clean_env
from .test_tls import Pki

ROOMSECRETS = str(Path(sys.executable).with_name("roomsecrets"))
README = Path(__file__).resolve().parents[1] / "README.md"
INFINITY = resource.RLIM_INFINITY
PR_GET_DUMPABLE = 3


def process_state() -> tuple[int, tuple[int, int], tuple[int, int], int]:
    """(umask, RLIMIT_CORE, RLIMIT_NOFILE, dumpable) of this process."""
    umask = os.umask(0o022)
    os.umask(umask)
    dumpable = int(ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    return (
        umask,
        resource.getrlimit(resource.RLIMIT_CORE),
        resource.getrlimit(resource.RLIMIT_NOFILE),
        dumpable,
    )


# Before any server of this module runs in this process.
TEST_PROCESS_AT_IMPORT = process_state()


# -- a real `roomsecrets serve` -------------------------------------------------------------------
def with_limits(
    command: list[str], *, nofile: tuple[int, int] | None = None, core: tuple[int, int] | None = None
) -> list[str]:
    """`command` run with these resource limits (set in a Python that then execs it: same pid)."""
    if nofile is None and core is None:
        return command
    setup = "import os, resource, sys\n"
    if nofile is not None:
        setup += f"resource.setrlimit(resource.RLIMIT_NOFILE, {nofile!r})\n"
    if core is not None:
        setup += f"resource.setrlimit(resource.RLIMIT_CORE, {core!r})\n"
    setup += "os.execv(sys.argv[1], sys.argv[1:])\n"
    return [sys.executable, "-c", setup, *command]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    address: str
    log: Lines

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        """Everything logged so far."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.log.next(timeout=0.2)
        return b"".join(self.log.seen).decode(errors="replace")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0, self.text()
        return self.text()


def start(
    data_dir: Path,
    *args: str,
    database_url: str = "",
    env: dict[str, str] | None = None,
    nofile: tuple[int, int] | None = None,
    core: tuple[int, int] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[bytes], Lines, bytes]:
    """`roomsecrets serve` on a free loopback port: the process, its log and either its ready
    line or, if it exited instead, b""."""
    environment = clean_env(ROOMSECRETS_DATA_DIR=str(data_dir), **(env or {}))
    if database_url:
        environment["ROOMSECRETS_DATABASE_URL"] = database_url
    command = with_limits([ROOMSECRETS, "serve", "--listen", "127.0.0.1:0", *args], nofile=nofile, core=core)
    proc = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd
    )
    assert proc.stderr is not None
    log = Lines(proc.stderr)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            line = log.next(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                return proc, log, b""
            continue
        if b"serving on" in line:
            return proc, log, line
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"serve neither served nor exited: {b''.join(log.seen)!r}")


@contextlib.contextmanager
def serving(data_dir: Path, *args: str, **options: object) -> Iterator[Served]:
    proc, log, ready = start(data_dir, *args, **options)  # type: ignore[arg-type]
    try:
        assert ready, f"serve did not start: {b''.join(log.seen)!r}"
        match = re.search(rb"serving on (127\.0\.0\.1:\d+) ", ready)
        assert match, ready
        yield Served(proc, match.group(1).decode(), log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def refused_start(data_dir: Path, *args: str, **options: object) -> str:
    """The last line of a serve that must refuse to start (it fails the test if it serves)."""
    proc, log, ready = start(data_dir, *args, **options)  # type: ignore[arg-type]
    if ready:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"serve started: {ready!r}")
    assert proc.wait(10) == 1
    served = Served(proc, "", log)
    return served.text().strip().splitlines()[-1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [ROOMSECRETS, *args], capture_output=True, env=env or clean_env(), timeout=60, check=False
    )


def dev_token(data_dir: Path, *extra: str) -> str:
    done = run_cli("token", "--data-dir", str(data_dir), "--identity", "alice", "--room", "r", *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def proc_field(pid: int, name: str, field: str) -> str:
    """A line's value in /proc/<pid>/<name> (status: "Umask:"; limits: "Max core file size")."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field):
            return line[len(field) :].strip()
    raise AssertionError(f"no {field!r} in /proc/{pid}/{name}")


def limits(pid: int, what: str) -> tuple[str, str]:
    soft, hard = proc_field(pid, "limits", what).split()[:2]
    return soft, hard


def set_a_secret(address: str, data_dir: Path, value: bytes) -> None:
    with SecretsClient(address, dev_token(data_dir)) as client:
        client.set_secret("s", data=value)


# -- key files --------------------------------------------------------------------------------------
def test_a_signing_key_others_may_read_is_refused_by_serve_and_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    dev_token(data_dir)  # creates signing-key.json, 0600
    key = data_dir / DEV_KEY_FILE
    for loose in (0o644, 0o640, 0o604):
        key.chmod(loose)
        minted = run_cli("token", "--data-dir", str(data_dir), "--identity", "mallory", "--room", "r")
        assert minted.returncode == 1 and minted.stdout == b"", (oct(loose), minted.stdout)
        message = minted.stderr.decode()
        assert str(key) in message and "must not be readable by group or others" in message, message
        line = refused_start(data_dir)
        assert line.startswith("roomsecrets: cannot start the server: ") and str(key) in line, line
        assert f"mode {loose:04o}" in line, line
    key.chmod(0o600)
    with serving(data_dir) as served:
        set_a_secret(served.address, data_dir, b"fine")
        served.stop()


def test_a_manifest_token_is_not_minted_from_a_key_others_may_read(tmp_path: Path) -> None:
    """The manifest minter reads the key on every mint: a key loosened while the server runs
    mints nothing (FAILED_PRECONDITION, SIGNING_KEY_EXPOSED), and says no path to the caller."""
    mint_service_token(tmp_path, "svc", "r", "p", "agent", ("secrets",))
    (tmp_path / DEV_KEY_FILE).chmod(0o644)
    with pytest.raises(FailedPrecondition) as refused:
        mint_service_token(tmp_path, "svc", "r", "p", "agent", ("secrets",))
    assert refused.value.reason == "SIGNING_KEY_EXPOSED"
    assert str(tmp_path) not in refused.value.message


def test_a_keyring_others_may_read_is_refused_by_serve_and_rewrap(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with serving(data_dir) as served:
        served.stop()
    (data_dir / "keyring.json").chmod(0o640)
    line = refused_start(data_dir)
    assert "keyring.json" in line and "must not be readable by group or others" in line, line
    rewrap = run_cli("rewrap", "--data-dir", str(data_dir))
    assert rewrap.returncode == 1 and b"cannot read the keyring" in rewrap.stderr, rewrap.stderr


def test_a_tls_key_others_may_read_is_refused(tmp_path: Path) -> None:
    """Group bits count unless root owns the key (0640 root:ssl-cert is how administrators hand
    a key to a service); other bits always count."""
    pki = Pki(tmp_path / "pki")
    data_dir = tmp_path / "data"
    key = pki.files["server-key"]
    tls = ("--tls-cert", str(pki.files["server"]), "--tls-key", str(key))
    key.chmod(0o644)
    line = refused_start(data_dir, *tls)
    assert str(key) in line and "TLS private key" in line and "mode 0644" in line, line
    if os.geteuid() == 0:
        key.chmod(0o640)  # owned by root: accepted
        with serving(data_dir, *tls) as served:
            served.stop()
        os.chown(key, 65534, 65534)  # owned by someone else, group readable: refused
        assert "mode 0640" in refused_start(data_dir, *tls)
    else:
        key.chmod(0o640)  # our own key, group readable: refused
        assert "mode 0640" in refused_start(data_dir, *tls)
    key.chmod(0o600)
    with serving(data_dir, *tls) as served:
        channel = grpc.secure_channel(served.address, grpc.ssl_channel_credentials(pki.ca))
        with channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        served.stop()


# -- files the server creates -------------------------------------------------------------------------
def test_everything_the_server_creates_is_private(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "new" / "data"
    with serving(data_dir, database_url=database_url) as served:
        set_a_secret(served.address, data_dir, b"private-value")
        assert proc_field(served.pid, "status", "Umask:") == "0077"
        expected = {"keyring.json", "signing-key.json", "audit.log"}
        if not database_url:
            # SQLite gives its WAL and shared-memory files the database's mode: all three 0600.
            expected |= {"roomsecrets.db", "roomsecrets.db-wal", "roomsecrets.db-shm"}
        present = {p.name for p in data_dir.iterdir()}
        assert expected <= present, present
        assert mode_of(data_dir) == 0o700
        assert mode_of(data_dir.parent) == 0o700  # created by the server too
        for path in data_dir.iterdir():
            assert mode_of(path) == 0o600, f"{path.name} has mode {mode_of(path):o}"
        served.stop()


def test_an_older_data_dir_is_tightened_at_start(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "data"
    audit_dir = tmp_path / "logs"
    audit_dir.mkdir(mode=0o755)
    audit = audit_dir / "audit.jsonl"
    args = ("--audit-log", str(audit))
    with serving(data_dir, *args, database_url=database_url) as served:
        set_a_secret(served.address, data_dir, b"older-secret-value")
        served.stop()
    # As an older version (umask 022) left them.
    data_dir.chmod(0o755)
    audit.chmod(0o644)
    loosened = [data_dir, audit]
    db = data_dir / "roomsecrets.db"
    if not database_url:
        db.chmod(0o644)
        loosened.append(db)
    with serving(data_dir, *args, database_url=database_url) as served:
        set_a_secret(served.address, data_dir, b"newer-secret-value")
        assert mode_of(data_dir) == 0o700
        assert mode_of(audit) == 0o600
        assert mode_of(audit_dir) == 0o755  # the operator's directory: not ours to change
        if not database_url:
            assert mode_of(db) == 0o600
            for name in ("roomsecrets.db-wal", "roomsecrets.db-shm"):  # made after the fix
                assert mode_of(data_dir / name) == 0o600, name
        log = served.stop()
    for path in loosened:
        assert re.search(rf"WARNING roomsecrets: {re.escape(str(path))} was mode 0[67][45][45]", log), log
    assert "secret-value" not in log


def test_token_and_rewrap_create_private_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "made-by-token" / "data"
    dev_token(data_dir)
    assert mode_of(data_dir) == 0o700 and mode_of(data_dir.parent) == 0o700
    assert mode_of(data_dir / DEV_KEY_FILE) == 0o600
    with serving(data_dir) as served:
        served.stop()
    # rewrap: its umask and core limit, seen while it waits after rotating.
    rewrap = subprocess.Popen(
        with_limits(
            [ROOMSECRETS, "rewrap", "--data-dir", str(data_dir), "--rotate", "--settle", "3"],
            core=(INFINITY, INFINITY),
        ),
        env=clean_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert rewrap.stdout is not None
        assert rewrap.stdout.readline().startswith(b"rotated: ")
        assert proc_field(rewrap.pid, "status", "Umask:") == "0077"
        assert limits(rewrap.pid, "Max core file size") == ("0", "0")
        assert rewrap.wait(30) == 0, rewrap.stderr.read() if rewrap.stderr else b""
    finally:
        if rewrap.poll() is None:
            rewrap.kill()
            rewrap.wait(10)
    assert all(mode_of(p) == 0o600 for p in data_dir.iterdir())


# -- core dumps and limits --------------------------------------------------------------------------
def core_pattern() -> str:
    return Path("/proc/sys/kernel/core_pattern").read_text().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and prctl")
def test_serve_writes_no_core_and_is_not_dumpable(tmp_path: Path) -> None:
    """Started with core dumps allowed (unlimited), the server turns them off and makes itself
    non-dumpable; a crash (SIGSEGV) after storing a value leaves no core file."""
    data_dir = tmp_path / "data"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with serving(data_dir, core=(INFINITY, INFINITY), cwd=cwd) as served:
        set_a_secret(served.address, data_dir, b"value-held-in-memory")
        assert limits(served.pid, "Max core file size") == ("0", "0")
        assert "core dumps off (RLIMIT_CORE 0) and the process is not dumpable" in served.text()
        if os.geteuid() != 0:
            # /proc/<pid> of a non-dumpable process belongs to root (as root it always does).
            assert Path(f"/proc/{served.pid}").stat().st_uid == 0
        os.kill(served.pid, signal.SIGSEGV)
        assert served.proc.wait(60) == -signal.SIGSEGV
    pattern = core_pattern()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write to the working directory")
    assert [p.name for p in cwd.iterdir()] == [], "a core file was written"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")
def test_serve_raises_the_open_files_soft_limit_to_the_hard_limit(tmp_path: Path) -> None:
    with serving(tmp_path / "data", nofile=(1024, 4096)) as served:
        assert limits(served.pid, "Max open files") == ("4096", "4096")
        log = served.stop()
    assert "open files limit (RLIMIT_NOFILE) raised from 1024 to the hard limit 4096" in log


@pytest.mark.postgres_only
def test_workers_inherit_the_process_protection(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "data"
    url_file = tmp_path / "database-url"  # the URL (it may hold a password) from a file, out of argv
    url_file.write_text(database_url + "\n")
    serve = [
        ROOMSECRETS,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--database-url-file",
        str(url_file),
    ]
    proc = subprocess.Popen(
        with_limits(serve, nofile=(1024, 4096), core=(INFINITY, INFINITY)),
        env=clean_env(ROOMSECRETS_DATA_DIR=str(data_dir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        log = Lines(proc.stderr)
        while b"workers serving on" not in log.next(timeout=30):
            pass
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
        for pid in (proc.pid, *workers):
            assert proc_field(pid, "status", "Umask:") == "0077"
            assert limits(pid, "Max core file size") == ("0", "0")
            assert limits(pid, "Max open files") == ("4096", "4096")
            if os.geteuid() != 0:
                assert Path(f"/proc/{pid}").stat().st_uid == 0
        assert mode_of(data_dir) == 0o700
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# -- connections that never complete the handshake ----------------------------------------------------
def wait_closed(sockets: list[socket.socket], timeout: float) -> list[float]:
    """Read every socket until the server closes it (discarding what it sends, e.g. its
    SETTINGS and GOAWAY frames); the seconds each one took. Fails after `timeout`."""
    started = time.monotonic()
    closed_after: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, sock)
        while len(closed_after) < len(sockets):
            left = started + timeout - time.monotonic()
            assert left > 0, f"{len(sockets) - len(closed_after)} of {len(sockets)} connections still open"
            for key, _ in selector.select(min(left, 0.5)):
                ready: socket.socket = key.data
                try:
                    data = ready.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed_after[ready] = time.monotonic() - started
                    selector.unregister(ready)
    return [closed_after[s] for s in sockets]


def health(address: str, timeout: float) -> int:
    # A channel of its own: no reconnect backoff left over from an earlier attempt.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return int(reply.status)


@pytest.mark.parametrize("transport", ["plaintext", "tls"])
def test_connections_that_never_send_a_byte_are_closed_after_the_bound(
    tmp_path: Path, transport: str
) -> None:
    args: list[str] = []
    if transport == "tls":
        pki = Pki(tmp_path / "pki")
        args += ["--tls-cert", str(pki.files["server"]), "--tls-key", str(pki.files["server-key"])]
    # The bound through the environment (the flag's fallback): a server without the setting
    # starts too, and fails on what it does.
    with serving(tmp_path / "data", *args, env={"ROOMSECRETS_HANDSHAKE_TIMEOUT": "1"}) as served:
        host, port = served.address.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port))) for _ in range(4)]
        try:
            took = wait_closed(idle, timeout=8)
        finally:
            for sock in idle:
                sock.close()
        assert all(0.8 <= t <= 4 for t in took), took
        served.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux resource limits")
def test_idle_connections_past_the_open_files_limit_lock_clients_out_only_until_the_bound(
    tmp_path: Path,
) -> None:
    """With the hard limit too at 128 descriptors (so the server cannot raise its soft limit),
    192 connections that never send a byte take every descriptor: a real client is locked out.
    The server closes them after the handshake bound (2 s), taking the next ones from its accept
    queue, and then the client gets through."""
    limit = 128
    env = {"ROOMSECRETS_HANDSHAKE_TIMEOUT": "2"}
    with serving(tmp_path / "data", env=env, nofile=(limit, limit)) as served:
        assert limits(served.pid, "Max open files") == (str(limit), str(limit))
        host, port = served.address.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port))) for _ in range(limit + 64)]
        try:
            with pytest.raises(grpc.RpcError) as locked_out:
                health(served.address, timeout=1.0)
            assert locked_out.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            wait_closed(idle, timeout=30)
        finally:
            for sock in idle:
                sock.close()
        assert health(served.address, timeout=10) == health_pb2.HealthCheckResponse.SERVING
        assert served.proc.poll() is None
        served.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux resource limits")
def test_the_reported_1100_idle_connections_no_longer_lock_clients_out(tmp_path: Path) -> None:
    """The report: at a soft limit of 1,024, 1,100 connections that never send a byte locked
    every new client out. The server now runs at its hard limit (here 4,096), so they do not."""
    needed = 1100 + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != INFINITY and hard < needed:
        pytest.skip(f"this test process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        with serving(tmp_path / "data", nofile=(1024, 4096)) as served:
            host, port = served.address.rsplit(":", 1)
            idle = [socket.create_connection((host, int(port))) for _ in range(1100)]
            try:
                assert health(served.address, timeout=5) == health_pb2.HealthCheckResponse.SERVING
            finally:
                for sock in idle:
                    sock.close()
            served.stop()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_handshake_bound_is_a_setting_with_a_default() -> None:
    assert Settings(data_dir=Path("d")).handshake_timeout == 10.0
    assert ("grpc.server_handshake_timeout_ms", 10_000) in server_options(Settings(data_dir=Path("d")))
    args = build_parser().parse_args(["serve", "--handshake-timeout", "2.5"])
    assert settings_from_args(args).handshake_timeout == 2.5
    with pytest.raises(ValueError, match="handshake_timeout"):
        Settings(data_dir=Path("d"), handshake_timeout=0).check()


# -- the dev key beside production keys -------------------------------------------------------------
def production_key(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "prod.pem"  # kid "prod"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, pem


def production_token(private: ec.EllipticCurvePrivateKey, like: str) -> str:
    claims = jwt.decode(like, options={"verify_signature": False})
    claims["kid"] = "prod"
    return jwt.encode(claims, private, algorithm="ES256", headers={"kid": "prod"})


def calls_with(address: str, token: str) -> tuple[grpc.StatusCode | None, grpc.StatusCode | None]:
    """(room admin call, project admin call): None when it succeeded, else its status."""
    codes: list[grpc.StatusCode | None] = []
    with SecretsClient(address, token) as room:
        try:
            room.set_secret("s", data=b"admin-write", for_identity="bob")
            codes.append(None)
        except SecretsError as error:
            codes.append(error.code)
    with ProjectSecretsClient(address, token) as project:
        try:
            project.list_secret_keys()
            codes.append(None)
        except SecretsError as error:
            codes.append(error.code)
    return codes[0], codes[1]


def test_the_dev_key_is_off_beside_production_keys_unless_enabled(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "data"
    # A data dir that once ran in development: its dev key mints room- and project-admin tokens.
    admin = dev_token(data_dir, "--admin", "--project-role", "admin")
    private, pem = production_key(tmp_path)
    prod = production_token(private, admin)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED

    with serving(data_dir, "--jwt-public-key", str(pem), database_url=database_url) as served:
        assert calls_with(served.address, admin) == (unauthenticated, unauthenticated)
        assert calls_with(served.address, prod) == (None, None)
        log = served.stop()
    assert "tokens must be signed by the configured public keys" in log
    assert "development signing key" not in log

    with serving(data_dir, "--jwt-public-key", str(pem), "--dev-key", database_url=database_url) as served:
        assert calls_with(served.address, admin) == (None, None)
        assert calls_with(served.address, prod) == (None, None)
        log = served.stop()
    warning = re.search(r"WARNING roomsecrets: the development signing key (\S+) is accepted", log)
    assert warning and warning.group(1) == str(data_dir / DEV_KEY_FILE), log


def test_dev_key_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def dev_key(*argv: str) -> tuple[bool | None, bool]:
        settings = settings_from_args(build_parser().parse_args(["serve", *argv]))
        return settings.dev_signing_key, settings.dev_key_on

    production = ("--jwt-public-key", "p.pem")
    assert dev_key() == (None, True)  # development: no production keys
    assert dev_key(*production) == (None, False)
    assert dev_key(*production, "--dev-key") == (True, True)
    assert dev_key("--no-dev-key", *production) == (False, False)
    monkeypatch.setenv("ROOMSECRETS_DEV_KEY", "1")
    assert dev_key(*production) == (True, True)
    assert dev_key(*production, "--no-dev-key") == (False, False)
    monkeypatch.setenv("ROOMSECRETS_NO_DEV_KEY", "1")
    assert dev_key(*production) == (False, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dev-key", "--no-dev-key"])


# -- values in argv ---------------------------------------------------------------------------------
VALUE_FLAGS = {
    ("set",): ("--text", "--base64", "--token"),
    ("provide",): ("--text", "--base64"),
    ("run",): ("--var",),
    ("dockerconfig",): ("--var",),
    ("serve",): ("--database-url",),
    ("rewrap",): ("--database-url",),
}


def help_of(*command: str) -> str:
    done = subprocess.run(
        [ROOMSECRETS, *command, "--help"], capture_output=True, env=clean_env(COLUMNS="400"), check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def test_value_flags_say_they_are_visible_to_ps() -> None:
    for command, flags in VALUE_FLAGS.items():
        text = help_of(*command)
        for flag in flags:
            line = next(line for line in text.splitlines() if line.strip().startswith(flag + " "))
            assert "visible to other local users in `ps`" in line, (command, line)


def test_the_readme_never_puts_a_value_in_argv() -> None:
    commands = [line for line in README.read_text().splitlines() if "roomsecrets " in line]
    assert commands
    for line in commands:
        for flag in ("--text", "--base64", "--var ", "--token "):
            assert flag not in line, line
        assert not re.search(r"--database-url\s+\S*://[^/\s@]+:[^/\s@]+@", line), line


def test_database_url_file(tmp_path: Path) -> None:
    missing = run_cli("serve", "--data-dir", str(tmp_path), "--database-url-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert (
        missing.stderr.decode().strip()
        == f"roomsecrets: cannot read --database-url-file {tmp_path / 'nope'}: No such file or directory"
    )
    url_file = tmp_path / "url"
    url_file.write_text("postgresql://u:pw@db.example/rs\n")
    args = build_parser().parse_args(["serve", "--database-url-file", str(url_file)])
    assert settings_from_args(args).database_url == "postgresql://u:pw@db.example/rs"


# -- in-process servers ---------------------------------------------------------------------------------
def test_in_process_servers_leave_the_test_process_alone(server: ServerThread) -> None:
    assert process_state() == TEST_PROCESS_AT_IMPORT


def test_mint_token_still_works_for_the_test_suite(tmp_path: Path) -> None:
    """The harness mints with the dev key in-process: a private key is read as before."""
    assert mint_token(tmp_path, identity="a", room="r").count(".") == 2
    assert mode_of(tmp_path / DEV_KEY_FILE) == 0o600
