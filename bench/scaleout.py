"""GetSecret on SQLite vs PostgreSQL, on 1 vs 2 replicas sharing one PostgreSQL, and on
`serve --workers 2`, in one run.

    python -m bench.scaleout [--rounds 3] [--duration 8s] [--warmup 2s] [--concurrency 64]

One run starts a throwaway PostgreSQL (tests/postgres.py: Debian's binaries, initdb in a temp dir,
loopback port, fsync off as for the tests, which is what a read benchmark does not depend on),
one real server on SQLite, two replicas and one `--workers 2` server on the PostgreSQL database,
all on one data dir's keys. Interleaved rounds of five loads, each a discarded warm-up then a
fixed-duration measurement:

* sqlite-1: ghz at --concurrency against the SQLite server;
* pg-1:     the same against replica A;
* pg-2:     two ghz at half the concurrency each, one per replica, at the same time (summed);
* pg-1-8c:  replica A again, its load spread over 8 connections;
* workers-2-8c: `serve --workers 2` (two forked processes on one port through SO_REUSEPORT, the
            kernel spreading connections between them) on the same database, the same load over 8
            connections: what --workers buys against pg-1-8c. 8 connections, because the kernel
            balances connections, not calls; with one connection one worker would take it all.

Nothing is pinned: the replicas, PostgreSQL and ghz share the machine's cores, as they would on
one host. So besides throughput the report gives where the CPU went per call (replicas,
PostgreSQL, ghz): with every core busy, 2 replicas cannot beat 1 here; the per-call costs say what
more cores would buy. Results go to bench/results/scaleout-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.postgres import PostgresCluster

from ._common import BENCH_DIR, log
from .fixture import Workspace, seed, start_real, workspace
from .ghz import GhzResult, find_ghz, run_ghz
from .procs import CLOCK_TICKS, ServerProcess, accepted_connections
from .run import _env, parse_duration


def postgres_cpu_seconds() -> float:
    """CPU of every process named postgres (the cluster's backends, walwriter, ...)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name.startswith("postgres"):
            fields = text.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


WORKER_CONNECTIONS = 8


def serving(server: ServerProcess) -> list[int]:
    """The processes that take connections: the workers of a `--workers` parent, else itself."""
    group = sorted(server.group())
    return [pid for pid in group if pid != server.pid] or group


def measure(
    ghz: Path,
    ws: Workspace,
    targets: list[ServerProcess],
    args: argparse.Namespace,
    name: str,
    rnd: int,
    connections: int = 1,
) -> dict[str, Any]:
    share = max(1, args.concurrency // len(targets))

    def load(duration: float, tag: str) -> list[GhzResult]:
        spec = ws.spec("GetSecret", concurrency=share, connections=connections, duration_s=duration)
        with ThreadPoolExecutor(len(targets)) as pool:
            runs = [
                pool.submit(run_ghz, ghz, t.port, spec, ws.root / f"{tag}-{i}.json", cpu=None)
                for i, t in enumerate(targets)
            ]
            return [r.result() for r in runs]

    if args.warmup > 0:
        load(args.warmup, "warmup")
    servers0 = sum(t.cpu_seconds() for t in targets)
    pg0, t0 = postgres_cpu_seconds(), time.monotonic()
    with ThreadPoolExecutor(1) as background:
        running = background.submit(load, args.duration, f"r{rnd}-{name}")
        time.sleep(min(1.0, args.duration / 2))  # connected by now: where did the kernel put them?
        spread = [n for t in targets for n in accepted_connections(t.port, serving(t)).values()]
        results = running.result()
    wall = time.monotonic() - t0
    servers_cpu = sum(t.cpu_seconds() for t in targets) - servers0
    pg_cpu = postgres_cpu_seconds() - pg0
    count = sum(r.count for r in results)
    problems = [p for r in results for p in r.problems]
    per_call = 1e6 / count if count else 0.0
    return {
        "round": rnd,
        "case": name,
        "replicas": len(targets),
        "rps": sum(r.rps for r in results),
        "count": count,
        "p50_ms": max(r.p50_ms for r in results),
        "p99_ms": max(r.p99_ms for r in results),
        "server_cpu_us_per_call": servers_cpu * per_call,
        "postgres_cpu_us_per_call": pg_cpu * per_call,
        "ghz_cpu_us_per_call": sum(r.client_cpu_s for r in results) * per_call,
        "wall_s": wall,
        "connections_per_process": spread,
        "problems": problems,
    }


def run(args: argparse.Namespace) -> int:
    ghz = find_ghz(None)
    pg = PostgresCluster().init()
    rows: list[dict[str, Any]] = []
    servers: list[ServerProcess] = []
    try:
        url = pg.create_database()
        with workspace() as ws:
            start: Callable[..., ServerProcess] = start_real
            sqlite = start(ws, cpu=None, use_uvloop=True, name="sqlite")
            servers.append(sqlite)
            seed(ws, sqlite, args.payload_bytes)
            replicas = [
                start(ws, cpu=None, use_uvloop=True, name=f"pg-{i}", extra=["--database-url", url])
                for i in range(2)
            ]
            servers.extend(replicas)
            seed(ws, replicas[0], args.payload_bytes)  # same secret, same token key, in PostgreSQL
            workers = start(
                ws, cpu=None, use_uvloop=True, name="workers", extra=["--database-url", url, "--workers", "2"]
            )
            servers.append(workers)
            n = WORKER_CONNECTIONS
            cases = [
                ("sqlite-1", [sqlite], 1),
                ("pg-1", replicas[:1], 1),
                ("pg-2", replicas, 1),
                ("pg-1-8c", replicas[:1], n),
                ("workers-2-8c", [workers], n),
            ]
            for rnd in range(1, args.rounds + 1):
                for name, targets, connections in cases:
                    row = measure(ghz, ws, targets, args, name, rnd, connections)
                    rows.append(row)
                    log(
                        f"round {rnd} {name:8s} {row['rps']:7.0f} rps  p50 {row['p50_ms']:6.2f} ms  "
                        f"p99 {row['p99_ms']:6.2f} ms  CPU/call: "
                        f"replicas {row['server_cpu_us_per_call']:4.0f} us  "
                        f"postgres {row['postgres_cpu_us_per_call']:4.0f} us  "
                        f"ghz {row['ghz_cpu_us_per_call']:4.0f} us  "
                        f"connections per process {row['connections_per_process']}"
                        + (f"  INVALID: {row['problems']}" if row["problems"] else "")
                    )
    finally:
        for server in servers:
            server.stop()
        pg.destroy()
    return report(args, rows)


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    def median(case: str, key: str) -> float:
        return float(statistics.median(float(r[key]) for r in rows if r["case"] == case))

    def ratio(a: str, b: str) -> dict[str, float]:
        per_round = [
            x["rps"] / y["rps"]
            for x in rows
            for y in rows
            if x["case"] == a and y["case"] == b and x["round"] == y["round"] and y["rps"]
        ]
        return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}

    summary = {
        case: {
            key: median(case, key)
            for key in (
                "rps",
                "p50_ms",
                "p99_ms",
                "server_cpu_us_per_call",
                "postgres_cpu_us_per_call",
                "ghz_cpu_us_per_call",
            )
        }
        for case in ("sqlite-1", "pg-1", "pg-2", "pg-1-8c", "workers-2-8c")
    }
    ratios = {
        "pg-1/sqlite-1": ratio("pg-1", "sqlite-1"),
        "pg-2/pg-1": ratio("pg-2", "pg-1"),
        "workers-2-8c/pg-1-8c": ratio("workers-2-8c", "pg-1-8c"),
    }
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "payload_bytes": args.payload_bytes,
        "rows": rows,
        "median": summary,
        "ratios": ratios,
    }
    out_dir = BENCH_DIR / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"scaleout-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nGetSecret, median of {args.rounds} round(s), c={args.concurrency}, {os.cpu_count()} CPUs:")
    print(f"{'case':13s} {'rps':>7s} {'p50 ms':>7s} {'p99 ms':>7s}  CPU us/call: replicas postgres  ghz")
    for case, m in summary.items():
        print(
            f"{case:13s} {m['rps']:7.0f} {m['p50_ms']:7.2f} {m['p99_ms']:7.2f}  "
            f"{m['server_cpu_us_per_call']:20.0f} {m['postgres_cpu_us_per_call']:8.0f} "
            f"{m['ghz_cpu_us_per_call']:4.0f}"
        )
    for name, r in ratios.items():
        print(f"{name}: {r['median']:.2f}x (rounds {r['min']:.2f}-{r['max']:.2f})")
    print(f"results: {out}")
    return 1 if any(r["problems"] for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__)
    p.add_argument("--rounds", type=int, default=int(_env("ROUNDS", "3")))
    p.add_argument("--duration", type=parse_duration, default=parse_duration(_env("DURATION", "8s")))
    p.add_argument("--warmup", type=parse_duration, default=parse_duration(_env("WARMUP", "2s")))
    p.add_argument("--concurrency", type=int, default=int(_env("CONCURRENCY", "64")))
    p.add_argument("--payload-bytes", type=int, default=int(_env("PAYLOAD_BYTES", "64")))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
