"""Samples the real server's event-loop thread with py-spy while ghz drives GetSecret (or SetSecret),
and ranks where its time goes: gRPC/asyncio machinery (what the echo server also pays) against
each part of the handler.

    python -m bench.profile [--method GetSecret] [--duration 8s] [--rate 250] [--echo] [--native]

Needs py-spy (`pip install py-spy`; root or CAP_SYS_PTRACE). Server on CPU 0; ghz and py-spy on
CPU 1. Writes the raw collapsed stacks and a JSON summary to bench/results/profile-<timestamp>/.
Shares are of the main thread's non-idle samples (wall time while it had work: running, or
runnable while the gRPC core thread held the core); "us/call" spreads those samples over the calls
completed in the sampling window. Sampling pauses the server, so absolute rates are lower than in
bench.run; compare shares, not rates.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import BENCH_DIR, log
from .fixture import Workspace, check_echo, seed, start_echo, start_real, workspace
from .ghz import GhzResult, find_ghz, run_ghz
from .procs import ServerProcess, can_pin, taskset_prefix
from .run import CLIENT_CPU, SERVER_CPU, parse_duration

# (function, file suffix) -> category; the innermost matching frame of a sample decides.
RULES: list[tuple[str, tuple[tuple[str, str], ...]]] = [
    (
        "auth: metadata + JWT cache (authorization, TokenVerifier)",
        (("authorization", "rpc/room_secrets.py"), ("TokenVerifier.", "auth/tokens.py")),
    ),
    (
        "validation (validate.*, authority, require_secrets)",
        (
            ("", "roomsecrets_server/validate.py"),
            ("", "roomsecrets_server/auth/authority.py"),
            ("SecretsService._owner", ""),
            ("SecretsService.check_data", ""),
            ("Principal.require_secrets", ""),
        ),
    ),
    (
        "sqlite read (SqliteStore.get_secret/_one/_secret)",
        (
            ("SqliteStore.get_secret", ""),
            ("SqliteStore._one", ""),
            ("SqliteStore.find_secrets", ""),
            ("_secret", "store/sqlite.py"),
        ),
    ),
    ("sqlite write wait (put_secret, _Writer.run)", (("SqliteStore.put_secret", ""), ("_Writer.run", ""))),
    (
        "decrypt (SecretsService.open: envelope, _aad, AES-GCM unwrap+decrypt)",
        (("SecretsService.open", ""), ("Envelope.open", "")),
    ),
    (
        "seal (SecretsService.seal: new DEK, AES-GCM x2, crc32c)",
        (("SecretsService.seal", ""), ("new_etag", "")),
    ),
    ("audit record (AuditLog.record: dict + json.dumps)", (("AuditLog.record", ""),)),
    ("audit flush (AuditLog.flush, every 0.5 s)", (("AuditLog.flush", ""),)),
    ("response protobuf (secret_info, _timestamp)", (("secret_info", "rpc/room_secrets.py"),)),
    (
        "handler glue (@unary, GetSecret/SetSecret bodies, get_secret/set_secret own time)",
        (
            ("unary.<locals>.handler", ""),
            ("RoomSecretsServicer.", "rpc/room_secrets.py"),
            ("SecretsService.get_secret", ""),
            ("SecretsService.set_secret", ""),
        ),
    ),
    ("echo handler", (("EchoServicer.", "bench/echo_server.py"),)),
    ("request sweeper / notifier", (("RequestService.", ""), ("LocalNotifier.", ""))),
]
MACHINERY = "outside the handler: gRPC + asyncio machinery (the echo server pays it too), waits for the core"


def categorize(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        name, _, rest = frame.partition(" (")
        path = rest.rstrip(")")
        for category, patterns in RULES:
            for func, suffix in patterns:
                if (not func or name == func or (func.endswith(".") and name.startswith(func))) and (
                    not suffix or path.endswith(suffix) or suffix in path
                ):
                    return category
    return MACHINERY


def analyze(stacks: Path) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """(main-thread samples by category, main-thread inclusive samples by function, samples by thread)."""
    categories: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split(":", 1)[-1].strip() if frames[0].startswith("thread") else "?"
        threads[thread] += n
        if not thread.startswith("MainThread"):
            continue
        body = frames[1:]
        categories[categorize(body)] += n
        for name in {f.partition(" (")[0] + " (" + f.partition(" (")[2] for f in body}:
            functions[name] += n
    return categories, functions, threads


def profile_one(
    ghz: Path,
    ws: Workspace,
    server: ServerProcess,
    method: str,
    args: argparse.Namespace,
    out_dir: Path,
    pinned: bool,
) -> dict[str, Any]:
    client_cpu = CLIENT_CPU if pinned else None
    warm = ws.spec(method, concurrency=args.concurrency, connections=1, duration_s=args.warmup)
    run_ghz(ghz, server.port, warm, ws.root / "warmup.json", cpu=client_cpu)
    stacks = out_dir / f"{server.name}-{method}.stacks.txt"
    spy_argv = [
        *taskset_prefix(client_cpu),
        args.py_spy,
        "record",
        "--pid",
        str(server.pid),
        "--duration",
        str(max(1, round(args.duration))),
        "--rate",
        str(args.rate),
        "--format",
        "raw",
        "--nolineno",
        "--threads",
        "--output",
        str(stacks),
        *(["--native"] if args.native else []),
    ]
    spy = subprocess.Popen(
        spy_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        spec = ws.spec(method, concurrency=args.concurrency, connections=1, duration_s=args.duration + 1.5)
        result: GhzResult = run_ghz(ghz, server.port, spec, ws.root / "profiled.json", cpu=client_cpu)
        spy_out, _ = spy.communicate(timeout=30)
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            spy.wait(10)
    if spy.returncode != 0 or not stacks.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy_out.strip()[-500:]}")
    categories, functions, threads = analyze(stacks)
    main_total = sum(categories.values()) or 1
    calls = result.rps * round(args.duration)
    per_call = 1e6 / args.rate / calls if calls else 0.0
    rows = [
        {"category": c, "samples": n, "share": n / main_total, "us_per_call": n * per_call}
        for c, n in categories.most_common()
    ]
    print(
        f"\n{server.name} server, {method}: {result.rps:.0f} rps while sampled, {main_total} main-thread "
        f"samples at {args.rate} Hz, errors {result.error_count}"
    )
    print(f"  {'share':>6} {'us/call':>8}  category")
    for row in rows:
        print(f"  {row['share']:6.1%} {row['us_per_call']:8.1f}  {row['category']}")
    top = [
        (name, n)
        for name, n in functions.most_common(60)
        if "roomsecrets_server" in name or "bench/" in name or "json" in name
    ][:25]
    print("  inclusive, roomsecrets functions:")
    for name, n in top:
        print(f"  {n / main_total:6.1%} {n * per_call:8.1f}  {name}")
    print("  threads (non-idle samples; a thread blocked inside C may count as busy): " + ", ".join(
        f"{t} {n}" for t, n in threads.most_common()
    ))  # fmt: skip
    return {
        "server": server.name,
        "method": method,
        "rps_while_sampled": result.rps,
        "errors": result.error_count,
        "main_thread_samples": main_total,
        "rate_hz": args.rate,
        "categories": rows,
        "functions": [{"function": f, "samples": n} for f, n in functions.most_common(80)],
        "threads": dict(threads),
        "stacks": str(stacks),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", default="GetSecret", choices=["GetSecret", "SetSecret"])
    p.add_argument("--duration", type=parse_duration, default="8s", help="sampling window")
    p.add_argument("--warmup", type=parse_duration, default="2s")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--payload-bytes", type=int, default=64)
    p.add_argument("--echo", action="store_true", help="profile the echo server too, for comparison")
    p.add_argument("--native", action="store_true", help="py-spy --native (C/Cython frames too)")
    p.add_argument(
        "--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    )
    p.add_argument("--ghz", default=None)
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    args = p.parse_args(argv)
    if not Path(args.py_spy).is_file():
        p.error("py-spy not found: pip install py-spy (into this virtualenv)")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ghz = find_ghz(args.ghz)
    pinned = can_pin([SERVER_CPU, CLIENT_CPU])
    server_cpu = SERVER_CPU if pinned else None
    out_dir = args.results_dir / f"profile-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    out_dir.mkdir(parents=True, exist_ok=True)
    reports: list[dict[str, Any]] = []
    servers: list[ServerProcess] = []
    with workspace() as ws:
        try:
            real = start_real(ws, cpu=server_cpu, use_uvloop=True)
            servers.append(real)
            seed(ws, real, args.payload_bytes)
            if args.echo:
                echo = start_echo(ws, cpu=server_cpu, use_uvloop=True)
                servers.append(echo)
                check_echo(ws, echo)
                reports.append(profile_one(ghz, ws, echo, args.method, args, out_dir, pinned))
            reports.append(profile_one(ghz, ws, real, args.method, args, out_dir, pinned))
        finally:
            for server in servers:
                server.stop()
    (out_dir / "summary.json").write_text(json.dumps(reports, indent=2) + "\n")
    log(f"stacks and summary: {out_dir}")
    return 0 if all(r["errors"] == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
