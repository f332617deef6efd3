from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Participants, ServerThread, test_settings
from .postgres import PostgresCluster

# Every test that starts a server through the `server` fixture (or asks for `database_url`) runs
# once per store. ROOMSECRETS_TEST_STORES=sqlite narrows it on a machine without PostgreSQL.
STORES = [s for s in os.environ.get("ROOMSECRETS_TEST_STORES", "sqlite,postgres").split(",") if s]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: exercises SQLite specifics; not run on PostgreSQL")
    config.addinivalue_line("markers", "postgres_only: exercises PostgreSQL (replicas, faults)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if "postgres" in STORES:
        return
    skip = pytest.mark.skip(reason="ROOMSECRETS_TEST_STORES leaves out postgres")
    for item in items:
        if item.get_closest_marker("postgres_only"):
            item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        kinds = STORES
        if metafunc.definition.get_closest_marker("sqlite_only"):
            kinds = [k for k in kinds if k == "sqlite"]
        if metafunc.definition.get_closest_marker("postgres_only"):
            kinds = [k for k in kinds if k == "postgres"]
        metafunc.parametrize("store_kind", kinds)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().init()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database_url(store_kind: str, request: pytest.FixtureRequest) -> str:
    """ "" for the embedded SQLite store; else a fresh database on the test PostgreSQL."""
    if store_kind == "sqlite":
        return ""
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(data_dir: Path, database_url: str) -> Iterator[ServerThread]:
    running = ServerThread(test_settings(data_dir, database_url=database_url)).start()
    yield running
    running.stop()


@pytest.fixture
def room(server: ServerThread) -> Iterator[Participants]:
    participants = Participants(server)
    yield participants
    participants.close()
