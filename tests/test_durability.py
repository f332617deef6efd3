"""A write acknowledged OK survives a crash (SIGKILL) of the server process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc
from roomsecrets_server.auth.dev_key import mint_token

SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from roomsecrets_server.app import serve
    from roomsecrets_server.config import Settings

    def ready(server):
        print(server.address, flush=True)

    asyncio.run(serve(Settings(data_dir=Path(sys.argv[1]), listen="127.0.0.1:0"), ready))
    """
)


@contextmanager
def server_process(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert address, "server did not start"
        yield process, address
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_acknowledged_writes_survive_sigkill(data_dir: Path) -> None:
    md = (("authorization", f"Bearer {mint_token(data_dir, identity='alice', room='r')}"),)
    acknowledged: list[str] = []
    with server_process(data_dir) as (process, address), grpc.insecure_channel(address) as channel:
        stub = room_secrets_pb2_grpc.RoomSecretsStub(channel)

        def write(i: int) -> str:
            stub.SetSecret(
                pb.SetSecretRequest(secret_id=f"k{i}", data=f"value-{i}".encode()), metadata=md, timeout=10
            )
            return f"k{i}"

        with ThreadPoolExecutor(16) as pool:
            acknowledged = list(pool.map(write, range(200)))
        os.killpg(process.pid, signal.SIGKILL)  # no shutdown, no flush: a crash
        process.wait(10)
    assert process.returncode == -signal.SIGKILL

    with server_process(data_dir) as (_, address), grpc.insecure_channel(address) as channel:
        stub = room_secrets_pb2_grpc.RoomSecretsStub(channel)
        for secret_id in acknowledged:
            got = stub.GetSecret(pb.GetSecretRequest(secret_id=secret_id), metadata=md, timeout=10)
            assert got.data == f"value-{secret_id[1:]}".encode()
