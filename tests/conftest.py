from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Participants, ServerThread, test_settings


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[ServerThread]:
    running = ServerThread(test_settings(data_dir)).start()
    yield running
    running.stop()


@pytest.fixture
def room(server: ServerThread) -> Iterator[Participants]:
    participants = Participants(server)
    yield participants
    participants.close()
