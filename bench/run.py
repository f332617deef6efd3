"""GetSecret / SetSecret on the real server against a bare grpc.aio echo of the same service.

    python -m bench.run [--rounds 3] [--duration 8s] [--warmup 2s] [--concurrency 64]
                        [--payload-bytes 64] [--cases echo,get,set] ...

Every flag also reads an environment variable (BENCH_ROUNDS, BENCH_DURATION, ...), so a quick
CI-like run is `BENCH_ROUNDS=1 BENCH_DURATION=2s BENCH_WARMUP=1s make bench`.

One run starts the real server (`bench.serve_real`, fresh temp data dir, ephemeral loopback port)
and the echo server (`bench.echo_server`), both pinned to CPU 0, and drives them with ghz pinned
to CPU 1, in interleaved rounds: echo, real GetSecret, real SetSecret, echo, ... Each load has a
discarded warm-up, then a fixed-duration measurement. It prints per-round figures, medians and the
real/echo throughput ratios, and writes everything to bench/results/<timestamp>.json. A load with
any failed call makes the run invalid (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from ._common import BENCH_DIR, log
from .fixture import Workspace, check_echo, seed, start_echo, start_real, workspace
from .ghz import find_ghz, ghz_command, ghz_version
from .machine import git
from .measure import Case, Load, Measurement, measure
from .procs import ServerProcess, can_pin

TARGET_GET_RATIO = 0.8
SERVER_CPU = 0
CLIENT_CPU = 1

CASES = {
    "echo": Case("echo", "echo", "GetSecret"),
    "get": Case("real-get", "real", "GetSecret"),
    "set": Case("real-set", "real", "SetSecret"),
    "echo-set": Case("echo-set", "echo", "SetSecret"),
    # The same server with the audit log buffered (--audit-buffered) instead of failing closed:
    # what the default's one write(2) per call costs, in the same run.
    "get-buffered": Case("get-buffered", "buffered", "GetSecret"),
}


# -- arguments ------------------------------------------------------------------------------------
def _env(name: str, default: str) -> str:
    return os.environ.get(f"BENCH_{name}", default)


def _flag_env(name: str) -> bool:
    return os.environ.get(f"BENCH_{name}", "").lower() in ("1", "true", "yes", "on")


def parse_duration(text: str) -> float:
    """Seconds from `8s`, `500ms`, `1m` or a bare number of seconds."""
    text = text.strip().lower()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=int(_env("ROUNDS", "3")), help="env BENCH_ROUNDS (3)")
    p.add_argument(
        "--duration", type=parse_duration, default=_env("DURATION", "8s"), help="env BENCH_DURATION (8s)"
    )
    p.add_argument(
        "--warmup", type=parse_duration, default=_env("WARMUP", "2s"), help="env BENCH_WARMUP (2s; 0: none)"
    )
    p.add_argument(
        "--concurrency", type=int, default=int(_env("CONCURRENCY", "64")), help="env BENCH_CONCURRENCY (64)"
    )
    p.add_argument(
        "--connections", type=int, default=int(_env("CONNECTIONS", "1")), help="env BENCH_CONNECTIONS (1)"
    )
    p.add_argument(
        "--payload-bytes",
        type=int,
        default=int(_env("PAYLOAD_BYTES", "64")),
        help="secret value size (env BENCH_PAYLOAD_BYTES, 64; at most 1 MiB, the server's default limit)",
    )
    p.add_argument(
        "--cases",
        default=_env("CASES", "echo,get,set"),
        help=f"comma-separated order within a round, from {', '.join(CASES)} (env BENCH_CASES)",
    )
    p.add_argument(
        "--no-uvloop",
        action="store_true",
        default=_flag_env("NO_UVLOOP"),
        help="run both servers on the default asyncio loop (env BENCH_NO_UVLOOP)",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        default=_flag_env("NO_PIN"),
        help="do not pin the servers to CPU 0 and ghz to CPU 1 (env BENCH_NO_PIN)",
    )
    p.add_argument(
        "--ghz", default=os.environ.get("GHZ"), help="ghz binary (env GHZ; default .tools/bin/ghz)"
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=Path(_env("RESULTS_DIR", str(BENCH_DIR / "results"))),
        help="where <timestamp>.json goes (env BENCH_RESULTS_DIR; default bench/results)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the temp data dir and server logs")
    p.add_argument(
        "--require-target",
        action="store_true",
        default=_flag_env("REQUIRE_TARGET"),
        help=f"exit 2 when median GetSecret/echo is below {TARGET_GET_RATIO} (env BENCH_REQUIRE_TARGET)",
    )
    return p


# -- the run --------------------------------------------------------------------------------------
def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    cases = [CASES[name.strip()] for name in args.cases.split(",") if name.strip()]
    if not cases or args.rounds < 1 or args.concurrency < 1 or args.duration <= 0:
        raise SystemExit("need at least one case and round, concurrency >= 1 and a positive duration")
    if not 0 < args.payload_bytes <= 1024 * 1024:
        raise SystemExit("--payload-bytes must be between 1 and 1048576")
    ghz = find_ghz(args.ghz)
    pinned = not args.no_pin and can_pin([SERVER_CPU, CLIENT_CPU])
    server_cpu = SERVER_CPU if pinned else None
    client_cpu = CLIENT_CPU if pinned else None
    if not pinned:
        log("note: not pinning (no taskset, fewer than 2 CPUs, or --no-pin): expect more noise")
    use_uvloop = not args.no_uvloop
    load = Load(args.concurrency, args.connections, args.warmup, args.duration)
    started = time.time()
    measurements: list[Measurement] = []
    memory: dict[str, dict[str, int]] = {}
    servers: dict[str, ServerProcess] = {}
    meta: dict[str, Any] = {}
    with workspace(keep=args.keep_data) as ws:
        try:
            servers["real"] = start_real(ws, cpu=server_cpu, use_uvloop=use_uvloop)
            seed(ws, servers["real"], args.payload_bytes)
            servers["echo"] = start_echo(ws, cpu=server_cpu, use_uvloop=use_uvloop)
            check_echo(ws, servers["echo"])
            if any(case.server == "buffered" for case in cases):
                servers["buffered"] = start_real(
                    ws, cpu=server_cpu, use_uvloop=use_uvloop, name="buffered", extra=["--audit-buffered"]
                )
            meta = run_meta(args, ghz, ws, servers, pinned)
            log(
                f"real server pid {servers['real'].pid} port {servers['real'].port}, echo pid "
                f"{servers['echo'].pid} port {servers['echo'].port}, loop {servers['real'].loop}, "
                f"{'server CPU 0 / ghz CPU 1' if pinned else 'unpinned'}; {args.rounds} round(s) of "
                f"{', '.join(c.name for c in cases)}: {args.warmup:g}s warm-up + {args.duration:g}s each"
            )
            for rnd in range(1, args.rounds + 1):
                for case in cases:
                    m = measure(ghz, ws, servers[case.server], case, rnd, load, client_cpu=client_cpu)
                    measurements.append(m)
                    log(
                        f"round {rnd} {case.name:9s} {m.result.rps:8.0f} rps  p50 {m.result.p50_ms:6.2f} ms"
                        f"  p99 {m.result.p99_ms:6.2f} ms  {m.server_cpu_us_per_call:5.0f} us CPU/call"
                        + ("" if m.valid else "  INVALID: " + "; ".join(m.result.problems))
                    )
            for name, server in servers.items():
                memory[name] = server.memory_kib()
        finally:
            for server in servers.values():
                server.stop()
    return report(args, meta, measurements, memory, started)


def run_meta(
    args: argparse.Namespace, ghz: Path, ws: Workspace, servers: dict[str, ServerProcess], pinned: bool
) -> dict[str, Any]:
    example = ghz_command(
        ghz,
        servers["real"].port,
        ws.spec(
            "GetSecret", concurrency=args.concurrency, connections=args.connections, duration_s=args.duration
        ),
        Path("OUT.json"),
        CLIENT_CPU if pinned else None,
    )
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
        "ghz_example": " ".join(example).replace(ws.token, "<token>"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loop": servers["real"].loop,
        "echo_loop": servers["echo"].loop,
        "pinned": pinned,
        "server_cpu": SERVER_CPU if pinned else None,
        "client_cpu": CLIENT_CPU if pinned else None,
        "ghz": str(ghz),
        "ghz_version": ghz_version(ghz),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "payload_bytes": args.payload_bytes,
        "cases": args.cases,
        "get_response_bytes": ws.get_response_file.stat().st_size,
        "set_response_bytes": ws.set_response_file.stat().st_size,
    }


# -- the report -----------------------------------------------------------------------------------
def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(measurements: list[Measurement]) -> dict[str, Any]:
    by_case: dict[str, list[Measurement]] = {}
    for m in measurements:
        by_case.setdefault(m.case.name, []).append(m)
    medians: dict[str, dict[str, Any]] = {
        name: {
            "rps": _median([m.result.rps for m in ms]),
            "p50_ms": _median([m.result.p50_ms for m in ms]),
            "p99_ms": _median([m.result.p99_ms for m in ms]),
            "server_cpu_us_per_call": _median([m.server_cpu_us_per_call for m in ms]),
            "server_cpu_util": _median([m.server_cpu_util for m in ms]),
            "client_cpu_util": _median([m.client_cpu_util for m in ms]),
            "rps_range": [min(m.result.rps for m in ms), max(m.result.rps for m in ms)],
            "rounds": len(ms),
        }
        for name, ms in by_case.items()
    }
    ratios: dict[str, Any] = {}
    echo = {m.round: m.result.rps for m in by_case.get("echo", [])}
    for name in ("real-get", "real-set", "get-buffered"):
        per_round = {
            m.round: m.result.rps / echo[m.round] for m in by_case.get(name, []) if echo.get(m.round)
        }
        if per_round:
            ratios[name] = {
                "per_round": per_round,
                "median_of_rounds": _median(list(per_round.values())),
                "ratio_of_medians": medians[name]["rps"] / medians["echo"]["rps"],
            }
    return {"medians": medians, "ratios": ratios}


def report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    measurements: list[Measurement],
    memory: dict[str, dict[str, int]],
    started: float,
) -> int:
    summary = summarize(measurements)
    valid = bool(measurements) and all(m.valid for m in measurements)
    get_ratio = summary["ratios"].get("real-get", {}).get("median_of_rounds")
    target_met = get_ratio is not None and get_ratio >= TARGET_GET_RATIO
    doc = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "meta": meta,
        "measurements": [m.to_json() for m in measurements],
        "summary": summary,
        "memory_kib": memory,
        "peak_rss_kib": {name: mem.get("VmHWM") for name, mem in memory.items()},
        "target": {"get_over_echo": TARGET_GET_RATIO, "met": target_met},
        "valid": valid,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(format_report(doc, measurements))
    print(f"results: {out}")
    if not valid:
        print("INVALID RUN: some calls failed (see the errors column / the JSON)", file=sys.stderr)
        return 1
    if args.require_target and not target_met:
        return 2
    return 0


def format_report(doc: dict[str, Any], measurements: list[Measurement]) -> str:
    meta = doc["meta"]
    lines = [
        f"roomsecrets bench: {meta['rounds']} round(s), c={meta['concurrency']} over "
        f"{meta['connections']} connection(s), {meta['warmup_s']:g}s warm-up + {meta['duration_s']:g}s, "
        f"payload {meta['payload_bytes']} B (GetSecret reply {meta['get_response_bytes']} B), "
        f"loop {meta['loop']}, {'server CPU 0 / ghz CPU 1' if meta['pinned'] else 'unpinned'}",
        "",
        f"{'round':>6}  {'case':9s} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'calls':>8} {'errors':>6} "
        f"{'srv us/call':>11} {'srv CPU':>7} {'ghz CPU':>7}",
    ]
    for m in measurements:
        r = m.result
        lines.append(
            f"{m.round:>6}  {m.case.name:9s} {r.rps:8.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.count:8d} "
            f"{r.error_count:6d} {m.server_cpu_us_per_call:11.0f} {m.server_cpu_util:7.0%} "
            f"{m.client_cpu_util:7.0%}"
        )
    lines.append("")
    for name, med in doc["summary"]["medians"].items():
        lo, hi = med["rps_range"]
        lines.append(
            f"{'median':>6}  {name:9s} {med['rps']:8.0f} {med['p50_ms']:8.2f} {med['p99_ms']:8.2f} "
            f"{'':8} {'':6} {med['server_cpu_us_per_call']:11.0f} {med['server_cpu_util']:7.0%} "
            f"{med['client_cpu_util']:7.0%}   (rps range {lo:.0f}-{hi:.0f})"
        )
    lines.append("")
    for name, ratio in doc["summary"]["ratios"].items():
        rounds = "  ".join(f"r{k}: {v:.2f}" for k, v in ratio["per_round"].items())
        lines.append(
            f"{name} / echo rps: median of rounds {ratio['median_of_rounds']:.2f}, ratio of medians "
            f"{ratio['ratio_of_medians']:.2f}   ({rounds})"
        )
    for name, peak in doc["peak_rss_kib"].items():
        if peak is not None:
            lines.append(f"peak RSS (VmHWM) {name} server: {peak / 1024:.1f} MiB")
    target = doc["target"]
    if "real-get" in doc["summary"]["ratios"]:
        lines.append(
            f"target GetSecret >= {target['get_over_echo']}x echo: {'met' if target['met'] else 'NOT met'}"
        )
    if not doc["valid"]:
        lines.append("INVALID: at least one load had failed calls")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (OSError, RuntimeError, TimeoutError, grpc.RpcError) as error:
        log(f"bench failed: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
