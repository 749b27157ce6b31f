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


def board_client(target: Target) -> Any:
    """A client of `target` whose default database is the store's (as the Grafana datasource sets it)."""
    client = connect(target)
    client.database = target.database
    return client


def board_answers(target: Target, uid: str, start: int, end: int, step_ms: int = 60_000) -> dict[str, list[Any]]:
    """Every panel's rows of committed board `uid` over [start, end] (Unix ms), its variables resolved and
    its macros expanded as Grafana and the ClickHouse plugin would, keyed by panel title."""
    from gpufleet.dashboards.macros import TimeRange, render
    from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables, run

    client = board_client(target)
    board = committed(uid)
    variables = resolve_variables(client, board, TimeRange(start, end, step_ms))
    return {q.panel_title: run(client, render(q.raw_sql, variables, panel_range(start, end, q.min_interval))).rows
            for q in panel_queries(board)}


def hexed(text: str) -> str:
    """A variable's value for `text`: its UTF-8 bytes in upper-case hex (what ClickHouse's hex() gives)."""
    return text.encode().hex().upper()
