"""The fleet rollups, job rollup, health rollups and event tables against hand-computed answers and
against the same answers from raw samples: one scenario through the real ingester (broker, JSON
staging path, dedup), with late data, a replay, a retried insert and a restarted ingester.

The fleet, 11:00-13:00 UTC, one report per node per minute (interval 60 s, sample k ends at
11:00 + k min, so its interval starts at minute k - 1):
- n1 GPU0: tenant acme, job j1, H100, tensor 0.25, 300 W, k = 1..120; XID 79 at k = 61 and 63 and
  XIDs [79, 13] at k = 62 (failing), SW thermal slowdown at k = 90 (degraded);
- n1 GPU1: unallocated, H100, tensor 0, 100 W, k = 1..120; volatile corrected ECC 0, then 5 from k = 100;
- n2 GPU0: tenant beta, job j2, A100, tensor 0.5, 200 W, k = 31..120; 90 C at k = 40..45 (degraded),
  XID 48 at k = 70 (failing). Its k = 31..60 arrive after k = 61..120 (late: a spool replayed).
Then n1's k = 1..10 are sent again (a replay the ingester's dedup drops), and one more n1 report
arrives late: 30 s ending at 11:20:30 with GPU1 at 90 C (degraded), between two ok samples already
stored. A second ingester (a new consumer group: no state) re-reads the whole topic.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from gpufleet import wire
from gpufleet.config import Config, parse
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.rows import Deriver, derive, derived_columns, insert_columns
from gpufleet.pipeline.queries import health_events, rollups
from gpufleet.pipeline.queries.mfu import mfu_by_scope
from gpufleet.pipeline.queries.policy import Policy
from gpufleet.pipeline.queries.waterfall import HardwareScope, waterfall
from gpufleet.pipeline.queries.window import Window
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import gpu, report
from tests.pipeline.test_ingest import _create, _produce, _run_until

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z
MIN = 60_000
H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
H100_PEAK, A100_PEAK = 989e12, 312e12
W = Window(M + 30 * MIN, M + 120 * MIN)  # 11:30-13:00: half an hour of minutes, then a whole hour


def _n1(k: int):
    xids = {61: [79], 62: [79, 13], 63: [79]}.get(k, [])
    return report(node="n1", seq=k, time_ms=M + k * MIN, interval_ms=MIN, gpus=[
        gpu(0, "n1", tenant="acme", job="j1", xids=xids, clock_event_reasons=0x20 if k == 90 else 0),
        gpu(1, "n1", util_gpu_ratio=0.0, tensor_active_ratio=0.0, power_w=100.0, compute_processes=0,
            ecc_corrected_volatile=5 if k >= 100 else 0),
    ])


def _n2(k: int):
    return report(node="n2", seq=k, time_ms=M + k * MIN, interval_ms=MIN, gpus=[
        gpu(0, "n2", tenant="beta", job="j2", model=A100, tensor_active_ratio=0.5, power_w=200.0,
            temp_gpu_c=90.0 if 40 <= k <= 45 else 60.0, xids=[48] if k == 70 else []),
    ])


def _enc(r) -> tuple[bytes, bytes]:
    return r.node.encode(), wire.encode(r)


def _cfg(broker, target: Target, topic: str, group: str) -> Config:
    return parse({
        "kafka": {"bootstrap_servers": broker.bootstrap, "topic": topic, "dlq_topic": f"{topic}-dlq"},
        "clickhouse": {"dsn": target.dsn, "database": target.database, "raw_ttl_days": 3650},
        "ingest": {"group_id": group, "batch_ms": 200, "max_poll_interval_ms": 3000, "session_timeout_ms": 3000},
    })


@pytest.fixture(scope="module")
def store(broker, chdb_dsn, ch_client) -> Iterator[Store]:
    db = f"t_{uuid.uuid4().hex[:12]}"
    migrate(ch_client, SchemaOptions(database=db, raw_ttl_days=3650))
    target = Target(chdb_dsn, db)
    topic = f"t-{uuid.uuid4().hex[:10]}"
    _create(broker, topic, f"{topic}-dlq")
    first = [_n1(k) for k in range(1, 121)] + [_n2(k) for k in range(61, 121)]
    late = [_n2(k) for k in range(31, 61)]
    replay = [_n1(k) for k in range(1, 11)]
    hot = report(node="n1", seq=5000, time_ms=M + 20 * MIN + 30_000, interval_ms=30_000, gpus=[
        gpu(1, "n1", util_gpu_ratio=0.0, tensor_active_ratio=0.0, power_w=100.0, compute_processes=0,
            temp_gpu_c=90.0)])
    _produce(broker, topic, [_enc(r) for r in first])
    store = Store(ch_client, db)
    ing = build_ingester(_cfg(broker, target, topic, f"a-{topic}"), store)
    _run_until(ing, lambda: ing.stats.messages == 180)
    _produce(broker, topic, [_enc(r) for r in [*late, *replay, hot]])  # after the rest: late for the ingester
    _run_until(ing, lambda: ing.stats.messages + ing.stats.duplicates == 221)
    assert (ing.stats.messages, ing.stats.duplicates) == (211, 10)
    ing.consumer.close()
    again = build_ingester(_cfg(broker, target, topic, f"b-{topic}"), store)  # a second ingester, no state
    _run_until(again, lambda: again.stats.duplicates == 221)
    again.consumer.close()
    # A retried insert of one block (the same rows, the same derived values) is dropped everywhere.
    retried = derived_columns(derive([_n1(200)], Deriver()), M)
    insert_columns(store, "gpu_samples", retried)
    insert_columns(store, "gpu_samples", retried)
    yield store
    ch_client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def _one(store: Store, sql: str, params: dict | None = None) -> tuple:
    (row,) = store.rows(sql, params)
    return tuple(row)


# --- fleet rollups ------------------------------------------------------------------------------------------


def _fleet_sums(store: Store, source: str, params: dict) -> list[tuple]:
    return [tuple(r) for r in store.rows(
        "SELECT tenant, model, toString(health), sum(samples), sum(reported_ms), sum(energy_mj), sum(mfu_ms), "
        f"sum(held_no_process_ms), round(sum(estimated_unmeasured_flop) / 1e12, 6) FROM {source} "
        "GROUP BY tenant, model, health ORDER BY tenant, model, health", params)]


EXPECTED_W = [
    # tenant, model, state, samples, GPU-ms, mJ, ms in MFU, held without a process, estimated TFLOPs
    ("", H100, "ok", 90, 90 * MIN, 90 * 100 * MIN, 90 * MIN, 0, 0.0),
    ("acme", H100, "ok", 86, 86 * MIN, 86 * 300 * MIN, 86 * MIN, 0, 86 * 0.25 * 989 * 60),
    ("acme", H100, "degraded", 1, MIN, 300 * MIN, MIN, 0, 0.25 * 989 * 60),
    ("acme", H100, "failing", 3, 3 * MIN, 3 * 300 * MIN, 3 * MIN, 0, 3 * 0.25 * 989 * 60),
    ("beta", A100, "ok", 83, 83 * MIN, 83 * 200 * MIN, 83 * MIN, 0, 83 * 0.5 * 312 * 60),
    ("beta", A100, "degraded", 6, 6 * MIN, 6 * 200 * MIN, 6 * MIN, 0, 6 * 0.5 * 312 * 60),
    ("beta", A100, "failing", 1, MIN, 200 * MIN, MIN, 0, 0.5 * 312 * 60),
]
"""11:30-13:00: samples k = 31..120 of each GPU (acme fails at k = 61..63 and is degraded at k = 90;
beta is degraded at k = 40..45 and fails at k = 70). n1 GPU1 is unallocated with no process, which
`held_no_process_ms` does not count (allocated only)."""

RAW_SUMS = (
    "SELECT tenant, model, toString(health), count(), sum(interval_ms), sum(toUInt64(round(ifNull(power_w, 0) "
    "* interval_ms))), sumIf(interval_ms, peak_flops IS NOT NULL AND (flops_measured IS NOT NULL OR "
    "flops_estimated IS NOT NULL OR error != '')), sumIf(interval_ms, tenant != '' AND compute_processes = 0), "
    "round(sumIf(ifNull(flops_estimated, 0), flops_measured IS NULL) / 1e12, 6) FROM {db:Identifier}.gpu_samples "
    "WHERE toUnixTimestamp64Milli(time) - interval_ms >= {w_start:Int64} "
    "AND toUnixTimestamp64Milli(time) - interval_ms < {w_end:Int64} "
    "GROUP BY tenant, model, health ORDER BY tenant, model, health"
)
"""The same sums from raw samples: each sample in the minute its interval starts in."""


def test_fleet_rollup_sums_are_the_hand_computed_and_the_raw_ones(store: Store) -> None:
    fleet = rollups.rows(rollups.FLEET, rollups.WINDOW_START, rollups.WINDOW_END, prefix="{db:Identifier}.")
    assert _fleet_sums(store, fleet, W.params()) == EXPECTED_W
    assert [tuple(r) for r in store.rows(RAW_SUMS, W.params())] == EXPECTED_W
    # the minute level alone and the hour level alone agree with the split read
    minutes = "{db:Identifier}.fleet_usage_1m WHERE " + W.sql()
    assert _fleet_sums(store, minutes, W.params()) == EXPECTED_W
    hour = Window(M + 60 * MIN, M + 120 * MIN)
    assert _fleet_sums(store, "{db:Identifier}.fleet_usage_1h WHERE " + hour.sql("hour"), hour.params()) == \
        _fleet_sums(store, "{db:Identifier}.fleet_usage_1m WHERE " + hour.sql(), hour.params())


def test_the_split_read_takes_whole_hours_from_the_hour_level(store: Store) -> None:
    sql = ("SELECT at >= toDateTime({h:Int64}, 'UTC') AS whole_hour, uniqExact(at), min(at) = toStartOfHour(min(at)), "
           "uniqExact(tenant, model, health) FROM "
           + rollups.rows(rollups.FLEET, rollups.WINDOW_START, rollups.WINDOW_END, prefix="{db:Identifier}.")
           + " GROUP BY whole_hour ORDER BY whole_hour")
    # 11:30-12:00: 30 minutes of the minute level ('', acme and beta ok, beta degraded); 12:00-13:00: one
    # hour row per key ('' ok; acme ok, degraded, failing; beta ok, failing).
    got = [tuple(r) for r in store.rows(sql, {**W.params(), "h": (M + 60 * MIN) // 1000})]
    assert got == [(0, 30, 0, 4), (1, 1, 1, 6)]


def test_mfu_and_waterfall_read_from_the_fleet_rollup_are_exact(store: Store) -> None:
    (fleet,) = mfu_by_scope(store, "fleet", W).rows
    achieved = 60 * (90 * 0.25 * H100_PEAK + 90 * 0.5 * A100_PEAK)
    peak = 60 * (180 * H100_PEAK + 90 * A100_PEAK)
    assert fleet.mfu == pytest.approx(achieved / peak, rel=1e-12)
    assert fleet.gpu_seconds == 270 * 60
    assert {r.key: r.mfu for r in mfu_by_scope(store, "tenant", W).rows} == pytest.approx({"acme": 0.25, "beta": 0.5})
    assert {r.key: r.gpu_seconds for r in mfu_by_scope(store, "model", W).rows} == {A100: 5400.0, H100: 10800.0}
    w = waterfall(store, W, Policy(("failing",), 5))
    assert (w.gpus, w.installed_ms, w.unknown_ms) == (3, 3 * 90 * MIN, 0)
    assert (w.unhealthy_ms, w.unallocated_ms, w.idle_allocated_ms) == (4 * MIN, 90 * MIN, 0)
    assert w.busy_ms == 3 * 90 * MIN - 4 * MIN - 90 * MIN
    # 11:00-13:00: n2 was not installed before 11:30, so half an hour of it is unknown; n1 GPU1's late
    # report overlaps its own samples and claims nothing, so GPU1 is installed for the window only
    w = waterfall(store, Window(M, M + 120 * MIN), Policy(("failing",), 5))
    assert (w.installed_ms, w.unknown_ms) == (3 * 120 * MIN, 30 * MIN)
    assert waterfall(store, W, Policy(), HardwareScope(node="n2")).busy_ms == 90 * MIN - MIN


def test_job_rollup_counts_distinct_gpus_and_gpu_seconds(store: Store) -> None:
    sql = ("SELECT tenant, job, length(groupUniqArrayArray(gpus)), sum(reported_ms), sum(mfu_ms) FROM "
           + rollups.rows(rollups.JOB, rollups.WINDOW_START, rollups.WINDOW_END, prefix="{db:Identifier}.",
                          where="tenant != ''")
           + " GROUP BY tenant, job ORDER BY tenant, job")
    assert [tuple(r) for r in store.rows(sql, W.params())] == [("acme", "j1", 1, 90 * MIN, 90 * MIN),
                                                                ("beta", "j2", 1, 90 * MIN, 90 * MIN)]


# --- health ----------------------------------------------------------------------------------------------


def test_health_changes_from_events_are_the_raw_samples_changes(store: Store) -> None:
    got = [(c.node, c.gpu_index, (c.time_ms - M) // MIN, c.previous, c.state)
           for c in health_events.health_changes(store, Window(M, M + 121 * MIN))]
    assert got == [
        ("n1", 1, 20, "ok", "degraded"), ("n1", 1, 21, "degraded", "ok"),  # the late report, and the sample after
        ("n2", 0, 40, "ok", "degraded"), ("n2", 0, 46, "degraded", "ok"),
        ("n1", 0, 61, "ok", "failing"), ("n1", 0, 64, "failing", "ok"),
        ("n2", 0, 70, "ok", "failing"), ("n2", 0, 71, "failing", "ok"),
        ("n1", 0, 90, "ok", "degraded"), ("n1", 0, 91, "degraded", "ok"),
    ]
    raw = store.rows(
        "SELECT node, gpu_index, intDiv(toUnixTimestamp64Milli(time) - {m:Int64}, 60000), toString(prev), "
        "toString(health) FROM (SELECT *, lagInFrame(health, 1, CAST('ok' AS Enum8('ok' = 0, 'degraded' = 1, "
        "'failing' = 2, 'unknown' = 3))) OVER (PARTITION BY cluster, node, gpu_uuid ORDER BY time "
        "ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS prev FROM {db:Identifier}.gpu_samples "
        "WHERE toUnixTimestamp64Milli(time) <= {m:Int64} + 121 * 60000) "
        "WHERE health != prev ORDER BY time, node", {"m": M})
    assert [tuple(r) for r in raw] == got
    # a window starting after the failure: the change back to ok still knows what it changed from
    later = [(c.node, (c.time_ms - M) // MIN, c.previous) for c in health_events.health_changes(
        store, Window(M + 64 * MIN, M + 65 * MIN))]
    assert later == [("n1", 64, "failing")]


def test_events_are_compact_and_late_samples_are_marked(store: Store) -> None:
    rows = {(n, str(c)): int(k) for n, c, k in store.rows(
        "SELECT node, change, count() FROM {db:Identifier}.gpu_health_events FINAL GROUP BY node, change")}
    # n1: its first sample (k = 1) per GPU, the four changes of GPU0, the late 11:20:30 report, and
    # k = 200 (a GPU's first sample to the block inserted twice); n2: its first (k = 61), two changes
    # (k = 70, 71) and the 30 late samples (k = 31..60). The second ingester read only duplicates.
    # The sample after the late report (k = 21, stored as `same`) is no event: readers take that GPU's
    # changes from its raw samples.
    assert rows == {("n1", "first"): 4, ("n1", "changed"): 4, ("n1", "late"): 1, ("n2", "first"): 1,
                    ("n2", "changed"): 2, ("n2", "late"): 30}


def test_xid_events_are_one_row_per_xid(store: Store) -> None:
    rows = store.rows("SELECT node, intDiv(toUnixTimestamp64Milli(time) - {m:Int64}, 60000), xid, position "
                      "FROM {db:Identifier}.gpu_xid_events FINAL ORDER BY time, node, position", {"m": M})
    assert [tuple(r) for r in rows] == [("n1", 61, 79, 1), ("n1", 62, 79, 1), ("n1", 62, 13, 2),
                                        ("n1", 63, 79, 1), ("n2", 70, 48, 1)]
    raw = store.rows("SELECT count() FROM {db:Identifier}.gpu_samples ARRAY JOIN xids")
    assert raw == [(5,)]


def test_health_rollup_worst_gpu_figures(store: Store) -> None:
    sql = ("SELECT node, gpu_index, sum(reported_ms), sum(failing_ms), sum(degraded_ms), sum(xid_events), "
           "arraySort(groupUniqArrayArray(reasons)), max(temp_max_c), max(ecc_corrected_max), "
           "toString(tupleElement(max(last), 2)), toString(max(worst)) FROM "
           + rollups.rows(rollups.HEALTH, rollups.WINDOW_START, rollups.WINDOW_END, prefix="{db:Identifier}.")
           + " GROUP BY node, gpu_index ORDER BY node, gpu_index")
    assert [tuple(r) for r in store.rows(sql, W.params())] == [
        ("n1", 0, 90 * MIN, 3 * MIN, MIN, 4, ["thermal_throttle", "xid_79"], None, 0, "ok", "failing"),
        ("n1", 1, 90 * MIN, 0, 0, 0, [], None, 5, "ok", "ok"),
        ("n2", 0, 90 * MIN, MIN, 6 * MIN, 1, ["temperature_high", "xid_48"], 90.0, 0, "ok", "failing"),
    ]
    raw = store.rows(
        "SELECT node, gpu_index, sum(interval_ms), sumIf(interval_ms, health = 'failing'), "
        "sumIf(interval_ms, health = 'degraded'), sum(length(xids)), arraySort(groupUniqArrayArray(health_reasons)), "
        "max(temp_gpu_c), max(ifNull(ecc_corrected_volatile, 0)), toString(argMax(health, time)), "
        "toString(max(health)) FROM {db:Identifier}.gpu_samples "
        "WHERE toUnixTimestamp64Milli(time) - interval_ms >= {w_start:Int64} "
        "AND toUnixTimestamp64Milli(time) - interval_ms < {w_end:Int64} GROUP BY node, gpu_index "
        "ORDER BY node, gpu_index", W.params())
    assert [tuple(r) for r in raw] == [tuple(r) for r in store.rows(sql, W.params())]


def test_node_latest_is_each_nodes_newest_report(store: Store) -> None:
    rows = store.rows("SELECT node, toUnixTimestamp64Milli(max(time)) FROM {db:Identifier}.node_latest "
                      "GROUP BY node ORDER BY node")
    assert [tuple(r) for r in rows] == [("n1", M + 120 * MIN), ("n2", M + 120 * MIN)]


def test_a_restarted_ingester_restates_without_changing_the_answer() -> None:
    """Pure: a fresh deriver marks its first sample of each GPU `first`, never `same`."""
    d = Deriver()
    assert derive([_n1(5), _n1(6)], d).changes == [2, 2, 0, 0]
    assert derive([_n1(4)], d).changes == [3, 3]  # older than k = 6: late
    assert derive([_n1(7)], Deriver()).changes == [2, 2]  # another ingester: restated, never `same`


@pytest.mark.parametrize(("levels", "sums"), [
    (rollups.FLEET, "sum(reported_ms), sum(energy_mj), sum(mfu_ms), sum(samples)"),
    (rollups.HEALTH, "sum(reported_ms), sum(failing_ms), sum(xid_events), max(temp_max_c)"),
    (rollups.JOB, "sum(reported_ms), sum(mfu_ms), length(groupUniqArrayArray(gpus))"),
])
def test_whole_hours_and_ragged_minutes_sum_to_the_minute_level(store: Store, levels: rollups.Levels,
                                                                 sums: str) -> None:
    for start, end in ((7, 113), (0, 120), (59, 61), (60, 61), (30, 90), (61, 119), (0, 240), (-60, 200)):
        window = Window(M + start * MIN, M + end * MIN)
        split = rollups.rows(levels, rollups.WINDOW_START, rollups.WINDOW_END, prefix="{db:Identifier}.")
        minutes = f"{{db:Identifier}}.{levels.minute_table} WHERE {window.sql()}"
        if levels is rollups.JOB:
            minutes += " AND tenant != '' AND job != ''"
            split = rollups.rows(levels, rollups.WINDOW_START, rollups.WINDOW_END, prefix="{db:Identifier}.",
                                 where="tenant != '' AND job != ''")
        minute_sums = sums.replace("groupUniqArrayArray(gpus)", "groupUniqArray(gpu_uuid)")
        assert store.rows(f"SELECT {sums} FROM {split}", window.params()) == \
            store.rows(f"SELECT {minute_sums} FROM {minutes}", window.params()), (start, end)
