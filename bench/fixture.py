"""The benchmark's world: a real server on a fresh data dir, a dev-key token, a seeded secret, the
request and metadata files ghz sends, and an echo server answering with the real server's replies."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc as pb_grpc
from roomsecrets_server.auth.dev_key import mint_token

from ._common import GET_SECRET_ID, IDENTITY, ROOM, SECRET_NAME, SECRET_TYPE, payload
from .ghz import LoadSpec
from .procs import ServerProcess

TOKEN_TTL = 24 * 3600


@dataclass
class Workspace:
    root: Path
    data_dir: Path
    token: str
    metadata_file: Path
    get_request_file: Path
    set_request_file: Path
    get_response_file: Path
    set_response_file: Path
    payload_bytes: int

    def spec(self, method: str, *, concurrency: int, connections: int, duration_s: float) -> LoadSpec:
        data = {"GetSecret": self.get_request_file, "SetSecret": self.set_request_file}[method]
        return LoadSpec(method, data, self.metadata_file, concurrency, connections, duration_s)


@contextlib.contextmanager
def workspace(keep: bool = False) -> Iterator[Workspace]:
    """A temp dir (on the same disk as /tmp, so fsync is real) removed afterwards unless `keep`."""
    root = Path(tempfile.mkdtemp(prefix="roomsecrets-bench-"))
    data_dir = root / "data"
    ws = Workspace(
        root=root,
        data_dir=data_dir,
        token="",
        metadata_file=root / "metadata.json",
        get_request_file=root / "get-request.json",
        set_request_file=root / "set-request.json",
        get_response_file=root / "get-response.bin",
        set_response_file=root / "set-response.bin",
        payload_bytes=0,
    )
    try:
        yield ws
    finally:
        if keep:
            print(f"kept the benchmark's data in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def start_real(
    ws: Workspace,
    *,
    cpu: int | None,
    use_uvloop: bool,
    name: str = "real",
    module: str = "bench.serve_real",
    extra: Sequence[str] = (),
) -> ServerProcess:
    """`module` (bench.serve_real, or bench.serve_ablated with `extra` arguments) on ws.data_dir."""
    argv = [sys.executable, "-m", module, "--data-dir", str(ws.data_dir), "--listen", "127.0.0.1:0", *extra]
    if not use_uvloop:
        argv.append("--no-uvloop")
    server = ServerProcess.start(name, argv, cpu=cpu, log_dir=ws.root)
    server.check_sole_listener()
    return server


def start_echo(ws: Workspace, *, cpu: int | None, use_uvloop: bool) -> ServerProcess:
    argv = [
        sys.executable,
        "-m",
        "bench.echo_server",
        "--listen",
        "127.0.0.1:0",
        "--payload-bytes",
        str(ws.payload_bytes),
        "--get-response",
        str(ws.get_response_file),
        "--set-response",
        str(ws.set_response_file),
    ]
    if not use_uvloop:
        argv.append("--no-uvloop")
    server = ServerProcess.start("echo", argv, cpu=cpu, log_dir=ws.root)
    server.check_sole_listener()
    return server


def seed(ws: Workspace, real: ServerProcess, payload_bytes: int) -> None:
    """Mint a token from the server's dev key, store the GetSecret value through the API, keep the
    real replies for the echo server, and write the files ghz sends."""
    ws.payload_bytes = payload_bytes
    ws.token = mint_token(ws.data_dir, identity=IDENTITY, room=ROOM, ttl=TOKEN_TTL)
    value = payload(payload_bytes)
    metadata = (("authorization", f"Bearer {ws.token}"),)
    with grpc.insecure_channel(f"127.0.0.1:{real.port}", options=_channel_options(payload_bytes)) as ch:
        stub = pb_grpc.RoomSecretsStub(ch)
        stored = stub.SetSecret(
            pb.SetSecretRequest(secret_id=GET_SECRET_ID, type=SECRET_TYPE, name=SECRET_NAME, data=value),
            metadata=metadata,
            timeout=30,
        )
        got = stub.GetSecret(pb.GetSecretRequest(secret_id=GET_SECRET_ID), metadata=metadata, timeout=30)
    if got.data != value or got.secret.etag != stored.secret.etag:
        raise RuntimeError("the seeded secret did not read back intact")
    ws.get_response_file.write_bytes(got.SerializeToString())
    ws.set_response_file.write_bytes(stored.SerializeToString())
    ws.metadata_file.write_text(json.dumps({"authorization": f"Bearer {ws.token}"}))
    ws.get_request_file.write_text(json.dumps({"secret_id": GET_SECRET_ID}))
    # One secret per ghz worker: each call is a real, durable overwrite (read, seal, group-committed
    # write with an etag check), and no two calls race for the same row.
    ws.set_request_file.write_text(
        json.dumps(
            {
                "secret_id": "bench-set-{{.WorkerID}}",
                "type": SECRET_TYPE,
                "data": base64.b64encode(value).decode(),
            }
        )
    )


def check_echo(ws: Workspace, echo: ServerProcess) -> None:
    """The echo server answers GetSecret with exactly the real server's reply."""
    with grpc.insecure_channel(f"127.0.0.1:{echo.port}", options=_channel_options(ws.payload_bytes)) as ch:
        got = pb_grpc.RoomSecretsStub(ch).GetSecret(pb.GetSecretRequest(secret_id=GET_SECRET_ID), timeout=30)
    if got.SerializeToString() != ws.get_response_file.read_bytes():
        raise RuntimeError("the echo server's GetSecret reply differs from the real server's")


def _channel_options(payload_bytes: int) -> list[tuple[str, int]]:
    limit = payload_bytes + 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
