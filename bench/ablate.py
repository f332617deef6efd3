"""What each part of the real GetSecret path costs under load: the real server, the echo server
and the real server with one part switched off (bench.serve_ablated), measured with ghz in
interleaved rounds. The CPU per call saved by switching a part off is that part's cost.

    python -m bench.ablate [--rounds 3] [--duration 5s] [--warmup 1s] [--variants a,b,...]

Variants: echo, real; removals no-audit, no-sqlite, no-crypto, no-response, no-gc, bare-handler
and no-data (the first four together); prototype opt-value-cache (a plaintext cache, a trade-off).
See bench.serve_ablated for what each one patches.
Server on CPU 0, ghz on CPU 1, same load as bench.run. Writes bench/results/ablate-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import BENCH_DIR, log
from .fixture import Workspace, check_echo, seed, start_echo, start_real, workspace
from .ghz import find_ghz
from .measure import Case, Load, Measurement, measure
from .procs import ServerProcess, can_pin
from .run import CLIENT_CPU, SERVER_CPU, parse_duration

VARIANTS: dict[str, str | None] = {
    "echo": None,
    "real": None,
    # removals: upper bounds on what each part costs
    "no-audit": "audit",
    "no-sqlite": "sqlite",
    "no-crypto": "crypto",
    "no-response": "response",
    "no-gc": "gc",
    "no-data": "audit,sqlite,crypto,response",
    "bare-handler": "handler",
    # prototypes of behaviour-preserving fixes
    "opt-value-cache": "opt-value-cache",
    "opt-audit-gil-batched": "opt-audit-gil-batched",
    # SetSecret (--method SetSecret)
    "no-set-read": "set-read",
    "no-set-write": "set-write",
    "no-set-seal": "set-seal",
    "no-set-data": "set-read,set-write,set-seal,audit",
}
# Settings, not ablations: the real server with other group windows (seconds).
SETTINGS: dict[str, list[str]] = {
    "write-window-0": ["--write-group-window", "0"],
    "write-window-2ms": ["--write-group-window", "0.002"],
    "write-window-5ms": ["--write-group-window", "0.005"],
    "write-window-20ms": ["--write-group-window", "0.02"],
    "audit-window-5ms": ["--audit-group-window", "0.005"],
}
DEFAULT_VARIANTS = "echo,real,no-audit,no-sqlite,no-crypto,no-response,no-data,bare-handler"


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=parse_duration, default="5s")
    p.add_argument("--warmup", type=parse_duration, default="1s")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--payload-bytes", type=int, default=64)
    p.add_argument("--method", choices=("GetSecret", "SetSecret"), default="GetSecret")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"from {', '.join([*VARIANTS, *SETTINGS])}")
    p.add_argument("--ghz", default=None)
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS) - set(SETTINGS)
    if unknown:
        p.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    ghz = find_ghz(args.ghz)
    pinned = can_pin([SERVER_CPU, CLIENT_CPU])
    server_cpu, client_cpu = (SERVER_CPU, CLIENT_CPU) if pinned else (None, None)
    load = Load(args.concurrency, 1, args.warmup, args.duration)
    results: list[Measurement] = []
    servers: dict[str, ServerProcess] = {}
    spaces: dict[str, Workspace] = {}
    with contextlib.ExitStack() as stack:
        try:
            for name in names:
                if name == "echo":
                    continue
                ws = stack.enter_context(workspace())
                spaces[name] = ws
                ablation = VARIANTS.get(name, "")
                extra = SETTINGS.get(name) or (["--ablate", ablation, "--gc-stats"] if ablation else [])
                if extra:
                    servers[name] = start_real(
                        ws,
                        cpu=server_cpu,
                        use_uvloop=True,
                        name=name,
                        module="bench.serve_ablated",
                        extra=extra,
                    )
                else:
                    servers[name] = start_real(ws, cpu=server_cpu, use_uvloop=True, name=name)
                seed(ws, servers[name], args.payload_bytes)
            if "echo" in names:
                base = next(iter(spaces.values()), None) or stack.enter_context(workspace())
                if not spaces:
                    raise SystemExit("echo needs at least one real variant to copy its replies from")
                spaces["echo"] = base
                servers["echo"] = start_echo(base, cpu=server_cpu, use_uvloop=True)
                check_echo(base, servers["echo"])
            for rnd in range(1, args.rounds + 1):
                for name in names:
                    case = Case(name, name, args.method)
                    m = measure(ghz, spaces[name], servers[name], case, rnd, load, client_cpu=client_cpu)
                    results.append(m)
                    log(
                        f"round {rnd} {name:13s} {m.result.rps:7.0f} rps {m.server_cpu_us_per_call:6.0f} us "
                        f"CPU/call{'' if m.valid else '  INVALID: ' + '; '.join(m.result.problems)}"
                    )
        finally:
            for server in servers.values():
                server.stop()
            for name in names:
                if name in spaces and name != "echo":
                    tail = _gc_line(spaces[name].root / f"{name}.stderr")
                    if tail:
                        log(f"{name}: {tail}")
    return report(args, names, results)


def _gc_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line.startswith("GC collections")]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def report(args: argparse.Namespace, names: list[str], results: list[Measurement]) -> int:
    med: dict[str, dict[str, float]] = {}
    for name in names:
        ms = [m for m in results if m.case.name == name]
        med[name] = {
            "rps": statistics.median(m.result.rps for m in ms),
            "us_per_call": statistics.median(m.server_cpu_us_per_call for m in ms),
            "p50_ms": statistics.median(m.result.p50_ms for m in ms),
            "cpu_util": statistics.median(m.server_cpu_util for m in ms),
        }
    real = med.get("real")
    print(
        f"\n{'variant':13s} {'rps (median)':>12} {'rps range':>13} {'us CPU/call':>11} {'saved vs real':>13}"
    )
    for name in names:
        rps = [m.result.rps for m in results if m.case.name == name]
        saved = f"{real['us_per_call'] - med[name]['us_per_call']:13.0f}" if real else ""
        print(
            f"{name:13s} {med[name]['rps']:12.0f} {min(rps):6.0f}-{max(rps):<6.0f} "
            f"{med[name]['us_per_call']:11.0f} {saved}"
        )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"ablate-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    doc = {"medians": med, "measurements": [m.to_json() for m in results]}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if all(m.valid for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
