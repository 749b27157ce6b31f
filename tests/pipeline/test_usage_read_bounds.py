"""`gpufleet usage` over 30 days reads O(tenants x models x hours) rows: the same rows in a fleet of 8 GPUs
and in one of 32 serving the same two tenants (issue 12 item 3), where `usage_hourly` computed from the
per-GPU rollups reads about four times more. Rows are ClickHouse's own `read_rows` of each query
(deterministic: no timing). History: every GPU sampled every 10 minutes, GPUs alternating between two
tenants, written into `gpu_samples` so every view fills as in production.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpufleet.pipeline.queries.usage import USAGE_COLUMNS, refresh, usage_rows
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DAYS = 30
STEP_MS = 600_000


@dataclass(frozen=True)
class MeasuredStore(Store):
    """A Store that keeps ClickHouse's `rows_read` of every query it runs (each runs once more for its
    statistics: chDB's query summary does not carry them)."""

    reads: list[int] = field(default_factory=list)

    def query(self, sql: str, params: Any = None, settings: Any = None) -> Any:
        out = self.client.raw_query(sql + "\nFORMAT JSON", parameters=self.bind(sql, params), settings=settings)
        self.reads.append(int(json.loads(out)["statistics"]["rows_read"]))
        return super().query(sql, params, settings)


def _fleet(client: Any, gpus: int) -> Iterator[MeasuredStore]:
    db = f"t_{uuid.uuid4().hex[:12]}"
    migrate(client, SchemaOptions(database=db, raw_ttl_days=3650))
    steps = DAYS * DAY_MS // STEP_MS
    client.command(
        f"INSERT INTO {db}.gpu_samples (time, interval_ms, ingest_time, cluster, node, boot_id, seq, gpu_index, "
        "gpu_uuid, model, tenant, job, util_gpu_ratio, power_w, compute_processes, health) "
        f"SELECT fromUnixTimestamp64Milli(toInt64({START_MS} + (intDiv(number, {gpus}) + 1) * {STEP_MS}), 'UTC'), "
        f"{STEP_MS}, fromUnixTimestamp64Milli(toInt64({START_MS} + (intDiv(number, {gpus}) + 1) * {STEP_MS} + 700), "
        f"'UTC'), 'c1', concat('node-', toString(intDiv(number % {gpus}, 8))), 'boot-1', intDiv(number, {gpus}), "
        f"number % {gpus} % 8, concat('GPU-', toString(number % {gpus})), 'NVIDIA H100 80GB HBM3', "
        f"concat('tenant-', toString(number % 2)), 'job', 0.5, 300, 1, 'ok' FROM numbers({gpus * steps})")
    for table in ("gpu_usage_1h", "usage_hour_inputs"):
        client.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
    store = MeasuredStore(client, db)
    refresh(store)  # what the ingester does after each batch
    client.command(f"OPTIMIZE TABLE {db}.usage_hourly_stored FINAL")
    yield store
    client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


@pytest.fixture(scope="module")
def eight(ch_client: Any) -> Iterator[MeasuredStore]:
    yield from _fleet(ch_client, 8)


@pytest.fixture(scope="module")
def thirty_two(ch_client: Any) -> Iterator[MeasuredStore]:
    yield from _fleet(ch_client, 32)


def _usage_reads(store: MeasuredStore) -> tuple[int, list[dict[str, Any]]]:
    """Rows read by `gpufleet usage --from 2026-11-01 --to 2026-12-01` (its refresh check and its read)."""
    store.reads.clear()
    rows = usage_rows(store, START_MS, START_MS + DAYS * DAY_MS)
    return sum(store.reads), rows


def _raw_reads(store: MeasuredStore) -> int:
    out = store.client.raw_query(f"SELECT {', '.join(USAGE_COLUMNS)} FROM {store.database}.usage_hourly\nFORMAT JSON")
    return int(json.loads(out)["statistics"]["rows_read"])


def _count(store: Store, table: str) -> int:
    return int(store.rows(f"SELECT count() FROM {{db:Identifier}}.{table}")[0][0])


def test_usage_over_30_days_reads_the_same_rows_at_8_and_32_gpus(eight: MeasuredStore,
                                                                  thirty_two: MeasuredStore) -> None:
    few, few_rows = _usage_reads(eight)
    many, many_rows = _usage_reads(thirty_two)
    hours = DAYS * 24
    # 2 tenants x 1 model x 720 hours, in both fleets; every tenant has half the GPUs all the time
    assert len(few_rows) == len(many_rows) == 2 * hours
    assert {r["allocated_gpu_seconds"] for r in few_rows} == {4 * 3600.0}
    assert {r["allocated_gpu_seconds"] for r in many_rows} == {16 * 3600.0}
    assert _count(thirty_two, "gpu_usage_1h") == 4 * _count(eight, "gpu_usage_1h") == 4 * 8 * hours
    assert few == many
    # what it reads: one row per hour of the hour rollup's inputs (for the span and to find changed hours),
    # the marks (one per hour, and two hours either side), the policy row and the stored rows
    assert _count(eight, "usage_hour_inputs") == _count(thirty_two, "usage_hour_inputs") == hours
    assert few <= 2 * hours + (hours + 4) + 1 + 2 * hours
    # the view over the per-GPU rollups reads every GPU-hour: four times more GPUs, about four times more rows
    raw_few, raw_many = _raw_reads(eight), _raw_reads(thirty_two)
    assert raw_many >= 32 * hours > 6 * few
    assert raw_many >= 3 * raw_few
