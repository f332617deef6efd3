"""Server processes for benchmarks: each in its own session (setsid), pinned with taskset when asked,
found by its `READY <port> <loop>` line, measured through /proc, and always killed by process group."""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ._common import READY, REPO_ROOT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"


def taskset_prefix(cpu: int | None) -> list[str]:
    """`taskset -c CPU` when pinning is asked for and possible, else nothing."""
    if cpu is None:
        return []
    taskset = shutil.which("taskset")
    if taskset is None:
        return []
    return [taskset, "-c", str(cpu)]


def can_pin(cpus: Sequence[int]) -> bool:
    if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        return False
    return set(cpus) <= os.sched_getaffinity(0)


@dataclass
class ServerProcess:
    """A server started by us; `stop()` ends its whole process group, whatever state it is in."""

    name: str
    popen: subprocess.Popen[str]
    stderr_path: Path
    port: int = 0
    loop: str = ""
    _stderr: IO[str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @classmethod
    def start(
        cls, name: str, argv: Sequence[str], *, cpu: int | None, log_dir: Path, timeout: float = 30.0
    ) -> ServerProcess:
        stderr_path = log_dir / f"{name}.stderr"
        stderr = stderr_path.open("w")
        popen = subprocess.Popen(
            [*taskset_prefix(cpu), *argv],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # setsid: its own process group, killed as one by stop()
        )
        proc = cls(name, popen, stderr_path, _stderr=stderr)
        try:
            proc._wait_ready(timeout)
        except BaseException:
            proc.stop()
            raise
        return proc

    def _wait_ready(self, timeout: float) -> None:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} did not start in {timeout:.0f}s{self._stderr_tail()}")
                if not sel.select(left):
                    continue
                line = self.popen.stdout.readline()
                if not line:
                    code = self.popen.wait()
                    raise RuntimeError(f"{self.name} exited with {code} before serving{self._stderr_tail()}")
                parts = line.split()
                if len(parts) == 3 and parts[0] == READY:
                    self.port = int(parts[1])
                    self.loop = parts[2]
                    return

    def _stderr_tail(self, lines: int = 20) -> str:
        try:
            tail = self.stderr_path.read_text().splitlines()[-lines:]
        except OSError:
            return ""
        return ":\n  " + "\n  ".join(tail) if tail else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group(self) -> list[int]:
        """The pids of our process group: the server, and its workers if it forked any."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pid:  # after "pid (comm)": state, ppid, pgrp
                pids.append(int(stat.parent.name))
        return pids or [self.pid]

    def cpu_seconds(self) -> float:
        """User + system CPU of the process group (every process, all threads) so far."""
        total = 0
        for pid in self.group():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After "pid (comm)": state is fields[0]; utime and stime are stat fields 14 and 15.
            total += int(fields[11]) + int(fields[12])
        return total / CLOCK_TICKS

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS from /proc/PID/status, in KiB."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
        return out

    def check_sole_listener(self) -> None:
        """Fail unless every TCP socket listening on our port belongs to this process or its
        workers (no stale server sharing it through SO_REUSEPORT)."""
        listening = listening_inodes(self.port)
        ours = set().union(*(socket_inodes(pid) for pid in self.group()))
        if not listening:
            raise RuntimeError(f"{self.name}: nothing listens on port {self.port}")
        strangers = listening - ours
        if strangers:
            raise RuntimeError(
                f"{self.name}: {len(strangers)} other socket(s) also listen on port {self.port}"
            )

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; returns the exit code."""
        try:
            if self.popen.poll() is None:
                _killpg(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    _killpg(self.pid, signal.SIGKILL)
                    self.popen.wait(5)
            _killpg(self.pid, signal.SIGKILL)  # anything it left behind in its group
        finally:
            if self.popen.stdout is not None:
                self.popen.stdout.close()
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
        return self.popen.returncode


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def listening_inodes(port: int) -> set[int]:
    """Socket inodes of every TCP (v4 and v6) socket in LISTEN state on `port`, any address."""
    return _inodes(port, _TCP_LISTEN)


def accepted_connections(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to `port` each of `pids` holds (a server's accepted
    sockets: their local port is the server's)."""
    established = _inodes(port, _TCP_ESTABLISHED)
    return {pid: len(socket_inodes(pid) & established) for pid in pids}


def _inodes(port: int, tcp_state: str) -> set[int]:
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == tcp_state and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(int(inode))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:  # the process is gone
        return out
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out
