"""Fixtures for the dashboard tests: one chDB database per worker loaded with the simulated fleet."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from gpufleet.dashboards import build
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target, connect
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.dashboards import fleet_data

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


@dataclass(frozen=True)
class Fleet:
    target: Target
    client: Client
    """A client whose default database is the loaded one, as the Grafana datasource's defaultDatabase."""
    data: fleet_data.Loaded


@pytest.fixture(scope="session")
def fleet(chdb_dsn: str, ch_client: Client) -> Iterator[Fleet]:
    """The simulated fleet of `fleet_data`, loaded once per test session (per xdist worker)."""
    db = f"dash_{uuid.uuid4().hex[:10]}"
    migrate(ch_client, SchemaOptions(database=db))
    loaded = fleet_data.load(Store(ch_client, db))
    client = connect(Target(dsn=chdb_dsn))
    client.database = db
    yield Fleet(Target(dsn=chdb_dsn, database=db), client, loaded)
    ch_client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def committed(uid: str) -> dict[str, Any]:
    """The committed JSON of board `uid`."""
    return json.loads((build.ROOT / build.BOARDS_DIR / f"{uid}.json").read_text())


def hexed(text: str) -> str:
    """A variable's value for `text`: its UTF-8 bytes in upper-case hex (what ClickHouse's hex() gives)."""
    return text.encode().hex().upper()
