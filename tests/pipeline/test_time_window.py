"""Sample times are checked against the ingester's clock (issue 18, item 3).

Outside `[now - clickhouse.raw_ttl_days, now + ingest.max_future_s]` a message is dead-lettered
with a reason naming the bound. Before, each of these was stored and billed: a sample dated
tomorrow in tomorrow's hour; samples after 2106 in one capped rollup hour; `time_ms` 0 or 500 gone
from the raw rows (the TTL) but billed in 1970 by the rollups; one message dated 2299 took over
`status` (its window moved to 2299, every real GPU "silent"). One ingester run (real broker, real
chDB, the clock fixed) feeds every test of the module; each test checks one case. The store keeps
raw rows for `TEST_RAW_TTL_DAYS` (ClickHouse applies its TTL by its own clock, not the ingester's);
the ingester's window uses the shipped 30 days.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gpufleet import wire
from gpufleet.config import Config
from gpufleet.pipeline.ingest.validation import TimeWindow
from gpufleet.pipeline.queries.status import fleet_status
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import T0_MS, TEST_RAW_TTL_DAYS, gpu, report
from tests.security import ingest_config, produce, running_ingester, wait_for

NOW_MS = T0_MS + 3_600_000
"""The ingester's clock: 2026-11-18T12:06:40Z."""
NOW_ISO = "2026-11-18T12:06:40.000Z"
DAY_MS = 86_400_000

TOMORROW_MS = NOW_MS + DAY_MS  # 2026-11-19T12:06:40Z
Y2200_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z, past DateTime's 2106 cap of the rollups' hour column
Y2299_MS = 10_395_302_400_000  # 2299-06-01T00:00:00Z


def _msg(node: str, seq: int, time_ms: int) -> wire.NodeReport:
    return report(node=node, seq=seq, time_ms=time_ms, gpus=[gpu(i, node, tenant="acme", job="j") for i in range(2)])


MESSAGES = [
    *[_msg("ok", s, NOW_MS - 60_000 + 1000 * s) for s in range(3)],  # last one 2026-11-18T12:05:42Z
    _msg("tomorrow", 0, TOMORROW_MS),
    _msg("far", 0, Y2200_MS),
    _msg("epoch", 0, 0),
    _msg("epoch", 1, 500),
    _msg("y2299", 0, Y2299_MS),
]
FUTURE = ("is more than ingest.max_future_s = 3600 s ahead of the ingester's clock (2026-11-18T12:06:40.000Z): "
          "fix the agent's clock (NTP), or raise ingest.max_future_s")
PAST = ("is older than clickhouse.raw_ttl_days = 30 days before the ingester's clock (2026-11-18T12:06:40.000Z): "
        "raw samples that old are dropped on arrival; fix the agent's clock, or raise clickhouse.raw_ttl_days "
        "to ingest an older backlog")


# --- the window itself -------------------------------------------------------------------------

def test_the_window_is_exact_at_both_bounds() -> None:
    w = TimeWindow.from_config(Config())
    assert (w.max_future_ms, w.max_past_ms) == (3_600_000, 30 * DAY_MS)
    assert w.check(NOW_MS + 3_600_000, NOW_MS) is None
    assert w.check(NOW_MS - 30 * DAY_MS, NOW_MS) is None
    assert w.check(NOW_MS + 3_600_001, NOW_MS) == f"time_ms 1795007200001 (2026-11-18T13:06:40.001Z) {FUTURE}"
    assert w.check(NOW_MS - 30 * DAY_MS - 1, NOW_MS) == f"time_ms 1792411599999 (2026-10-19T12:06:39.999Z) {PAST}"


# --- through the real ingester -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ingested(broker, ch_client, chdb_dsn: str) -> Iterator[tuple[Any, Config]]:
    """MESSAGES through one ingester whose clock reads NOW_MS; yields (client, config)."""
    db = f"tw_{uuid.uuid4().hex[:12]}"
    migrate(ch_client, SchemaOptions(database=db, raw_ttl_days=TEST_RAW_TTL_DAYS))
    topic = f"t-{uuid.uuid4().hex[:10]}"
    cfg = ingest_config(broker.bootstrap, Target(chdb_dsn, db), topic)
    with running_ingester(cfg, clock=lambda: NOW_MS / 1000) as ing:
        produce(cfg, [(m.node.encode(), wire.encode(m)) for m in MESSAGES])
        wait_for(ing, lambda: ing.stats.messages + ing.stats.dead_letters == len(MESSAGES),
                 f"all {len(MESSAGES)} messages stored or dead-lettered", timeout_s=60)
    yield ch_client, cfg
    ch_client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def _rows(ingested: tuple[Any, Config], sql: str, **parameters: object) -> list[tuple[Any, ...]]:
    client, cfg = ingested
    return client.query(sql.format(db=cfg.clickhouse.database), parameters=parameters).result_rows


def _everywhere(ingested: tuple[Any, Config], node: str) -> list[tuple[Any, ...]]:
    """How many rows of `node` each table holds: raw samples, agent reports, both rollups, latest."""
    return _rows(ingested, " ".join([
        "SELECT (SELECT count() FROM {db}.gpu_samples WHERE node = {{n:String}}),",
        *(f"(SELECT count() FROM {{db}}.{t} FINAL WHERE node = {{{{n:String}}}})," for t in
          ("agent_reports", "gpu_usage_1m", "gpu_usage_1h")),
        "(SELECT count() FROM {db}.gpu_latest FINAL WHERE node = {{n:String}})",
    ]), n=node)


def _dead(ingested: tuple[Any, Config], key: str) -> list[str]:
    return [r for (r,) in _rows(ingested, "SELECT reason FROM {db}.dead_letters FINAL WHERE key = {{k:String}} "
                                "ORDER BY offset", k=key)]


def test_the_neighbours_are_stored_and_billed_exactly(ingested) -> None:
    assert _everywhere(ingested, "ok") == [(6, 3, 2, 2, 2)]  # 3 messages x 2 GPUs; minute 12:05 for each GPU
    assert _rows(ingested, "SELECT sum(samples), sum(reported_ms) FROM {db}.gpu_usage_1h") == [(6, 6000)]
    assert _dead(ingested, "ok") == []


def test_a_sample_dated_tomorrow_is_dead_lettered_not_billed_in_tomorrows_hour(ingested) -> None:
    assert _everywhere(ingested, "tomorrow") == [(0, 0, 0, 0, 0)]
    assert _rows(ingested, "SELECT count() FROM {db}.gpu_usage_1h WHERE hour >= '2026-11-19 00:00:00'") == [(0,)]
    assert _dead(ingested, "tomorrow") == [f"time_ms 1795090000000 (2026-11-19T12:06:40.000Z) {FUTURE}"]


def test_a_sample_after_2106_is_dead_lettered_not_billed_in_a_capped_hour(ingested) -> None:
    assert _everywhere(ingested, "far") == [(0, 0, 0, 0, 0)]
    assert _dead(ingested, "far") == [f"time_ms 7258118400000 (2200-01-01T00:00:00.000Z) {FUTURE}"]


def test_time_ms_0_and_500_are_dead_lettered_not_billed_in_1970(ingested) -> None:
    assert _everywhere(ingested, "epoch") == [(0, 0, 0, 0, 0)]
    assert _rows(ingested, "SELECT count() FROM {db}.gpu_usage_1h WHERE hour < '2000-01-01 00:00:00'") == [(0,)]
    assert _dead(ingested, "epoch") == [f"time_ms 0 (1970-01-01T00:00:00.000Z) {PAST}",
                                        f"time_ms 500 (1970-01-01T00:00:00.500Z) {PAST}"]


def test_a_message_dated_2299_does_not_take_over_status(ingested) -> None:
    client, cfg = ingested
    doc = fleet_status(Store(client, cfg.clickhouse.database), cfg)
    assert _dead(ingested, "y2299") == [f"time_ms 10395302400000 (2299-06-01T00:00:00.000Z) {FUTURE}"]
    assert (doc["last_sample_at"], doc["gpus_reporting"], doc["nodes_reporting"]) == ("2026-11-18T12:05:42Z", 2, 1)
    assert doc["aggregation_window"] == {"from": "2026-11-17T12:05:00Z", "to": "2026-11-18T12:06:00Z"}
    assert doc["billable_gpu_hours_by_tenant"] == {"acme": 6 / 3600}
    assert doc["dlq_total"] == 5
