"""What the figures were measured on: CPU model, cores, RAM, kernel, Python and library versions."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ._common import REPO_ROOT


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def git(*argv: str) -> str:
    try:
        done = subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def describe() -> dict[str, Any]:
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    cpu = _cpuinfo()
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        "cpu_mhz": cpu.get("cpu MHz", ""),
        "cpu_cores_per_socket": cpu.get("cpu cores", ""),
        "cpus": os.cpu_count(),
        "cpus_usable": len(affinity) or os.cpu_count(),
        "ram_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "uvloop": _version("uvloop"),
        "cryptography": _version("cryptography"),
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": [round(x, 2) for x in load],
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def markdown(machine: dict[str, Any]) -> str:
    """One line per fact, as a markdown list (pasteable into docs/benchmarks.md)."""
    commit = machine["git_commit"][:12] + (" (dirty)" if machine["git_dirty"] else "")
    return "\n".join(
        [
            f"- CPU: {machine['cpu_model']} at {machine['cpu_mhz']} MHz, {machine['cpus']} logical CPUs "
            f"({machine['cpus_usable']} usable, {machine['cpu_cores_per_socket']} cores per socket), "
            "load average at start "
            f"{' / '.join(str(x) for x in machine['loadavg_at_start'])}",
            f"- RAM: {machine['ram_mib'] / 1024:.1f} GiB; kernel {machine['kernel']}",
            f"- Python {machine['python']} ({machine['python_implementation']}), grpcio {machine['grpcio']}, "
            f"protobuf {machine['protobuf']}, uvloop {machine['uvloop']}, cryptography "
            f"{machine['cryptography']}, SQLite {machine['sqlite']}",
            f"- commit {commit}",
        ]
    )


def cpu_busy(sample: float = 1.0) -> float:
    """The fraction of all CPUs' time over the next `sample` seconds that was not idle (iowait
    counts as busy: a disk still flushing slows an fsync-bound benchmark too)."""

    def idle_and_total() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3], sum(fields[:8])  # idle; user .. steal (guest time is inside user)

    idle0, total0 = idle_and_total()
    time.sleep(sample)
    idle1, total1 = idle_and_total()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_quiet(*, busy_below: float = 0.15, timeout: float = 60.0) -> float:
    """Wait, up to `timeout` seconds, until the CPUs are under `busy_below` busy over a second, so
    no scenario starts while the previous benchmark's processes still run. (One list run right
    after bench.scaleout measured 1.42x, and 0.98x rerun alone. The load average cannot tell: a
    minute after scaleout it still says 6 with the CPUs idle.) Returns the last sample."""
    deadline = time.monotonic() + timeout
    while True:
        busy = cpu_busy()
        if busy < busy_below or time.monotonic() >= deadline:
            return busy
