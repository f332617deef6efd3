"""One measured load: warm-up (discarded), then a fixed-duration ghz run, with the server's CPU
time and memory read from /proc around it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fixture import Workspace
from .ghz import GhzResult, run_ghz
from .procs import ServerProcess


@dataclass(frozen=True)
class Case:
    name: str
    server: str  # "echo" | "real"
    method: str


@dataclass
class Measurement:
    round: int
    case: Case
    result: GhzResult
    warmup: GhzResult | None
    server_cpu_s: float
    wall_s: float
    memory_kib: dict[str, int]

    @property
    def server_cpu_util(self) -> float:
        return self.server_cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def client_cpu_util(self) -> float:
        return self.result.client_cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def server_cpu_us_per_call(self) -> float:
        return self.server_cpu_s / self.result.count * 1e6 if self.result.count else 0.0

    @property
    def valid(self) -> bool:
        return self.result.valid and (self.warmup is None or self.warmup.valid)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "case": self.case.name,
            "server": self.case.server,
            "method": self.case.method,
            **self.result.summary(),
            "warmup": self.warmup.summary() if self.warmup else None,
            "wall_s": self.wall_s,
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_util": self.server_cpu_util,
            "server_cpu_us_per_call": self.server_cpu_us_per_call,
            "client_cpu_util": self.client_cpu_util,
            "server_memory_kib_after": self.memory_kib,
            "valid": self.valid,
        }


@dataclass(frozen=True)
class Load:
    concurrency: int
    connections: int
    warmup_s: float
    duration_s: float


def measure(
    ghz: Path,
    ws: Workspace,
    server: ServerProcess,
    case: Case,
    rnd: int,
    load: Load,
    *,
    client_cpu: int | None,
) -> Measurement:
    """Warm up, then measure `case` against `server`; the server must survive both."""

    def run(duration: float, out: Path) -> GhzResult:
        spec = ws.spec(
            case.method, concurrency=load.concurrency, connections=load.connections, duration_s=duration
        )
        return run_ghz(ghz, server.port, spec, out, cpu=client_cpu)

    warm = run(load.warmup_s, ws.root / "warmup.json") if load.warmup_s > 0 else None
    if not server.alive():
        raise RuntimeError(f"the {server.name} server died during the warm-up")
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    result = run(load.duration_s, ws.root / f"r{rnd}-{case.name}.json")
    wall, cpu = time.monotonic() - t0, server.cpu_seconds() - cpu0
    if not server.alive():
        raise RuntimeError(f"the {server.name} server died during the load")
    return Measurement(rnd, case, result, warm, cpu, wall, server.memory_kib())
