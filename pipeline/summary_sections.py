"""Sections of the status document that come from the aggregation and alert modules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpufleet.config import Config

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


def aggregations(client: Client, cfg: Config) -> dict[str, Any]:
    return {}


def alerts(client: Client, db: str) -> dict[str, Any]:
    return {}
