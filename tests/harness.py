"""Test harness: the real server on an ephemeral loopback port, run on its own event loop in a
background thread, so tests call it through real channels and generated stubs."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import grpc
from roomsecrets.v1 import room_secrets_pb2_grpc
from roomsecrets_server.app import RoomSecretsServer
from roomsecrets_server.auth.dev_key import mint_token
from roomsecrets_server.config import Settings


def test_settings(data_dir: Path, **overrides: Any) -> Settings:
    base = Settings(
        data_dir=data_dir, listen="127.0.0.1:0", listener_grace=0.5, sweep_interval=0.2, shutdown_grace=1.0
    )
    return dataclasses.replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


class ServerThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: RoomSecretsServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="roomsecrets-test-server", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("server did not start")
        if self._error:
            raise self._error
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop (for white-box checks)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = RoomSecretsServer(self.settings)
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()


class Participants:
    """Mints tokens with the server's dev key and makes stubs that send them."""

    def __init__(self, server: ServerThread, room: str = "room-1") -> None:
        self.server = server
        self.room = room
        self.channel = grpc.insecure_channel(server.address)
        self.stub = room_secrets_pb2_grpc.RoomSecretsStub(self.channel)

    def token(self, identity: str, **kwargs: Any) -> str:
        kwargs.setdefault("room", self.room)
        kwargs.setdefault("issuer", self.server.settings.token_issuer)
        kwargs.setdefault("audience", self.server.settings.token_audience)
        return mint_token(self.server.settings.data_dir, identity=identity, **kwargs)

    def auth(self, identity: str, **kwargs: Any) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(identity, **kwargs)}"),)

    def close(self) -> None:
        self.channel.close()
