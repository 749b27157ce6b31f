"""The stored usage rows (`usage_hourly_stored`, migration 0090) equal `usage_hourly` computed from the raw
rollups: after late data into an hour already stored, a retried (duplicate) insert, a batch repeated as
the ingester repeats it, and claims that change after an hour was stored; `refresh` recomputes only the
hours whose inputs changed; the ingester keeps them current. Every figure is counted by hand from the
samples' intervals.
"""

from __future__ import annotations

from typing import Any

from gpufleet import wire
from gpufleet.config import BillingConfig
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries import integrity
from gpufleet.pipeline.queries.policy import sync_policy
from gpufleet.pipeline.queries.usage import USAGE_COLUMNS, refresh, usage_rows
from gpufleet.pipeline.store import Store
from tests.builders import clock_at, gpu, report
from tests.pipeline.test_ingest import _cfg, _create, _produce, _run_until

H = 1_794_999_600_000  # 2026-11-18T11:00:00Z, a whole hour
HOUR = 3_600_000
S = 1000


def _second(i: int, node: str = "n1") -> Any:
    """Second i of hour H on `node`: GPU 0 for acme, GPU 1 for beta (each interval [H+i s, H+i+1 s))."""
    return report(node=node, seq=i, time_ms=H + (i + 1) * S,
                  gpus=[gpu(0, node, tenant="acme"), gpu(1, node, tenant="beta")])


def _raw(store: Store) -> list[dict[str, Any]]:
    """`usage_hourly` computed from the rollups now (the view), in usage_rows' form."""
    cols = ", ".join(USAGE_COLUMNS)
    rows = store.rows(f"SELECT {cols} FROM {{db:Identifier}}.usage_hourly ORDER BY hour, tenant, gpu_model")
    out = []
    for row in rows:
        d = dict(zip(USAGE_COLUMNS, row, strict=True))
        d["hour"] = d["hour"].strftime("%Y-%m-%dT%H:%M:%SZ")
        out.append(d)
    return out


def _billed(store: Store) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(hour, tenant) -> (allocated s, gap s, GPUs) of the stored rows (after a refresh)."""
    return {(r["hour"][11:16], r["tenant"]): (r["allocated_gpu_seconds"], r["gap_gpu_seconds"], r["gpus"])
            for r in usage_rows(store)}


def _stored_count(store: Store) -> int:
    """Row versions written to the stored table (before merges), tombstones included."""
    return int(store.rows("SELECT count() FROM {db:Identifier}.usage_hourly_stored")[0][0])


def test_late_data_into_a_stored_hour_recomputes_it_and_its_neighbours(ch_store) -> None:
    insert_reports(ch_store, [_second(i) for i in (0, 1, 2, 3, 4, 8, 9)], ingest_ms=H + 20_000)
    # Hours 09:00-13:00: every hour within two of 11:00 (claims reach that far) is checked and stored.
    assert refresh(ch_store) == [H + k * HOUR for k in range(-2, 3)]
    # Fleet span [H, H + 10 s): 7 s reported per GPU, seconds 5-7 silent: a 3 s gap each.
    assert _billed(ch_store) == {("11:00", "acme"): (7.0, 3.0, 1), ("11:00", "beta"): (7.0, 3.0, 1)}
    assert refresh(ch_store) == []  # nothing changed: nothing recomputed
    # Seconds 5 and 6 arrive an hour late (a spool replayed): the stored hour is recomputed.
    insert_reports(ch_store, [_second(5), _second(6)], ingest_ms=H + HOUR + 60_000)
    assert refresh(ch_store, H, H + HOUR) == [H]
    assert _billed(ch_store) == {("11:00", "acme"): (9.0, 1.0, 1), ("11:00", "beta"): (9.0, 1.0, 1)}
    assert usage_rows(ch_store) == _raw(ch_store)


def test_a_later_hour_moves_the_fleet_span_and_the_last_hours_gap_with_it(ch_store) -> None:
    insert_reports(ch_store, [_second(i) for i in range(10)], ingest_ms=H + 20_000)
    assert _billed(ch_store)[("11:00", "acme")] == (10.0, 0.0, 1)  # the span ends at H + 10 s: no gap
    # 13:00:00-13:00:01: the span now ends two hours later, so 11:00's expected coverage is the whole hour.
    insert_reports(ch_store, [report(seq=100, time_ms=H + 2 * HOUR + S, gpus=[gpu(0, tenant="acme")])],
                   ingest_ms=H + 2 * HOUR + 20_000)
    billed = _billed(ch_store)
    assert billed[("11:00", "acme")] == (10.0, 3590.0, 1)
    assert billed[("11:00", "beta")] == (10.0, 3590.0, 1)
    assert billed[("13:00", "acme")] == (1.0, 0.0, 1)
    assert usage_rows(ch_store) == _raw(ch_store)


def test_a_retried_insert_and_a_repeated_batch_change_nothing(ch_store) -> None:
    batch = [_second(i) for i in range(10)]
    insert_reports(ch_store, batch, ingest_ms=H + 20_000)
    before = usage_rows(ch_store)
    versions = _stored_count(ch_store)
    # The identical insert again (a client retry, or the ingester repeating the batch the ledger recorded
    # with the same insert tokens): ClickHouse keeps one copy, the inputs are unchanged, nothing recomputed.
    insert_reports(ch_store, batch, ingest_ms=H + 20_000)
    assert refresh(ch_store) == []
    assert usage_rows(ch_store) == before == _raw(ch_store)
    assert _stored_count(ch_store) == versions
    assert [(r["tenant"], r["billable_gpu_seconds"]) for r in before] == [("acme", 10.0), ("beta", 10.0)]


def test_a_claim_outranked_by_late_data_removes_its_tenants_stored_row(ch_store) -> None:
    shared = "GPU-shared"
    # n1 claims the shared GPU for acme over seconds 0-29 of minute 11:00.
    insert_reports(ch_store, [report(node="n1", seq=i, time_ms=H + (i + 1) * S,
                                     gpus=[gpu(0, "n1", uuid=shared, tenant="acme")]) for i in range(30)],
                   ingest_ms=H + 40_000)
    assert _billed(ch_store) == {("11:00", "acme"): (30.0, 0.0, 1)}
    # Late: n2 reports the same UUID for beta over seconds 0-59: 60 s outrank n1's 30 s in that minute,
    # so acme's claims are not billed and acme's stored row for 11:00 goes (a tombstone), beta's comes.
    insert_reports(ch_store, [report(node="n2", seq=i, time_ms=H + (i + 1) * S,
                                     gpus=[gpu(0, "n2", uuid=shared, tenant="beta")]) for i in range(60)],
                   ingest_ms=H + 70_000)
    assert _billed(ch_store) == {("11:00", "beta"): (60.0, 0.0, 1)}
    assert usage_rows(ch_store) == _raw(ch_store)
    deleted = ch_store.rows("SELECT tenant FROM {db:Identifier}.usage_hourly_stored FINAL "
                            "SETTINGS do_not_merge_across_partitions_select_final = 0")
    assert [t for (t,) in deleted] == ["beta"]


def test_a_policy_change_recomputes_every_stored_hour(ch_store) -> None:
    failing = [report(seq=i, time_ms=H + (i + 1) * S, gpus=[gpu(0, tenant="acme", xids=[79] if i < 4 else [])])
               for i in range(10)]
    insert_reports(ch_store, failing, ingest_ms=H + 20_000)
    assert [r["billable_gpu_seconds"] for r in usage_rows(ch_store)] == [6.0]  # 4 s failing: not billed
    sync_policy(ch_store, BillingConfig(exclude_states=()), now_ms=H + HOUR)
    assert refresh(ch_store) == [H + k * HOUR for k in range(-2, 3)]
    assert [r["billable_gpu_seconds"] for r in usage_rows(ch_store)] == [10.0]
    assert usage_rows(ch_store) == _raw(ch_store)


def test_the_ingester_stores_the_rows_of_the_hours_it_wrote(broker, ch_target, ch_store, topic) -> None:
    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    _produce(broker, topic, [(b"n1", wire.encode(_second(i))) for i in range(10)])
    ing = build_ingester(cfg, ch_store, clock=clock_at(H + HOUR))
    _run_until(ing, lambda: ing.stats.messages == 10)
    # Read as the billing board reads them: the stored rows only, no refresh by the reader.
    stored = ch_store.rows("SELECT hour, tenant, allocated_gpu_seconds, gap_gpu_seconds, gpus "
                           "FROM {db:Identifier}.usage_hourly_stored FINAL ORDER BY tenant")
    assert [(t, a, g, n) for _, t, a, g, n in stored] == [("acme", 10.0, 0.0, 1), ("beta", 10.0, 0.0, 1)]
    assert refresh(ch_store) == []  # the ingester left nothing to recompute


def test_stored_rows_that_missed_an_insert_are_a_finding_until_their_hours_are_marked_stale(ch_store) -> None:
    insert_reports(ch_store, [_second(i) for i in range(10)], ingest_ms=H + 20_000)
    refresh(ch_store)
    # What a refresh racing an insert would leave: acme's row from before seconds 8-9 arrived, marked current.
    ch_store.command("INSERT INTO {db:Identifier}.usage_hourly_stored (hour, tenant, gpu_model, gpus, "
                     "allocated_gpu_seconds, billable_gpu_seconds, billable_gpu_hours, version, is_deleted) "
                     "SELECT hour, tenant, gpu_model, 1, 8, 8, 8 / 3600, now64(9, 'UTC'), 0 "
                     "FROM {db:Identifier}.usage_hourly_stored FINAL WHERE tenant = 'acme'")
    found = [f.describe() for f in integrity.findings(ch_store, H, H + HOUR)]
    kwh = 300 * 10 / 3_600_000  # 300 W for 10 s
    assert found == [
        "stored usage vs usage_hourly: hour 2026-11-18T11:00:00Z: acme/NVIDIA H100 80GB HBM3: stored "
        f"(1, 8.0, 0.0, 8.0, {8 / 3600}, 0.0, 0.0, 0.0, 0.0), rollups "
        f"(1, 10.0, 0.0, 10.0, {10 / 3600}, 0.0, 0.0, {kwh}, 0.0) (gpus, allocated_gpu_seconds, "
        "unhealthy_gpu_seconds, billable_gpu_seconds, billable_gpu_hours, idle_allocated_gpu_hours, "
        "gap_gpu_seconds, energy_kwh, unknown_model_gpu_seconds)"]
    # The repair (docs/reliability.md): mark the hour stale; the next refresh recomputes it.
    ch_store.command("INSERT INTO {db:Identifier}.usage_hourly_marks (hour, inputs, version) "
                     "SELECT hour, 'stale', now64(9, 'UTC') FROM {db:Identifier}.usage_hourly_marks FINAL "
                     "WHERE hour = toDateTime(intDiv({h:Int64}, 1000), 'UTC')", {"h": H})
    assert integrity.findings(ch_store, H, H + HOUR) == []  # a stale hour is not claimed current
    assert refresh(ch_store) == [H]
    assert integrity.findings(ch_store, H, H + HOUR) == []
    assert _billed(ch_store)[("11:00", "acme")] == (10.0, 0.0, 1)


def test_usage_rows_read_hours_as_iso_text_and_non_finite_figures_as_none(ch_store) -> None:
    # a stored row written by hand for an hour no sample is near (its inputs and mark both empty: current)
    ch_store.command(
        "INSERT INTO {db:Identifier}.usage_hourly_stored (hour, tenant, gpu_model, gpus, allocated_gpu_seconds, "
        "billable_gpu_hours, energy_kwh, avg_utilization, mfu, mfu_source, measured_coverage, version) VALUES "
        "(toDateTime(1794999600, 'UTC'), 'acme', 'H100', 2, 7200.5, nan, inf, -inf, NULL, 'measured', 0.25, "
        "now64(9, 'UTC'))")
    assert usage_rows(ch_store, H, H + HOUR) == [{
        "hour": "2026-11-18T11:00:00Z", "tenant": "acme", "gpu_model": "H100", "gpus": 2,
        "allocated_gpu_seconds": 7200.5, "unhealthy_gpu_seconds": 0.0, "billable_gpu_seconds": 0.0,
        "billable_gpu_hours": None, "idle_allocated_gpu_hours": 0.0, "gap_gpu_seconds": 0.0, "energy_kwh": None,
        "avg_utilization": None, "mfu": None, "mfu_source": "measured", "measured_coverage": 0.25,
        "unknown_model_gpu_seconds": 0.0,
    }]


def test_the_floats_usage_rows_reads_as_null_when_not_finite_are_the_stored_tables_float_columns(ch_store) -> None:
    # usage._FLOATS restates migration 0090's Float64 columns: a float column added there and not here would
    # reach callers as nan/inf instead of None
    from gpufleet.pipeline.queries import usage

    floats = {name for name, kind in ch_store.rows(
        "SELECT name, type FROM system.columns WHERE database = {database:String} AND table = 'usage_hourly_stored'",
        {"database": ch_store.database}) if "Float" in kind and name in USAGE_COLUMNS}
    assert floats == usage._FLOATS
