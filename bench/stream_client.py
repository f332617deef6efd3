"""The Python grpc.aio client of the request-flow scenarios, run by bench.scenarios as its own
process (pinned to CPU 1 when pinning, the server being on CPU 0). It writes its figures as JSON to
--out. Tokens are minted from the server's dev key in --data-dir; all participants share ROOM.

    python -m bench.stream_client roundtrip --port P --data-dir D --server-pid PID --out F
        [--requesters 16] [--duration 5] [--warmup 2] [--keep-provided]
    python -m bench.stream_client watch --port P --data-dir D --server-pid PID --out F
        [--streams 10000] [--streams-per-channel 500] [--open-steps 10] [--deliveries 500]
    python -m bench.stream_client idle --port P --data-dir D --server-pid PID --out F
        [--streams 10000] [--streams-per-channel 500] [--open-steps 10]

roundtrip: bob holds one WatchRequests stream and answers each secret_request with ProvideSecret as
soon as it arrives; --requesters concurrent alice workers call RequestSecret(from bob, a url never
asked before, delegate_to alice) in a loop. A call's latency is its whole round trip: the request
stored and pushed to bob, bob's ProvideSecret stored, alice woken and handed the value. After each
round trip the worker calls DeleteRequestedSecret for that url (not timed, but its server CPU is
counted), so bob's stored secrets do not grow with the run; --keep-provided skips it. A warm-up is
discarded; calls in flight at the deadline finish and count. The server's CPU time is read from
/proc/PID/stat at the start and the end of the measurement.

watch: bob holds a stream and rejects each request; alice sends --deliveries requests, one at a time.
Delivery latency is from just before alice's RequestSecret is issued to the moment bob's stream
yields the matching secret_request (same process, same clock). Measured first with no other stream
open (the baseline, which also warms the server up), then after opening --streams idle
WatchRequests streams (identities idle-00001, ...) over ceil(streams / streams-per-channel)
channels, each its own TCP connection (local subchannel pool; the server allows 1000 concurrent
streams per connection). They open in --open-steps equal batches, each batch all at once; a stream
counts as open once the server sent its `ready` event, which comes after it registered the stream.
The server's VmRSS is read (once it stops moving) before the first batch and after each; the growth
over --streams is the memory per idle stream.

idle: only the idle streams of `watch` and the server's memory, with the same tokens. Run against
the bare grpc.aio echo server (bench.echo_server), it gives what grpc.aio itself holds per idle
stream: the floor the real server's figure is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import resource
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc as pb_grpc
from roomsecrets_server.auth.dev_key import mint_token

from ._common import ROOM, log, payload, run_loop
from .procs import CLOCK_TICKS

if TYPE_CHECKING:
    from roomsecrets.v1.room_secrets_pb2_grpc import RoomSecretsAsyncStub

TOKEN_TTL = 24 * 3600
ASKER = "alice"
ANSWERER = "bob"
VALUE = payload(64)
CALL_TIMEOUT = 60.0
Metadata = tuple[tuple[str, str], ...]


# -- helpers --------------------------------------------------------------------------------------
def server_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def server_memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "Threads"):
            out[key] = int(value.split()[0])
    return out


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds of latencies in seconds (nearest-rank)."""
    if not samples:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "mean_ms": 0.0}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1e3

    return {
        "p50_ms": rank(0.50),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": ordered[-1] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


def auth(data_dir: Path, identity: str) -> Metadata:
    token = mint_token(data_dir, identity=identity, room=ROOM, ttl=TOKEN_TTL)
    return (("authorization", f"Bearer {token}"),)


def open_channel(port: int, *, own_connection: bool = True) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = []
    if own_connection:
        # Channels with equal arguments share one subchannel (one TCP connection) through the
        # global pool; a local pool gives this channel its own connection.
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)


def stub_of(channel: grpc.aio.Channel) -> RoomSecretsAsyncStub:
    return pb_grpc.RoomSecretsStub(channel)


class Tasks:
    """Fire-and-forget tasks kept referenced, their failures counted."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors: Counter[str] = Counter()

    def spawn(self, coro: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except grpc.aio.AioRpcError as error:
                self.errors[f"{what}: {error.code().name}"] += 1
            except Exception as error:
                self.errors[f"{what}: {type(error).__name__}"] += 1

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Answerer:
    """bob: one WatchRequests stream; answers each secret_request (provide or reject) at once and
    notes when each url arrived."""

    def __init__(self, stub: RoomSecretsAsyncStub, md: Metadata, *, provide: bool) -> None:
        self._stub = stub
        self._md = md
        self._provide = provide
        self.ready = asyncio.Event()
        self.arrivals: dict[str, asyncio.Future[float]] = {}
        self.tasks = Tasks()
        self.received = 0
        self.ended: str | None = None
        self._call = stub.WatchRequests(pb.WatchRequestsRequest(), metadata=md)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def expect(self, url: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.arrivals[url] = future
        return future

    async def _read(self) -> None:
        try:
            async for event in self._call:
                kind = event.WhichOneof("event")
                if kind == "secret_request":
                    now = time.perf_counter()
                    request = event.secret_request
                    self.received += 1
                    waiter = self.arrivals.pop(request.url, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(now)
                    self.tasks.spawn(self._answer(request.request_id), "answer")
                elif kind == "ready":
                    self.ready.set()
            self.ended = "stream ended"
        except grpc.aio.AioRpcError as error:
            self.ended = f"stream failed: {error.code().name} {error.details()}"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        finally:
            self.ready.set()

    async def _answer(self, request_id: str) -> None:
        if self._provide:
            await self._stub.ProvideSecret(
                pb.ProvideSecretRequest(request_id=request_id, data=VALUE), metadata=self._md, timeout=30
            )
        else:
            await self._stub.RejectSecret(
                pb.RejectSecretRequest(request_id=request_id, error="bench"), metadata=self._md, timeout=30
            )

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.ended is not None:
            raise RuntimeError(f"bob's WatchRequests {self.ended}")

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.tasks.drain()


# -- roundtrip ------------------------------------------------------------------------------------
async def roundtrip(args: argparse.Namespace) -> dict[str, Any]:
    bob_channel = open_channel(args.port)
    alice_channel = open_channel(args.port)
    bob = None
    try:
        bob = Answerer(stub_of(bob_channel), auth(args.data_dir, ANSWERER), provide=True)
        await bob.wait_ready(30)
        alice = stub_of(alice_channel)
        md = auth(args.data_dir, ASKER)
        run_tag = uuid.uuid4().hex[:8]  # urls never asked before, even on a reused server
        start = time.perf_counter()
        measure_from = start + args.warmup
        stop_at = measure_from + args.duration
        samples: list[float] = []
        ends: list[float] = []
        errors: Counter[str] = Counter()
        warm_calls = 0
        marks: dict[str, float] = {}

        async def mark_start() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            marks["server_cpu"] = server_cpu_seconds(args.server_pid)
            marks["client_cpu"] = own_cpu_seconds()
            marks["at"] = time.perf_counter()

        deletes: list[float] = []

        async def worker(w: int) -> None:
            nonlocal warm_calls
            i = 0
            while time.perf_counter() < stop_at and sum(errors.values()) <= 100:
                i += 1
                url = f"https://bench.example/{run_tag}/{w}/{i}"
                request = pb.RequestSecretRequest(
                    from_participant_id=ANSWERER, url=url, timeout=30, delegate_to=ASKER
                )
                t0 = time.perf_counter()
                try:
                    reply = await alice.RequestSecret(request, metadata=md, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    errors[f"RequestSecret: {error.code().name}"] += 1
                    continue
                t1 = time.perf_counter()
                if reply.data != VALUE:
                    errors["wrong value"] += 1
                elif t0 >= measure_from:
                    samples.append(t1 - t0)
                    ends.append(t1)
                else:
                    warm_calls += 1
                if args.keep_provided:
                    continue
                # Not part of the round trip: keeps bob's stored secrets (and so the cost of
                # looking them up by name) from growing with the length of the run.
                try:
                    await alice.DeleteRequestedSecret(
                        pb.DeleteRequestedSecretRequest(url=url, delegated_to=ASKER),
                        metadata=md,
                        timeout=CALL_TIMEOUT,
                    )
                except grpc.aio.AioRpcError as error:
                    errors[f"DeleteRequestedSecret: {error.code().name}"] += 1
                    continue
                if t0 >= measure_from:
                    deletes.append(time.perf_counter() - t1)

        marker = asyncio.get_running_loop().create_task(mark_start())
        await asyncio.gather(*(worker(w) for w in range(args.requesters)))
        await marker
        end = max(ends) if ends else time.perf_counter()
        wall = end - marks["at"]
        server_cpu = server_cpu_seconds(args.server_pid) - marks["server_cpu"]
        client_cpu = own_cpu_seconds() - marks["client_cpu"]
        await bob.tasks.drain()
        if bob.ended is not None:
            errors[f"bob: {bob.ended}"] += 1
        errors.update(bob.tasks.errors)
        count = len(samples)
        # Round trips completed in each whole second of the measurement (not the tail after the
        # deadline): flat unless something grows.
        per_second = Counter(int(t - marks["at"]) for t in ends)
        whole_seconds = int(args.duration)
        return {
            "requesters": args.requesters,
            "keep_provided": args.keep_provided,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "warmup_calls": warm_calls,
            "count": count,
            "wall_s": wall,
            "rps": count / wall if wall > 0 else 0.0,
            **percentiles_ms(samples),
            "server_cpu_us_per_call": server_cpu / count * 1e6 if count else 0.0,
            "server_cpu_util": server_cpu / wall if wall > 0 else 0.0,
            "client_cpu_util": client_cpu / wall if wall > 0 else 0.0,
            "per_second": [per_second.get(i, 0) for i in range(whole_seconds)],
            "delete": percentiles_ms(deletes) | {"count": len(deletes)},
            "errors": dict(errors),
        }
    finally:
        if bob is not None:
            await bob.close()
        await alice_channel.close(None)
        await bob_channel.close(None)


# -- watch ----------------------------------------------------------------------------------------
async def deliveries(
    alice: RoomSecretsAsyncStub, md: Metadata, bob: Answerer, count: int, phase: str
) -> dict[str, Any]:
    """`count` requests one after the other; each waits for the rejection to come back."""
    samples: list[float] = []
    errors: Counter[str] = Counter()
    tag = uuid.uuid4().hex[:8]
    # The client's own garbage collector must not traverse the objects of 10,000 idle streams in
    # the middle of a timed delivery: everything alive now is moved out of its sight.
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    for i in range(count):
        url = f"https://bench.example/{tag}/{phase}/{i}"
        arrived = bob.expect(url)
        t0 = time.perf_counter()
        call = alice.RequestSecret(
            pb.RequestSecretRequest(from_participant_id=ANSWERER, url=url, timeout=30),
            metadata=md,
            timeout=CALL_TIMEOUT,
        )
        try:
            await call
            errors["not rejected"] += 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.PERMISSION_DENIED:  # a rejection
                errors[error.code().name] += 1
        if arrived.done():
            samples.append(arrived.result() - t0)
        else:
            arrived.cancel()
            bob.arrivals.pop(url, None)
            errors["never delivered"] += 1
    wall = time.perf_counter() - started
    return {
        "phase": phase,
        "count": len(samples),
        "wall_s": wall,
        **percentiles_ms(samples),
        "errors": dict(errors),
    }


class IdleStreams:
    """Up to `count` WatchRequests streams of distinct identities, spread over several connections."""

    def __init__(self, port: int, data_dir: Path, count: int, per_channel: int) -> None:
        self.count = count
        self.channels = [open_channel(port) for _ in range(max(1, math.ceil(count / per_channel)))]
        self._per_channel = per_channel
        self._data_dir = data_dir
        self._calls: list[Any] = []
        self._readers: list[asyncio.Task[None]] = []
        self.ready = 0
        self.failures: Counter[str] = Counter()
        self._target = 0
        self._reached = asyncio.Event()

    @property
    def opened(self) -> int:
        return len(self._calls)

    async def open(self, upto: int, timeout: float) -> float:
        """Open streams until `upto` are open, all at once; returns the seconds until every one
        of them was ready."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._target = upto
        self._reached.clear()
        for i in range(len(self._calls), upto):
            channel = self.channels[i // self._per_channel]
            md = auth(self._data_dir, f"idle-{i + 1:05d}")
            call = stub_of(channel).WatchRequests(pb.WatchRequestsRequest(), metadata=md)
            self._calls.append(call)
            self._readers.append(loop.create_task(self._read(call)))
        if self.ready < upto:
            await asyncio.wait_for(self._reached.wait(), timeout)
        return time.perf_counter() - t0

    async def _read(self, call: Any) -> None:
        counted = False
        try:
            async for event in call:
                if event.WhichOneof("event") == "ready" and not counted:
                    counted = True
                    self._count_ready()
                elif event.WhichOneof("event") != "ready":
                    self.failures["unexpected event"] += 1
            self.failures["stream ended"] += 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.failures[error.code().name] += 1
        finally:
            if not counted:
                self._count_ready()  # a failed stream must not leave open() waiting forever

    def _count_ready(self) -> None:
        self.ready += 1
        if self.ready >= self._target:
            self._reached.set()

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for channel in self.channels:
            await channel.close(None)


async def settled_rss(pid: int, *, interval: float = 0.5, tries: int = 20) -> dict[str, int]:
    """The server's memory once VmRSS stops moving (two reads `interval` apart within 1 %)."""
    last = server_memory_kib(pid)
    for _ in range(tries):
        await asyncio.sleep(interval)
        now = server_memory_kib(pid)
        if abs(now["VmRSS"] - last["VmRSS"]) <= max(256, last["VmRSS"] // 100):
            return now
        last = now
    return last


async def open_idle(args: argparse.Namespace, idle: IdleStreams) -> dict[str, Any]:
    """Open --streams idle streams in --open-steps equal batches (each batch all at once), reading
    the server's VmRSS before the first and after each: total growth / streams is the figure the
    target is about; the last batch's growth over its size is the marginal cost of one more stream
    once the server holds many."""
    before = await settled_rss(args.server_pid)
    steps = [before]
    open_s = open_cpu = 0.0
    for k in range(1, args.open_steps + 1):
        upto = args.streams * k // args.open_steps
        cpu0 = server_cpu_seconds(args.server_pid)
        open_s += await idle.open(upto, timeout=60 + args.streams / args.open_steps / 50)
        open_cpu += server_cpu_seconds(args.server_pid) - cpu0
        steps.append(await settled_rss(args.server_pid))
    after = steps[-1]
    last_batch = args.streams - args.streams * (args.open_steps - 1) // args.open_steps
    log(
        f"  {args.mode}: {idle.ready} idle streams open in {open_s:.1f}s; server RSS (MiB) "
        + " -> ".join(f"{m['VmRSS'] / 1024:.1f}" for m in steps)
    )
    growth = after["VmRSS"] - before["VmRSS"]
    return {
        "streams": args.streams,
        "channels": len(idle.channels),
        "streams_per_channel": args.streams_per_channel,
        "open_s": open_s,
        "open_server_cpu_us_per_stream": open_cpu / args.streams * 1e6 if args.streams else 0.0,
        "open_steps": args.open_steps,
        "memory_kib_before": before,
        "memory_kib_steps": steps[1:],
        "memory_kib_after": after,
        "rss_growth_kib": growth,
        "kib_per_stream": growth / args.streams if args.streams else 0.0,
        "marginal_kib_per_stream": (after["VmRSS"] - steps[-2]["VmRSS"]) / last_batch if last_batch else 0.0,
    }


async def idle_only(args: argparse.Namespace) -> dict[str, Any]:
    """Only the idle streams and their memory: run against the bare grpc.aio echo server, whose
    WatchRequests sends `ready` and waits, it measures what grpc.aio itself holds per stream."""
    idle = IdleStreams(args.port, args.data_dir, args.streams, args.streams_per_channel)
    try:
        result = await open_idle(args, idle)
        result["errors"] = {f"idle: {k}": v for k, v in idle.failures.items()}
        return result
    finally:
        await idle.close()


async def watch(args: argparse.Namespace) -> dict[str, Any]:
    bob_channel = open_channel(args.port)
    alice_channel = open_channel(args.port)
    bob = None
    idle = IdleStreams(args.port, args.data_dir, args.streams, args.streams_per_channel)
    try:
        bob = Answerer(stub_of(bob_channel), auth(args.data_dir, ANSWERER), provide=False)
        await bob.wait_ready(30)
        alice = stub_of(alice_channel)
        md = auth(args.data_dir, ASKER)
        baseline = await deliveries(alice, md, bob, args.deliveries, "baseline")
        log(f"  watch: baseline delivery p50 {baseline['p50_ms']:.2f} ms, p99 {baseline['p99_ms']:.2f} ms")
        await bob.tasks.drain()
        memory = await open_idle(args, idle)
        loaded = await deliveries(alice, md, bob, args.deliveries, "idle")
        await bob.tasks.drain()
        end = server_memory_kib(args.server_pid)
        errors: Counter[str] = Counter()
        errors.update(bob.tasks.errors)
        errors.update({f"idle: {k}": v for k, v in idle.failures.items()})
        if bob.ended is not None:
            errors[f"bob: {bob.ended}"] += 1
        return {
            **memory,
            "memory_kib_end": end,
            "baseline": baseline,
            "with_idle_streams": loaded,
            "errors": dict(errors),
        }
    finally:
        await idle.close()
        if bob is not None:
            await bob.close()
        await alice_channel.close(None)
        await bob_channel.close(None)


MODES: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "roundtrip": roundtrip,
    "watch": watch,
    "idle": idle_only,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.stream_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", choices=tuple(MODES))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="the server's, for its dev key")
    p.add_argument("--server-pid", type=int, required=True, help="read its CPU time and VmRSS")
    p.add_argument("--out", type=Path, required=True, help="where the JSON figures go")
    p.add_argument("--requesters", type=int, default=16)
    p.add_argument(
        "--keep-provided",
        action="store_true",
        help="roundtrip: do not DeleteRequestedSecret after each round trip (bob's secrets grow)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds")
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument("--streams-per-channel", type=int, default=500)
    p.add_argument("--deliveries", type=int, default=500)
    p.add_argument(
        "--open-steps", type=int, default=10, help="watch, idle: open the idle streams in N batches (10)"
    )
    p.add_argument("--no-uvloop", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: dict[str, Any] = {}

    async def run() -> None:
        result.update(await MODES[args.mode](args))

    run_loop(run(), not args.no_uvloop)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
