"""`serve --workers N`: N processes on one port (SO_REUSEPORT) over the shared PostgreSQL store.
Connections spread over the workers, each sees what another wrote, a request crosses workers,
SIGTERM stops them all, a worker that dies takes the set down, and SQLite refuses workers."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc as pb_grpc
from roomsecrets_server.auth.dev_key import mint_token

from .test_cli import COMMAND, Lines, clean_env


@dataclass
class Workers:
    proc: subprocess.Popen[bytes]
    log: Lines
    address: str
    pids: list[int]

    def log_until(self, text: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.log.next(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in {b''.join(self.log.seen)!r}") from None
            if text in line:
                return line


@contextmanager
def workers(data_dir: Path, database_url: str, n: int) -> Iterator[Workers]:
    """The parent process, its log, the address and the worker pids, once every worker serves."""
    command = ["serve", "--listen", "127.0.0.1:0", "--workers", str(n), "--database-url", database_url]
    proc = subprocess.Popen(
        [*COMMAND, *command],
        env=clean_env(ROOMSECRETS_DATA_DIR=str(data_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        running = Workers(proc, Lines(proc.stderr), "", [])
        match = re.search(
            rb"(\d+) workers serving on (127\.0\.0\.1:\d+) ", running.log_until(b"workers serving on")
        )
        assert match and int(match.group(1)) == n
        running.address = match.group(2).decode()
        running.pids = [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        assert len(running.pids) == n
        yield running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def established(pid: int, port: int) -> int:
    """TCP connections of process `pid` accepted on local `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01" and cols[9] in inodes:
                count += 1
    return count


@pytest.mark.postgres_only
def test_workers_share_the_port_and_the_data(data_dir: Path, database_url: str) -> None:
    def auth(identity: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {mint_token(data_dir, identity=identity, room='r')}"),)

    with workers(data_dir, database_url, 2) as running:
        # Every channel is its own connection; the kernel spreads them over the workers.
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(running.address, options=own_connection) for _ in range(16)]
        stubs = [pb_grpc.RoomSecretsStub(c) for c in channels]
        try:
            stubs[0].SetSecret(pb.SetSecretRequest(secret_id="s", data=b"shared"), metadata=auth("alice"))
            for stub in stubs:  # whichever worker holds the connection reads what the first wrote
                got = stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=auth("alice"))
                assert got.data == b"shared"
            port = int(running.address.rsplit(":", 1)[1])
            per_worker = [established(pid, port) for pid in running.pids]
            assert sum(per_worker) == 16 and all(per_worker), per_worker

            # A request asked through one connection reaches bob's stream on another, whichever
            # workers they are on (PostgreSQL carries it between them).
            watcher = stubs[1].WatchRequests(pb.WatchRequestsRequest(), metadata=auth("bob"))
            answered = threading.Event()

            def answer() -> None:
                for event in watcher:
                    if event.HasField("secret_request"):
                        request_id = event.secret_request.request_id
                        stubs[2].ProvideSecret(
                            pb.ProvideSecretRequest(request_id=request_id, data=b"given"),
                            metadata=auth("bob"),
                        )
                        answered.set()
                        return

            thread = threading.Thread(target=answer, daemon=True)
            thread.start()
            time.sleep(0.5)  # the stream is registered
            asked = stubs[3].RequestSecret(
                pb.RequestSecretRequest(from_participant_id="bob", url="https://x.example", timeout=20),
                metadata=auth("alice"),
                timeout=30,
            )
            assert asked.data == b"given"
            # ProvideSecret's own reply to bob may come after alice's answer: wait for it.
            assert answered.wait(10)
            watcher.cancel()  # type: ignore[no-untyped-call]
        finally:
            for channel in channels:
                channel.close()
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(20) == 0
        for pid in running.pids:  # gone, or a zombie until init reaps it
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().split()[2] == "Z"


@pytest.mark.postgres_only
def test_a_worker_that_dies_stops_the_set(data_dir: Path, database_url: str) -> None:
    with workers(data_dir, database_url, 2) as running:
        os.kill(running.pids[0], signal.SIGKILL)
        running.log_until(b"stopping the others")
        assert running.proc.wait(20) == 1


def test_sqlite_refuses_workers(tmp_path: Path) -> None:
    done = subprocess.run(
        [*COMMAND, "serve", "--listen", "127.0.0.1:0", "--workers", "2", "--data-dir", str(tmp_path)],
        env=clean_env(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert b"--workers needs the shared PostgreSQL store" in done.stderr


@pytest.mark.postgres_only
def test_workers_do_not_outlive_a_killed_parent(data_dir: Path, database_url: str) -> None:
    with workers(data_dir, database_url, 2) as running:
        running.proc.kill()  # SIGKILL: no chance to stop them; the kernel tells them (PDEATHSIG)
        running.proc.wait(10)
        deadline = time.monotonic() + 20
        alive = running.pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not zombie(pid)]
        assert not alive, f"workers {alive} outlived their parent"


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
