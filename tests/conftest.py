"""Shared fixtures: a real tansu broker per test session and a fresh chDB database per test.

chDB allows one process per store path, and pytest-xdist runs workers as processes, so each
worker opens its own store under pytest's temporary directory.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gpufleet.embedded.broker import EmbeddedBroker
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target, connect
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import TEST_RAW_TTL_DAYS

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


@pytest.fixture(autouse=True)
def _cli_logger_levels() -> Iterator[None]:
    """The levels `gpufleet.cli` sets on library loggers when a test runs the CLI, restored after each test."""
    from gpufleet.cli import CLIENT_LOGGERS

    saved = {name: logging.getLogger(name).level for name in CLIENT_LOGGERS}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (tansu) on a free loopback port, for the whole session."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture(scope="session")
def ch_client(chdb_dsn: str) -> Client:
    return connect(Target(dsn=chdb_dsn))


@pytest.fixture
def ch_target(chdb_dsn: str, ch_client: Client) -> Iterator[Target]:
    """A freshly migrated database of its own for this test (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    migrate(ch_client, SchemaOptions(database=name, raw_ttl_days=TEST_RAW_TTL_DAYS))
    yield Target(dsn=chdb_dsn, database=name)
    ch_client.command(f"DROP DATABASE IF EXISTS {name} SYNC")


@pytest.fixture
def ch_store(ch_client: Client, ch_target: Target) -> Store:
    """This test's database (`ch_target`) as a `Store`."""
    return Store(ch_client, ch_target.database)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the tracked files (a build in the checkout would share
    its `build/` folder with concurrent builds of other workers and with `make agent-artifact`)."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (root / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                   check=True, timeout=300)
    (whl,) = out.glob("gpufleet-*.whl")
    return whl


@pytest.fixture
def topic() -> str:
    """A topic name of this test's own, so tests sharing the broker never see each other's data."""
    return f"t-{uuid.uuid4().hex[:10]}"


SERVICE_FIXTURES = frozenset({"broker", "chdb_dsn", "ch_client", "ch_target", "alertmanager", "fleet", "wheel"})
"""Fixtures that start or open a real service (broker, chDB, Alertmanager) or build the wheel: `integration`."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Two lanes: `integration` (real services or processes) and the rest, the fast unit lane (`make test-fast`).

    A test is integration when it requests a service fixture (directly or through another fixture)
    or its module says so with `pytestmark = pytest.mark.integration` (tests that start processes).
    """
    mark = pytest.mark.integration
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(mark)
