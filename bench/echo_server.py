"""A bare grpc.aio server for `roomsecrets.v1.RoomSecrets` whose GetSecret and SetSecret return a
prebuilt response: no auth, no store, no crypto, no audit. It is the ceiling for a Python gRPC
server on this machine, with the real server's options (`server_options`) and event loop.
Its WatchRequests sends a prebuilt `ready` event and then waits until the client goes: the least
an idle stream can cost on grpc.aio, the floor for the memory per idle stream.

    python -m bench.echo_server [--listen 127.0.0.1:0] [--payload-bytes 64]
                                [--get-response FILE] [--set-response FILE] [--no-uvloop]

The response files hold serialized GetSecretResponse / SetSecretResponse messages (bench.run
captures them from the real server, so both return byte-identical replies); without them the
responses are built here with the same shape. Prints `READY <port> <loop>` on stdout once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc as pb_grpc
from roomsecrets_server.app import server_options
from roomsecrets_server.config import Settings
from roomsecrets_server.crypto.checksum import crc32c

from ._common import (
    GET_SECRET_ID,
    SECRET_NAME,
    SECRET_TYPE,
    announce_ready,
    loop_name,
    payload,
    run_loop,
)


def secret_info(data: bytes) -> pb.SecretInfo:
    info = pb.SecretInfo(
        id=GET_SECRET_ID,
        type=SECRET_TYPE,
        name=SECRET_NAME,
        etag="0123456789abcdef",
        data_crc32c=crc32c(data),
        size=len(data),
    )
    info.update_time.FromNanoseconds(time.time_ns())
    return info


_READY = pb.WatchRequestsResponse(ready=pb.WatchReady(pending=0))


def default_get_response(data: bytes) -> pb.GetSecretResponse:
    return pb.GetSecretResponse(secret=secret_info(data), data=data, data_crc32c=crc32c(data))


def default_set_response(data: bytes) -> pb.SetSecretResponse:
    return pb.SetSecretResponse(secret=secret_info(data))


class EchoServicer(pb_grpc.RoomSecretsServicer):
    """GetSecret and SetSecret answer with a prebuilt message, WatchRequests with a prebuilt `ready`
    and then nothing; the other methods stay UNIMPLEMENTED."""

    def __init__(self, get_response: pb.GetSecretResponse, set_response: pb.SetSecretResponse) -> None:
        self._get = get_response
        self._set = set_response

    async def GetSecret(self, request: pb.GetSecretRequest, context: Any) -> pb.GetSecretResponse:
        return self._get

    async def SetSecret(self, request: pb.SetSecretRequest, context: Any) -> pb.SetSecretResponse:
        return self._set

    async def WatchRequests(
        self, request: pb.WatchRequestsRequest, context: Any
    ) -> AsyncIterator[pb.WatchRequestsResponse]:
        # The same shape as the real handler (an async generator) so the floor is like for like.
        yield _READY
        await asyncio.get_running_loop().create_future()  # until the call is cancelled


async def serve_echo(listen: str, servicer: EchoServicer, loop: str) -> None:
    # server_options only reads the message limits from Settings; the data dir is never touched.
    options = server_options(Settings(data_dir=Path("."), listen=listen))
    server = grpc.aio.server(options=options)
    pb_grpc.add_RoomSecretsServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        running.add_signal_handler(sig, stop.set)
    announce_ready(port, loop)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port; port 0 picks a free one")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--get-response", type=Path, help="a serialized GetSecretResponse to return")
    parser.add_argument("--set-response", type=Path, help="a serialized SetSecretResponse to return")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    args = parser.parse_args(argv)
    data = payload(args.payload_bytes)
    get_response = default_get_response(data)
    if args.get_response:
        get_response = pb.GetSecretResponse.FromString(args.get_response.read_bytes())
    set_response = default_set_response(data)
    if args.set_response:
        set_response = pb.SetSecretResponse.FromString(args.set_response.read_bytes())
    servicer = EchoServicer(get_response, set_response)  # type: ignore[abstract]  # the rest: UNIMPLEMENTED
    run_loop(serve_echo(args.listen, servicer, loop_name(not args.no_uvloop)), not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
