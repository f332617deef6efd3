"""Runs ghz (github.com/bojand/ghz) against a RoomSecrets method and parses its JSON report."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._common import PROTO_FILE, PROTO_ROOT, REPO_ROOT, SERVICE
from .procs import taskset_prefix

DEFAULT_GHZ = REPO_ROOT / ".tools" / "bin" / "ghz"
_NS_PER_MS = 1e6


def find_ghz(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"ghz not found at {path}")
        return path
    if DEFAULT_GHZ.is_file():
        return DEFAULT_GHZ
    found = shutil.which("ghz")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"ghz not found at {DEFAULT_GHZ} nor on PATH: run `make .tools/bin/ghz` "
        "(go install github.com/bojand/ghz/cmd/ghz@v0.120.0)"
    )


@dataclass(frozen=True)
class LoadSpec:
    """One ghz run: which method, with what request and metadata files, how hard and how long."""

    method: str  # e.g. "GetSecret"
    data_file: Path  # the request as JSON (ghz templates such as {{.WorkerID}} allowed)
    metadata_file: Path  # {"authorization": "Bearer ..."}
    concurrency: int
    connections: int
    duration_s: float


@dataclass
class GhzResult:
    count: int
    rps: float
    total_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    average_ms: float
    statuses: dict[str, int]
    errors: dict[str, int]
    client_cpu_s: float
    exit_code: int
    end_reason: str
    problems: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(n for code, n in self.statuses.items() if code != "OK")

    @property
    def valid(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "rps": self.rps,
            "total_s": self.total_s,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "average_ms": self.average_ms,
            "statuses": self.statuses,
            "errors": self.errors,
            "error_count": self.error_count,
            "client_cpu_s": self.client_cpu_s,
            "exit_code": self.exit_code,
            "end_reason": self.end_reason,
            "valid": self.valid,
            "problems": self.problems,
        }


def _duration_arg(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def ghz_command(ghz: Path, port: int, spec: LoadSpec, out: Path, cpu: int | None) -> list[str]:
    pinned = taskset_prefix(cpu)
    return [
        *pinned,
        str(ghz),
        "--insecure",
        "--proto",
        str(PROTO_FILE),
        "--import-paths",
        str(PROTO_ROOT),
        "--call",
        f"{SERVICE}/{spec.method}",
        "--data-file",
        str(spec.data_file),
        "--metadata-file",
        str(spec.metadata_file),
        "--concurrency",
        str(spec.concurrency),
        "--connections",
        str(spec.connections),
        "--duration",
        _duration_arg(spec.duration_s),
        # Calls in flight at the deadline finish and are counted, instead of being cut and
        # reported as errors (the default, "close").
        "--duration-stop",
        "wait",
        *(["--cpus", "1"] if pinned else []),
        "--format",
        "json",
        "--output",
        str(out),
        f"127.0.0.1:{port}",
    ]


def run_ghz(ghz: Path, port: int, spec: LoadSpec, out: Path, *, cpu: int | None) -> GhzResult:
    """Run one ghz load to completion (killed by process group if it overruns) and parse it."""
    argv = ghz_command(ghz, port, spec, out, cpu)
    out.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=spec.duration_s + 60)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse_report(out, proc.returncode, output, cpu_s)


def parse_report(path: Path, exit_code: int, output: str, client_cpu_s: float) -> GhzResult:
    problems: list[str] = []
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        message = output.strip()[-500:]
        return GhzResult(
            0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, {}, {}, client_cpu_s, exit_code, "",
            [f"no ghz report ({type(exc).__name__}); ghz said: {message}"],
        )  # fmt: skip
    latencies = {
        int(entry["percentage"]): float(entry["latency"]) / _NS_PER_MS
        for entry in report.get("latencyDistribution") or []
    }
    statuses = {str(k): int(v) for k, v in (report.get("statusCodeDistribution") or {}).items()}
    errors = {str(k): int(v) for k, v in (report.get("errorDistribution") or {}).items()}
    result = GhzResult(
        count=int(report.get("count", 0)),
        rps=float(report.get("rps", 0.0)),
        total_s=float(report.get("total", 0)) / 1e9,
        p50_ms=latencies.get(50, 0.0),
        p90_ms=latencies.get(90, 0.0),
        p99_ms=latencies.get(99, 0.0),
        average_ms=float(report.get("average", 0)) / _NS_PER_MS,
        statuses=statuses,
        errors=errors,
        client_cpu_s=client_cpu_s,
        exit_code=exit_code,
        end_reason=str(report.get("endReason", "")),
        problems=problems,
    )
    if exit_code != 0:
        problems.append(f"ghz exited with {exit_code}: {output.strip()[-300:]}")
    if result.error_count:
        problems.append(f"{result.error_count} calls failed: {statuses} {errors}")
    if errors and not result.error_count:
        problems.append(f"ghz reported errors: {errors}")
    if result.count == 0 or statuses.get("OK", 0) == 0:
        problems.append("no successful calls")
    return result


def ghz_version(ghz: Path) -> str:
    try:
        done = subprocess.run(
            [str(ghz), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout + done.stderr).strip() or "unknown"
