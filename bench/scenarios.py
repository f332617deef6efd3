"""The scenarios bench/run.py does not measure, against the real server, in one run and one table.

    python -m bench.scenarios [--only get16k,list,startup,request,watch] [--streams 10000]
                              [--list-sizes 1000,100000] [--duration 5s] [--warmup 2s] [--rounds 3]
                              [--quick] ...

Every flag also reads an environment variable (BENCH_SCENARIOS, BENCH_STREAMS, BENCH_LIST_SIZES,
BENCH_DURATION, ...); BENCH_QUICK=1 (or --quick) is a CI-like smoke run: 1,000 and 10,000 secrets,
1,000 streams, 2 s loads, 1 round.

* get16k:  GetSecret of a 16 KiB value on the real server vs the bare grpc.aio echo (bench.run's
           fixture and measurement), interleaved rounds; ratios of rps and of p99.
* list:    ListSecrets first page (page_size 100) with N secrets stored for the caller, for each
           N of --list-sizes (seeded in-process by bench.seed_store), ghz at --list-concurrency;
           ratio of p50 between the largest and the smallest N (flat: within 1.25x).
* startup: spawn to `READY` of the real server on the largest list data dir vs on an empty store
           (keyring, key and schema only), interleaved, median of --starts.
* request: RequestSecret -> ProvideSecret round trips: bench.stream_client (grpc.aio), bob
           answering on his WatchRequests stream, --requesters concurrent alice callers, each
           deleting the provided secret after its round trip (untimed) unless --keep-provided.
* watch:   WatchRequests delivery latency (RequestSecret sent -> event on bob's stream), without
           and then with --streams idle streams open (in --open-steps batches); and, in the same
           run, the server's VmRSS growth per idle stream, next to the same growth on the bare
           grpc.aio echo server (whose WatchRequests sends `ready` and waits): the floor.

Opt-in (only when named in --only), for costs found while building these:
* list-crowded: the caller's last ListSecrets page alone in its room vs in a room that also holds
           another participant's secrets (largest minus smallest list size of them).
* byname:  GetSecret addressed by (type, name) on the list data dirs, smallest vs largest.

The servers run pinned to CPU 0; ghz and the stream client to CPU 1 (taskset, unless --no-pin).
Each server gets its own temp data dir and an ephemeral loopback port. Every process is started
with setsid and ended by process group on success, failure, Ctrl-C or SIGTERM; the temp dirs
are removed unless --keep-data. Prints a markdown table with a machine description and writes
bench/results/<UTC timestamp>-scenarios.json. Targets are reported, never enforced: the exit
status is 1 only when a scenario failed or had failed calls (130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc as pb_grpc
from roomsecrets_server.auth.dev_key import mint_token

from . import machine
from ._common import BENCH_DIR, IDENTITY, REPO_ROOT, ROOM, log
from .fixture import check_echo, start_echo, start_real, workspace
from .fixture import seed as seed_get_secret
from .ghz import LoadSpec, find_ghz, ghz_version, run_ghz
from .measure import Case, Load, Measurement, measure
from .procs import ServerProcess, can_pin, taskset_prefix
from .run import parse_duration
from .seed_store import SEED_TYPE
from .seed_store import seed as seed_store

SCENARIOS = ("get16k", "list", "startup", "request", "watch")
# Not run unless named in --only: they show costs the issue did not ask about (see docs/benchmarks.md).
EXTRA_SCENARIOS = ("list-crowded", "byname")
CROWD_IDENTITY = "zz-participant"  # sorts after IDENTITY, as a room's other participants may
ALIASES = {"memory": "watch", "roundtrip": "request", "get": "get16k", "list-secrets": "list"}
SERVER_CPU = 0
CLIENT_CPU = 1
TOKEN_TTL = 24 * 3600

GET16K_BYTES = 16 * 1024
TARGET_GET16K_RPS_RATIO = 0.9  # GetSecret >= 0.9x echo rps
TARGET_GET16K_P99_RATIO = 2.0  # GetSecret p99 <= 2x echo p99
TARGET_LIST_FLAT = 1.25  # p50 of the largest store within 1.25x of the smallest's
LIST_PAGE_SIZE = 100
TARGET_DELIVERY_P99_MS = 5.0
TARGET_KIB_PER_STREAM = 10.0


# -- options --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    dest: str
    flag: str
    env: str
    full: str
    quick: str
    help: str


OPTIONS = (
    Option("only", "--only", "SCENARIOS", ",".join(SCENARIOS), ",".join(SCENARIOS), "scenarios to run"),
    Option("duration", "--duration", "DURATION", "5s", "2s", "each measured load (get16k, list, request)"),
    Option("warmup", "--warmup", "WARMUP", "2s", "1s", "discarded warm-up before each load (0: none)"),
    Option("rounds", "--rounds", "ROUNDS", "3", "1", "interleaved rounds of get16k and list"),
    Option("concurrency", "--concurrency", "CONCURRENCY", "64", "64", "get16k ghz concurrency"),
    Option("list_sizes", "--list-sizes", "LIST_SIZES", "1000,100000", "1000,10000", "secrets stored"),
    Option("list_concurrency", "--list-concurrency", "LIST_CONCURRENCY", "16", "16", "list ghz concurrency"),
    Option("starts", "--starts", "STARTS", "3", "3", "server starts per data dir (startup)"),
    Option("requesters", "--requesters", "REQUESTERS", "16", "16", "concurrent RequestSecret callers"),
    Option("streams", "--streams", "STREAMS", "10000", "1000", "idle WatchRequests streams (watch)"),
    Option(
        "streams_per_channel",
        "--streams-per-channel",
        "STREAMS_PER_CHANNEL",
        "500",
        "500",
        "streams per connection",
    ),
    Option("open_steps", "--open-steps", "OPEN_STEPS", "10", "10", "batches the idle streams open in"),
    Option("deliveries", "--deliveries", "DELIVERIES", "500", "200", "sequential requests timed (watch)"),
)


def _flag_env(name: str) -> bool:
    return os.environ.get(f"BENCH_{name}", "").lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.scenarios",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (env BENCH_QUICK=1)")
    for o in OPTIONS:
        quick = f", quick {o.quick}" if o.quick != o.full else ""
        p.add_argument(
            o.flag, dest=o.dest, default=None, help=f"{o.help} (env BENCH_{o.env}; {o.full}{quick})"
        )
    p.add_argument(
        "--no-uvloop", action="store_true", default=_flag_env("NO_UVLOOP"), help="env BENCH_NO_UVLOOP"
    )
    p.add_argument("--no-pin", action="store_true", default=_flag_env("NO_PIN"), help="env BENCH_NO_PIN")
    p.add_argument(
        "--keep-provided",
        action="store_true",
        default=_flag_env("KEEP_PROVIDED"),
        help="request: keep every provided secret instead of deleting it after its round trip, so "
        "the answerer's stored secrets grow during the run (env BENCH_KEEP_PROVIDED)",
    )
    p.add_argument(
        "--ghz", default=os.environ.get("GHZ"), help="ghz binary (env GHZ; default .tools/bin/ghz)"
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=Path(os.environ.get("BENCH_RESULTS_DIR", str(BENCH_DIR / "results"))),
        help="where <timestamp>-scenarios.json goes (env BENCH_RESULTS_DIR)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the temp data dirs and server logs")
    return p


@dataclass(frozen=True)
class Config:
    only: tuple[str, ...]
    quick: bool
    duration: float
    warmup: float
    rounds: int
    concurrency: int
    list_sizes: tuple[int, ...]
    list_concurrency: int
    starts: int
    requesters: int
    streams: int
    streams_per_channel: int
    open_steps: int
    deliveries: int
    use_uvloop: bool
    pin: bool
    keep_provided: bool
    ghz: str | None
    results_dir: Path
    keep_data: bool

    @property
    def startup_size(self) -> int:
        return max(self.list_sizes)


def resolve(args: argparse.Namespace) -> Config:
    """Each option: the flag, else BENCH_<ENV>, else the quick or the full default."""
    quick = args.quick or _flag_env("QUICK")
    raw = {
        o.dest: getattr(args, o.dest) or os.environ.get(f"BENCH_{o.env}") or (o.quick if quick else o.full)
        for o in OPTIONS
    }
    only: list[str] = []
    for name in raw["only"].split(","):
        name = ALIASES.get(name.strip(), name.strip())
        if not name:
            continue
        if name not in SCENARIOS + EXTRA_SCENARIOS:
            known = ", ".join(SCENARIOS + EXTRA_SCENARIOS)
            raise SystemExit(f"unknown scenario {name!r}; choose from {known}")
        if name not in only:
            only.append(name)
    sizes = tuple(sorted({int(s.replace("_", "")) for s in raw["list_sizes"].split(",") if s.strip()}))
    cfg = Config(
        only=tuple(only),
        quick=quick,
        duration=parse_duration(raw["duration"]),
        warmup=parse_duration(raw["warmup"]),
        rounds=int(raw["rounds"]),
        concurrency=int(raw["concurrency"]),
        list_sizes=sizes,
        list_concurrency=int(raw["list_concurrency"]),
        starts=int(raw["starts"]),
        requesters=int(raw["requesters"]),
        streams=int(raw["streams"]),
        streams_per_channel=int(raw["streams_per_channel"]),
        open_steps=int(raw["open_steps"]),
        deliveries=int(raw["deliveries"]),
        use_uvloop=not args.no_uvloop,
        pin=not args.no_pin,
        keep_provided=args.keep_provided,
        ghz=args.ghz,
        results_dir=args.results_dir,
        keep_data=args.keep_data,
    )
    if not cfg.only:
        raise SystemExit("no scenario to run")
    if cfg.duration <= 0 or cfg.warmup < 0 or min(cfg.rounds, cfg.starts, cfg.concurrency) < 1:
        raise SystemExit("need a positive duration, warmup >= 0, rounds, starts and concurrency >= 1")
    if not sizes or sizes[0] < LIST_PAGE_SIZE + 1:
        raise SystemExit(f"--list-sizes: each size must exceed one page ({LIST_PAGE_SIZE})")
    if (
        min(cfg.list_concurrency, cfg.requesters, cfg.streams_per_channel, cfg.deliveries) < 1
        or cfg.streams < 0
    ):
        raise SystemExit("concurrencies, streams per channel and deliveries must be >= 1, streams >= 0")
    if cfg.streams_per_channel > 1000:
        raise SystemExit("--streams-per-channel: the server allows 1000 concurrent streams per connection")
    return cfg


# -- the run's processes and files ----------------------------------------------------------------
class Run:
    """Owns the run's temp root, its servers and the data dirs seeded for it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = Path(tempfile.mkdtemp(prefix="roomsecrets-scenarios-"))
        self.pinned = cfg.pin and can_pin([SERVER_CPU, CLIENT_CPU])
        self.server_cpu = SERVER_CPU if self.pinned else None
        self.client_cpu = CLIENT_CPU if self.pinned else None
        self._servers: list[ServerProcess] = []
        self._datasets: dict[int, Path] = {}
        self.seeding: dict[str, dict[str, float]] = {}
        self._ghz: Path | None = None

    @property
    def ghz(self) -> Path:
        if self._ghz is None:
            self._ghz = find_ghz(self.cfg.ghz)
        return self._ghz

    def start_server(self, name: str, data_dir: Path, *, timeout: float = 120.0) -> ServerProcess:
        argv = [
            sys.executable,
            "-m",
            "bench.serve_real",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
        ]
        if not self.cfg.use_uvloop:
            argv.append("--no-uvloop")
        server = ServerProcess.start(name, argv, cpu=self.server_cpu, log_dir=self.root, timeout=timeout)
        self._servers.append(server)
        try:
            server.check_sole_listener()
        except BaseException:
            self.stop(server)
            raise
        return server

    def stop(self, server: ServerProcess) -> None:
        """Stop once: a process group id must never be signalled after it may have been reused."""
        if server in self._servers:
            self._servers.remove(server)
            server.stop()

    def dataset(self, count: int) -> Path:
        """A data dir holding `count` secrets of IDENTITY in ROOM (seeded once per run)."""
        if count not in self._datasets:
            data_dir = self.root / f"store-{count}"
            log(f"seeding {count:,} secrets into {data_dir} ...")
            done = seed_store(data_dir, count)
            log(f"  seeded in {done.seconds:.1f}s ({done.db_bytes / 2**20:.1f} MiB on disk)")
            self.seeding[str(count)] = {"seconds": done.seconds, "db_mib": done.db_bytes / 2**20}
            self._datasets[count] = data_dir
        return self._datasets[count]

    def crowded_dataset(self, own: int, others: int) -> Path:
        """A data dir with `own` secrets of IDENTITY and `others` of CROWD_IDENTITY in ROOM."""
        data_dir = self.root / f"store-{own}-plus-{others}"
        if not data_dir.exists():
            log(f"seeding {own:,} + {others:,} secrets of {CROWD_IDENTITY} into {data_dir} ...")
            seed_store(data_dir, own)
            done = seed_store(data_dir, others, identity=CROWD_IDENTITY)
            self.seeding[f"{own}+{others}"] = {"seconds": done.seconds, "db_mib": done.db_bytes / 2**20}
        return data_dir

    def fresh_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def close(self) -> None:
        for server in list(self._servers):
            self.stop(server)
        if self.cfg.keep_data:
            log(f"kept the scenarios' data and server logs in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def bearer(data_dir: Path, identity: str = IDENTITY) -> tuple[tuple[str, str], ...]:
    token = mint_token(data_dir, identity=identity, room=ROOM, ttl=TOKEN_TTL)
    return (("authorization", f"Bearer {token}"),)


def run_client(
    run: Run, mode: str, server: ServerProcess, data_dir: Path, extra: Sequence[str]
) -> dict[str, Any]:
    """bench.stream_client in its own session (pinned to the client CPU); killed by process group
    if it overruns or we are interrupted. Its progress lines go to our stderr."""
    out = run.root / f"client-{mode}.json"
    argv = [
        *taskset_prefix(run.client_cpu),
        sys.executable,
        "-m",
        "bench.stream_client",
        mode,
        "--port",
        str(server.port),
        "--data-dir",
        str(data_dir),
        "--server-pid",
        str(server.pid),
        "--out",
        str(out),
        *extra,
        *([] if run.cfg.use_uvloop else ["--no-uvloop"]),
    ]
    timeout = 300 + run.cfg.warmup + run.cfg.duration + run.cfg.streams / 20 + run.cfg.deliveries * 0.2
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    # It starts no process of its own; once reaped, its group id must not be signalled again.
    if code != 0:
        raise RuntimeError(f"bench.stream_client {mode} exited with {code} (see its output above)")
    if not server.alive():
        raise RuntimeError(f"the {server.name} server died during the {mode} client run")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# -- scenario results -----------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the printed table."""

    scenario: str
    case: str
    rate: str = ""
    p50: str = ""
    p99: str = ""
    other: str = ""
    check: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Outcome:
    name: str
    rows: list[Row] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    busy_before: float = 0.0  # the machine's CPUs, over a second just before the scenario

    @property
    def valid(self) -> bool:
        return not self.problems and not self.error


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


# -- 1. GetSecret 16 KiB vs echo --------------------------------------------------------------------
def scenario_get16k(run: Run, out: Outcome) -> None:
    cfg = run.cfg
    load = Load(cfg.concurrency, 1, cfg.warmup, cfg.duration)
    cases = (Case("echo", "echo", "GetSecret"), Case("real-get", "real", "GetSecret"))
    measurements: list[Measurement] = []
    with workspace(keep=cfg.keep_data) as ws:
        servers: dict[str, ServerProcess] = {}
        try:
            servers["real"] = start_real(ws, cpu=run.server_cpu, use_uvloop=cfg.use_uvloop)
            seed_get_secret(ws, servers["real"], GET16K_BYTES)
            servers["echo"] = start_echo(ws, cpu=run.server_cpu, use_uvloop=cfg.use_uvloop)
            check_echo(ws, servers["echo"])
            for rnd in range(1, cfg.rounds + 1):
                for case in cases:
                    m = measure(run.ghz, ws, servers[case.server], case, rnd, load, client_cpu=run.client_cpu)
                    measurements.append(m)
                    log(
                        f"  get16k round {rnd} {case.name:8s} {m.result.rps:7.0f} rps  p50 "
                        f"{m.result.p50_ms:6.2f} ms  p99 {m.result.p99_ms:6.2f} ms  "
                        f"{m.server_cpu_us_per_call:4.0f} us CPU/call"
                    )
                    if not m.valid:
                        out.problems.append(f"round {rnd} {case.name}: " + "; ".join(m.result.problems))
            peak = {name: s.memory_kib().get("VmHWM", 0) for name, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        reply_bytes = ws.get_response_file.stat().st_size
    by = {c.name: [m for m in measurements if m.case.name == c.name] for c in cases}
    echo_round = {m.round: m for m in by["echo"]}
    rps_ratios = [
        m.result.rps / echo_round[m.round].result.rps
        for m in by["real-get"]
        if echo_round[m.round].result.rps
    ]
    p99_ratios = [
        m.result.p99_ms / echo_round[m.round].result.p99_ms
        for m in by["real-get"]
        if echo_round[m.round].result.p99_ms
    ]
    med = {
        name: {
            "rps": _median([m.result.rps for m in ms]),
            "p50_ms": _median([m.result.p50_ms for m in ms]),
            "p99_ms": _median([m.result.p99_ms for m in ms]),
            "server_cpu_us_per_call": _median([m.server_cpu_us_per_call for m in ms]),
            "client_cpu_util": _median([m.client_cpu_util for m in ms]),
        }
        for name, ms in by.items()
    }
    rps_ratio, p99_ratio = _median(rps_ratios), _median(p99_ratios)
    rps_ok, p99_ok = rps_ratio >= TARGET_GET16K_RPS_RATIO, p99_ratio <= TARGET_GET16K_P99_RATIO
    out.detail = {
        "payload_bytes": GET16K_BYTES,
        "reply_bytes": reply_bytes,
        "concurrency": cfg.concurrency,
        "measurements": [m.to_json() for m in measurements],
        "medians": med,
        "rps_ratio": {"median_of_rounds": rps_ratio, "per_round": rps_ratios},
        "p99_ratio": {"median_of_rounds": p99_ratio, "per_round": p99_ratios},
        "peak_rss_kib": peak,
        "target": {"rps_ratio_min": TARGET_GET16K_RPS_RATIO, "p99_ratio_max": TARGET_GET16K_P99_RATIO},
        "met": {"rps": rps_ok, "p99": p99_ok},
    }
    for name, label in (("echo", "echo (bare grpc.aio)"), ("real-get", "GetSecret")):
        fig = med[name]
        out.rows.append(
            Row(
                "GetSecret 16 KiB",
                f"{label}, c={cfg.concurrency}",
                f"{fig['rps']:,.0f} rps",
                _ms(fig["p50_ms"]),
                _ms(fig["p99_ms"]),
                f"server {fig['server_cpu_us_per_call']:.0f} µs CPU/call",
            )
        )
    last = out.rows[-1]
    last.check = f"rps {rps_ratio:.2f}x echo; p99 {p99_ratio:.2f}x echo"
    last.target = f"rps ≥ {TARGET_GET16K_RPS_RATIO}x; p99 ≤ {TARGET_GET16K_P99_RATIO:g}x"
    last.verdict = f"rps {_verdict(rps_ok)}; p99 {_verdict(p99_ok)}"


# -- 2. ListSecrets first page, small vs large store ------------------------------------------------
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Target:
    """One server and one ghz load in an interleaved comparison."""

    key: str
    label: str
    data_dir: Path
    method: str
    # Returns the request ghz sends (checked by one call first); may note facts in `sanity`.
    prepare: Callable[[ServerProcess, Metadata, Target], dict[str, Any]]
    sanity: dict[str, Any] = field(default_factory=dict)


def interleaved(run: Run, out: Outcome, tag: str, targets: Sequence[Target]) -> dict[str, dict[str, float]]:
    """Start one server per target (all pinned to the server CPU, only one loaded at a time), then
    --rounds rounds of a warm-up and a measured ghz load on each in turn. Returns the medians."""
    cfg = run.cfg
    servers: dict[str, ServerProcess] = {}
    specs: dict[str, LoadSpec] = {}
    rows: list[dict[str, Any]] = []
    try:
        for t in targets:
            server = servers[t.key] = run.start_server(f"{tag}-{t.key}", t.data_dir)
            md = bearer(t.data_dir)
            metadata_file = run.root / f"{tag}-{t.key}-metadata.json"
            metadata_file.write_text(json.dumps(dict(md)))
            request_file = run.root / f"{tag}-{t.key}-request.json"
            request_file.write_text(json.dumps(t.prepare(server, md, t)))
            specs[t.key] = LoadSpec(
                t.method, request_file, metadata_file, cfg.list_concurrency, 1, cfg.duration
            )
        for rnd in range(1, cfg.rounds + 1):
            for t in targets:
                row = _ghz_load(run, servers[t.key], specs[t.key], f"{tag}-r{rnd}-{t.key}")
                row |= {"round": rnd, "key": t.key}
                rows.append(row)
                log(
                    f"  {tag} round {rnd} {t.label:28s} {row['rps']:7.0f} rps  "
                    f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                    f"{row['server_cpu_us_per_call']:5.0f} us CPU/call"
                )
                if row["problems"]:
                    out.problems.append(f"round {rnd} {t.key}: " + "; ".join(row["problems"]))
        rss = {key: s.memory_kib() for key, s in servers.items()}
    finally:
        for server in servers.values():
            run.stop(server)
    med = {
        t.key: {
            key: _median([r[key] for r in rows if r["key"] == t.key])
            for key in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_call")
        }
        for t in targets
    }
    first, last = targets[0].key, targets[-1].key
    per_round = []
    for rnd in range(1, cfg.rounds + 1):
        a = next(r for r in rows if r["round"] == rnd and r["key"] == first)
        b = next(r for r in rows if r["round"] == rnd and r["key"] == last)
        if a["p50_ms"]:
            per_round.append(b["p50_ms"] / a["p50_ms"])
    ratio = _median(per_round)
    out.detail |= {
        "concurrency": cfg.list_concurrency,
        "targets": {t.key: {"label": t.label, "method": t.method, **t.sanity} for t in targets},
        "rounds": rows,
        "medians": med,
        "p50_ratio": {"of": [last, first], "median_of_rounds": ratio, "per_round": per_round},
        "server_memory_kib": rss,
    }
    for t in targets:
        m = med[t.key]
        out.rows.append(
            Row(
                TITLES[out.name],
                f"{t.label}, c={cfg.list_concurrency}",
                f"{m['rps']:,.0f} rps",
                _ms(m["p50_ms"]),
                _ms(m["p99_ms"]),
                f"server {m['server_cpu_us_per_call']:.0f} µs CPU/call",
            )
        )
    return med


def _ghz_load(run: Run, server: ServerProcess, spec: LoadSpec, name: str) -> dict[str, Any]:
    cfg = run.cfg
    if cfg.warmup > 0:
        warm = LoadSpec(spec.method, spec.data_file, spec.metadata_file, spec.concurrency, 1, cfg.warmup)
        run_ghz(run.ghz, server.port, warm, run.root / "warmup.json", cpu=run.client_cpu)
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    result = run_ghz(run.ghz, server.port, spec, run.root / f"{name}.json", cpu=run.client_cpu)
    wall, cpu = time.monotonic() - t0, server.cpu_seconds() - cpu0
    if not server.alive():
        raise RuntimeError(f"the {server.name} server died during the load")
    return {
        **result.summary(),
        "wall_s": wall,
        "server_cpu_us_per_call": cpu / result.count * 1e6 if result.count else 0.0,
        "server_cpu_util": cpu / wall if wall else 0.0,
        "client_cpu_util": result.client_cpu_s / wall if wall else 0.0,
    }


def _list_page(page_size: int, after: int = 0) -> Callable[[ServerProcess, Metadata, Target], dict[str, Any]]:
    """A ListSecrets request for `page_size` secrets after the first `after` ones (the page token is
    obtained from the server itself), checked once."""

    def prepare(server: ServerProcess, md: Metadata, t: Target) -> dict[str, Any]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RoomSecretsStub(channel)
            token, skipped = "", 0
            while skipped < after:  # pages of at most 1000 (the server's limit)
                size = min(1000, after - skipped)
                skip = stub.ListSecrets(
                    pb.ListSecretsRequest(page_size=size, page_token=token), metadata=md, timeout=60
                )
                if len(skip.secrets) != size or not skip.next_page_token:
                    raise RuntimeError(f"{server.name}: fewer than {after} secrets listed")
                token, skipped = skip.next_page_token, skipped + size
            reply = stub.ListSecrets(
                pb.ListSecretsRequest(page_size=page_size, page_token=token), metadata=md, timeout=60
            )
        if not reply.secrets or (
            not after and (len(reply.secrets) != page_size or not reply.next_page_token)
        ):
            raise RuntimeError(f"{server.name}: the page has {len(reply.secrets)} secrets")
        t.sanity |= {"secrets_on_page": len(reply.secrets), "reply_bytes": reply.ByteSize()}
        return {"page_size": page_size, "page_token": token} if token else {"page_size": page_size}

    return prepare


def _check_flat(out: Outcome, ratio_of: str) -> None:
    ratio = out.detail["p50_ratio"]["median_of_rounds"]
    flat = ratio <= TARGET_LIST_FLAT
    out.detail |= {"target": {"p50_ratio_max": TARGET_LIST_FLAT}, "met": flat}
    last = out.rows[-1]
    last.check = f"p50 {ratio_of}: {ratio:.2f}x"
    last.target = f"flat: ≤ {TARGET_LIST_FLAT}x"
    last.verdict = _verdict(flat)


def scenario_list(run: Run, out: Outcome) -> None:
    sizes = run.cfg.list_sizes
    targets = [
        Target(str(n), f"{n:,} secrets", run.dataset(n), "ListSecrets", _list_page(LIST_PAGE_SIZE))
        for n in sizes
    ]
    out.detail["page_size"] = LIST_PAGE_SIZE
    interleaved(run, out, "list", targets)
    _check_flat(out, f"{sizes[-1]:,} / {sizes[0]:,}")


def scenario_list_crowded(run: Run, out: Outcome) -> None:
    """Opt-in: the caller's LAST page (50 of its secrets) when it is alone in the room, vs when
    the room also holds another participant's secrets that sort after the caller's."""
    own, total = run.cfg.list_sizes[0], run.cfg.list_sizes[-1]
    others = max(total - own, 1)
    page = _list_page(LIST_PAGE_SIZE, after=own - LIST_PAGE_SIZE // 2)
    targets = [
        Target("alone", f"{own:,} own secrets, alone in room", run.dataset(own), "ListSecrets", page),
        Target(
            "crowded",
            f"{own:,} own + {others:,} of {CROWD_IDENTITY}",
            run.crowded_dataset(own, others),
            "ListSecrets",
            page,
        ),
    ]
    out.detail |= {"page_size": LIST_PAGE_SIZE, "own": own, "others": others}
    interleaved(run, out, "crowded", targets)
    _check_flat(out, "crowded / alone")


def scenario_byname(run: Run, out: Outcome) -> None:
    """Opt-in: GetSecret addressed by (type, name) instead of id, small vs large store."""
    sizes = run.cfg.list_sizes

    def by_name(server: ServerProcess, md: Metadata, t: Target) -> dict[str, Any]:
        request = {"type": SEED_TYPE, "name": "seed-0000050"}
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = pb_grpc.RoomSecretsStub(channel).GetSecret(
                pb.GetSecretRequest(**request), metadata=md, timeout=60
            )
        t.sanity["value_bytes"] = len(reply.data)
        return request

    targets = [Target(str(n), f"{n:,} secrets", run.dataset(n), "GetSecret", by_name) for n in sizes]
    interleaved(run, out, "byname", targets)
    _check_flat(out, f"{sizes[-1]:,} / {sizes[0]:,}")


# -- 6. start-up time, empty vs large store ---------------------------------------------------------
def scenario_startup(run: Run, out: Outcome) -> None:
    cfg = run.cfg
    sizes = (0, cfg.startup_size)
    dirs = {size: run.dataset(size) for size in sizes}
    starts: list[dict[str, Any]] = []
    for rnd in range(1, cfg.starts + 1):
        for size in sizes:
            t0 = time.monotonic()
            server = run.start_server(f"startup-{size}", dirs[size], timeout=600)
            try:
                ready = time.monotonic() - t0
                _check_health(server)
                health = time.monotonic() - t0
                memory = server.memory_kib()
            finally:
                run.stop(server)
            starts.append(
                {"round": rnd, "secrets": size, "ready_s": ready, "health_s": health, "memory_kib": memory}
            )
            log(
                f"  startup {size:>7,} secrets: READY after {ready:.3f}s "
                f"(health check answered at {health:.3f}s)"
            )
    med = {size: _median([s["ready_s"] for s in starts if s["secrets"] == size]) for size in sizes}
    rng = {
        size: (
            min(s["ready_s"] for s in starts if s["secrets"] == size),
            max(s["ready_s"] for s in starts if s["secrets"] == size),
        )
        for size in sizes
    }
    extra = med[sizes[1]] - med[0]
    out.detail = {
        "starts": starts,
        "median_ready_s": {str(k): v for k, v in med.items()},
        "extra_s": extra,
        "ratio": med[sizes[1]] / med[0] if med[0] else 0.0,
    }
    for size in sizes:
        lo, hi = rng[size]
        label = "empty store (baseline)" if size == 0 else f"{size:,} secrets"
        out.rows.append(
            Row(
                "start-up (spawn → READY)",
                label,
                other=f"median {med[size]:.2f} s of {cfg.starts} (range {lo:.2f}-{hi:.2f} s)",
            )
        )
    out.rows[-1].check = f"{extra * 1e3:+.0f} ms over empty ({out.detail['ratio']:.2f}x)"
    out.rows[-1].target = "none set"
    out.rows[-1].verdict = "-"


def _check_health(server: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{server.name}: health check says {reply.status}")


# -- 3. RequestSecret -> ProvideSecret round trips ---------------------------------------------------
def scenario_request(run: Run, out: Outcome) -> None:
    cfg = run.cfg
    data_dir = run.fresh_dir("request")
    server = run.start_server("request", data_dir)
    try:
        result = run_client(
            run,
            "roundtrip",
            server,
            data_dir,
            [
                "--requesters",
                str(cfg.requesters),
                "--duration",
                str(cfg.duration),
                "--warmup",
                str(cfg.warmup),
                *(["--keep-provided"] if cfg.keep_provided else []),
            ],
        )
        result["server_memory_kib"] = server.memory_kib()
    finally:
        run.stop(server)
    out.detail = result
    if result["errors"]:
        out.problems.append(f"failed calls: {result['errors']}")
    if not result["count"]:
        out.problems.append("no round trip completed")
    seconds = result["per_second"]
    trend = f"; per second {seconds[0]} → {seconds[-1]}" if len(seconds) > 1 else ""
    out.rows.append(
        Row(
            "RequestSecret → ProvideSecret",
            f"round trip, {cfg.requesters} requesters, 1 answerer"
            + (", provided secrets kept" if cfg.keep_provided else ""),
            f"{result['rps']:,.0f} round trips/s",
            _ms(result["p50_ms"]),
            _ms(result["p99_ms"]),
            f"server {result['server_cpu_us_per_call']:.0f} µs CPU/round trip "
            f"({result['server_cpu_util']:.0%} busy); client CPU {result['client_cpu_util']:.0%}{trend}",
            verdict="-",
        )
    )


# -- 4 + 5. delivery latency with idle streams, memory per idle stream ----------------------------
def _idle_stream_args(cfg: Config) -> list[str]:
    return [
        "--streams",
        str(cfg.streams),
        "--streams-per-channel",
        str(cfg.streams_per_channel),
        "--open-steps",
        str(cfg.open_steps),
    ]


def _idle_floor(run: Run) -> dict[str, Any]:
    """Memory per idle stream on the bare grpc.aio echo server: same options, loop, tokens and
    handler shape (an async generator that yields `ready` and waits), nothing of ours."""
    data_dir = run.fresh_dir("watch-echo")  # only for the dev key the client mints tokens from
    argv = [sys.executable, "-m", "bench.echo_server", "--listen", "127.0.0.1:0"]
    if not run.cfg.use_uvloop:
        argv.append("--no-uvloop")
    server = ServerProcess.start("watch-echo", argv, cpu=run.server_cpu, log_dir=run.root)
    try:
        server.check_sole_listener()
        return run_client(run, "idle", server, data_dir, _idle_stream_args(run.cfg))
    finally:
        server.stop()


def scenario_watch(run: Run, out: Outcome) -> None:
    cfg = run.cfg
    floor = _idle_floor(run)
    data_dir = run.fresh_dir("watch")
    server = run.start_server("watch", data_dir)
    try:
        result = run_client(
            run,
            "watch",
            server,
            data_dir,
            [*_idle_stream_args(cfg), "--deliveries", str(cfg.deliveries)],
        )
    finally:
        run.stop(server)
    out.detail = result
    out.detail["echo_floor"] = floor
    if result["errors"]:
        out.problems.append(f"failures: {result['errors']}")
    if floor["errors"]:
        out.problems.append(f"echo floor failures: {floor['errors']}")
    for phase in ("baseline", "with_idle_streams"):
        if result[phase]["errors"] or result[phase]["count"] < cfg.deliveries:
            out.problems.append(
                f"{phase}: {result[phase]['count']} delivered, errors {result[phase]['errors']}"
            )
    base, loaded = result["baseline"], result["with_idle_streams"]
    p99_ok = loaded["p99_ms"] < TARGET_DELIVERY_P99_MS
    kib, floor_kib = result["kib_per_stream"], floor["kib_per_stream"]
    mem_ok = kib < TARGET_KIB_PER_STREAM
    out.detail["met"] = {"delivery_p99": p99_ok, "kib_per_stream": mem_ok}
    out.detail["target"] = {
        "delivery_p99_ms": TARGET_DELIVERY_P99_MS,
        "kib_per_stream": TARGET_KIB_PER_STREAM,
    }

    def memory_other(r: dict[str, Any]) -> str:
        before, after = r["memory_kib_before"]["VmRSS"], r["memory_kib_after"]["VmRSS"]
        return (
            f"opened in {cfg.open_steps} batches; server VmRSS {before / 1024:.1f} → "
            f"{after / 1024:.1f} MiB; last batch {r['marginal_kib_per_stream']:.1f} KiB/stream; "
            f"{r['open_server_cpu_us_per_stream']:.0f} µs CPU per stream opened"
        )

    out.rows += [
        Row(
            "WatchRequests delivery",
            f"no other stream open, {base['count']} sequential requests",
            p50=_ms(base["p50_ms"]),
            p99=_ms(base["p99_ms"]),
            other=f"max {base['max_ms']:.2f} ms",
        ),
        Row(
            "WatchRequests delivery",
            f"{cfg.streams:,} idle streams open, {loaded['count']} sequential requests",
            p50=_ms(loaded["p50_ms"]),
            p99=_ms(loaded["p99_ms"]),
            other=f"max {loaded['max_ms']:.2f} ms",
            check=f"p99 {loaded['p99_ms']:.2f} ms",
            target=f"p99 < {TARGET_DELIVERY_P99_MS:g} ms",
            verdict=_verdict(p99_ok),
        ),
        Row(
            "memory per idle stream",
            f"bare grpc.aio echo (the floor): {cfg.streams:,} streams over {floor['channels']} connections",
            rate=f"opened in {floor['open_s']:.1f} s",
            other=memory_other(floor),
            check=f"{floor_kib:.1f} KiB/stream",
        ),
        Row(
            "memory per idle stream",
            f"{cfg.streams:,} WatchRequests streams over {result['channels']} connections",
            rate=f"opened in {result['open_s']:.1f} s",
            other=f"{kib - floor_kib:.1f} KiB/stream over the floor ({kib / floor_kib:.2f}x); "
            + memory_other(result)
            if floor_kib > 0
            else memory_other(result),
            check=f"{kib:.1f} KiB/stream",
            target=f"< {TARGET_KIB_PER_STREAM:g} KiB",
            verdict=_verdict(mem_ok),
        ),
    ]


RUNNERS: dict[str, Callable[[Run, Outcome], None]] = {
    "get16k": scenario_get16k,
    "list": scenario_list,
    "list-crowded": scenario_list_crowded,
    "byname": scenario_byname,
    "startup": scenario_startup,
    "request": scenario_request,
    "watch": scenario_watch,
}
TITLES = {
    "get16k": "GetSecret 16 KiB",
    "list": "ListSecrets page of 100",
    "list-crowded": "ListSecrets last page (opt-in)",
    "byname": "GetSecret by (type, name) (opt-in)",
    "startup": "start-up (spawn → READY)",
    "request": "RequestSecret → ProvideSecret",
    "watch": "WatchRequests delivery / memory per idle stream",
}


# -- the report -----------------------------------------------------------------------------------
COLUMNS = ("scenario", "case", "throughput", "p50", "p99", "other", "check", "target", "result")


def markdown_table(rows: Sequence[Row]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r.scenario, r.case, r.rate, r.p50, r.p99, r.other, r.check, r.target, r.verdict)
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join(lines)


def describe_run(cfg: Config, pinned: bool) -> str:
    return (
        f"{'quick' if cfg.quick else 'full'} run: {', '.join(cfg.only)}; loads {cfg.warmup:g}s warm-up + "
        f"{cfg.duration:g}s, {cfg.rounds} round(s); "
        f"list sizes {', '.join(f'{s:,}' for s in cfg.list_sizes)}; "
        f"{cfg.streams:,} idle streams; {'servers on CPU 0, clients on CPU 1' if pinned else 'unpinned'}; "
        f"{'uvloop' if cfg.use_uvloop else 'asyncio'}"
    )


def report(cfg: Config, run: Run, outcomes: list[Outcome], meta: dict[str, Any], started: float) -> int:
    rows: list[Row] = []
    for o in outcomes:
        if o.error:
            rows.append(Row(TITLES[o.name], "FAILED", other=o.error[:300], verdict="**failed**"))
            continue
        if o.problems:
            for row in o.rows:
                row.verdict = "**invalid** (failed calls)"
        rows += o.rows
    valid = bool(outcomes) and all(o.valid for o in outcomes)
    table = markdown_table(rows)
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": time.time() - started,
        "meta": meta,
        "seeding": run.seeding,
        "scenarios": {
            o.name: {
                **o.detail,
                "seconds": o.seconds,
                "cpu_busy_before": o.busy_before,
                "valid": o.valid,
                "problems": o.problems,
                "error": o.error,
            }
            for o in outcomes
        },
        "table": [r.__dict__ for r in rows],
        "table_markdown": table,
        "valid": valid,
    }
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.results_dir / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}-scenarios.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print()
    print(f"### roomsecrets scenarios ({meta['when']})")
    print()
    print(describe_run(cfg, run.pinned) + f"; took {doc['wall_s'] / 60:.1f} min")
    print()
    print(machine.markdown(meta["machine"]))
    print()
    print(table)
    print()
    print(f"results: {path}")
    if not valid:
        failed = [o.name for o in outcomes if not o.valid]
        log(f"INVALID RUN: {', '.join(failed)} failed or had failed calls (see above and the JSON)")
        return 1
    return 0


# -- main -----------------------------------------------------------------------------------------
def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(cfg: Config) -> int:
    started = time.time()
    run = Run(cfg)
    outcomes: list[Outcome] = []
    try:
        if not run.pinned:
            log("note: not pinning (no taskset, fewer than 2 CPUs, or --no-pin): expect more noise")
        meta: dict[str, Any] = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "command": " ".join([Path(sys.executable).name, "-m", "bench.scenarios", *sys.argv[1:]]),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
            "machine": machine.describe(),
            "pinned": run.pinned,
            "server_cpu": run.server_cpu,
            "client_cpu": run.client_cpu,
        }
        if {"get16k", "list", "list-crowded", "byname"} & set(cfg.only):
            with contextlib.suppress(FileNotFoundError):  # those scenarios then fail, saying why
                meta["ghz"] = str(run.ghz)
                meta["ghz_version"] = ghz_version(run.ghz)
        log(describe_run(cfg, run.pinned))
        for name in cfg.only:
            outcome = Outcome(name)
            outcomes.append(outcome)
            busy = machine.wait_until_quiet()
            log(f"[{name}] {TITLES[name]} (machine {busy:.0%} busy before it)")
            outcome.busy_before = busy
            t0 = time.monotonic()
            try:
                RUNNERS[name](run, outcome)
            except (OSError, RuntimeError, TimeoutError, ValueError, KeyError, grpc.RpcError) as error:
                outcome.error = f"{type(error).__name__}: {error}"
                log(f"  {name} failed: {outcome.error}")
            outcome.seconds = time.monotonic() - t0
        return report(cfg, run, outcomes, meta, started)
    finally:
        run.close()


def main(argv: Sequence[str] | None = None) -> int:
    cfg = resolve(build_parser().parse_args(argv))
    with _sigterm_raises():
        try:
            return execute(cfg)
        except KeyboardInterrupt:
            log("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
