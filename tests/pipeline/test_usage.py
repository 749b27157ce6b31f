"""usage_hourly on hand-built samples: every column by hand, SLA policy, duplicates, late data,
reordering, gaps, and the `gpufleet usage` command's output."""

from __future__ import annotations

import csv
import io
import json
import random
import uuid

import pytest
from click.testing import CliRunner

from gpufleet.config import BillingConfig
from gpufleet.pipeline.commands.usage import usage as usage_cmd
from gpufleet.pipeline.ingest import dedup
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries.policy import Policy, read_policy, sync_policy
from gpufleet.pipeline.queries.status import fleet_summary
from gpufleet.pipeline.queries.usage import USAGE_COLUMNS, usage_rows
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import H100, gpu, report

H = 1_794_999_600_000  # 2026-11-18T11:00:00Z, a whole hour
HOUR = 3_600_000
IDLE_UTIL = 0.03125  # 1/32: exact in Float32, 3 % (< the default 5 % idle threshold)


def _gpus(i: int) -> list:
    """Second i of the hour (interval [H+i s, H+i+1 s)), four GPUs on node n1."""
    out = [
        # acme, job j1: busy, job-measured FLOPs (0.5 x peak), 300 W
        gpu(0, tenant="acme", job="j1", flops_measured=0.5 * 989e12),
        # acme, job j2: XID 79 (failing) for seconds 0-2, busy 3-4, idle (3 % utilization) 5-9
        gpu(1, tenant="acme", job="j2", xids=[79] if i < 3 else [], util_gpu_ratio=IDLE_UTIL if i >= 5 else 0.5),
        # unallocated
        gpu(2),
    ]
    if i < 5 or i >= 8:  # beta's GPU is silent for seconds 5, 6, 7: a 3 s gap
        out.append(gpu(3, tenant="beta", job="b1"))
    return out


def _reports(seconds: range = range(10)) -> list:
    return [report(seq=i, time_ms=H + (i + 1) * 1000, gpus=_gpus(i)) for i in seconds]


def _by_tenant(rows: list[dict]) -> dict[str, dict]:
    return {r["tenant"]: r for r in rows}


def test_every_column_by_hand(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    insert_reports(store, _reports(), ingest_ms=H + 20_000)
    rows = usage_rows(store)
    assert [r["tenant"] for r in rows] == ["acme", "beta"]  # unallocated time is not usage
    acme, beta = _by_tenant(rows)["acme"], _by_tenant(rows)["beta"]
    assert list(acme) == list(USAGE_COLUMNS)

    assert acme["hour"] == "2026-11-18T11:00:00Z"
    assert acme["gpu_model"] == H100
    assert acme["gpus"] == 2
    assert acme["allocated_gpu_seconds"] == 20.0  # 2 GPUs x 10 s
    assert acme["unhealthy_gpu_seconds"] == 3.0  # GPU 1, seconds 0-2 (failing; the default policy)
    assert acme["billable_gpu_seconds"] == 17.0
    assert acme["billable_gpu_hours"] == 17 / 3600
    assert acme["idle_allocated_gpu_hours"] == 5 / 3600  # GPU 1, seconds 5-9 at 3 %
    assert acme["gap_gpu_seconds"] == 0.0
    assert acme["energy_kwh"] == 20 * 300 / 3_600_000  # 20 samples x 300 W x 1 s, in kWh
    # utilization weighted by time: 10 s at 0.5 (GPU 0) + 5 s at 0.5 + 5 s at 1/32 (GPU 1)
    assert acme["avg_utilization"] == (15 * 0.5 + 5 * IDLE_UTIL) / 20
    # MFU: GPU 0 measured 0.5 x peak, GPU 1 estimated 0.25 (tensor activity) x peak, equal peaks
    assert acme["mfu"] == pytest.approx((0.5 + 0.25) / 2, rel=1e-12)
    assert acme["mfu_source"] == "mixed"
    assert acme["measured_coverage"] == 0.5
    assert acme["unknown_model_gpu_seconds"] == 0.0

    assert beta["gpus"] == 1
    assert beta["allocated_gpu_seconds"] == 7.0
    assert beta["billable_gpu_hours"] == 7 / 3600
    assert beta["gap_gpu_seconds"] == 3.0  # the fleet reported for 10 s; GPU 3 for 7 of them
    assert beta["idle_allocated_gpu_hours"] == 0.0
    assert beta["mfu"] == pytest.approx(0.25, rel=1e-12)
    assert beta["mfu_source"] == "estimated"
    assert beta["measured_coverage"] == 0.0


def test_energy_is_the_sum_of_the_counter_deltas(ch_target, ch_client) -> None:
    """The agent's per-interval energy (counter growth) is billed, not power at the read x the interval."""
    db = ch_target.database
    # a bursty job at 10 s intervals: NVML's 1 s power average at each read says 100 W (the job idles
    # just then), while the energy counter grew by these exact mJ over each interval
    deltas_mj = [5_123_457, 5_000_001, 123, 6_999_999]
    reports = [report(seq=i, time_ms=H + (i + 1) * 10_000, interval_ms=10_000, gpus=[
        gpu(0, tenant="acme", power_w=100.0, energy_interval_j=deltas_mj[i] / 1000),
        gpu(1, tenant="acme", power_w=250.0),  # an agent without the counter: power x interval, 2.5 kJ each
    ]) for i in range(4)]
    store = Store(ch_client, db)
    insert_reports(store, reports, ingest_ms=H + 60_000)
    (acme,) = usage_rows(store)
    expected_mj = sum(deltas_mj) + 4 * 250 * 10_000  # 17,123,580 mJ counted + 10,000,000 mJ estimated
    assert acme["energy_kwh"] == expected_mj / 3_600_000_000
    minute_mj = ch_client.query(f"SELECT sum(energy_mj) FROM {db}.gpu_usage_1m WHERE gpu_uuid = 'GPU-n1-0'")
    assert minute_mj.result_rows == [(17_123_580,)]


def test_sla_policy_is_applied_from_config(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    assert read_policy(store) == Policy(("failing",), 5)  # shipped default
    reports = [report(seq=i, time_ms=H + (i + 1) * 1000, gpus=[
        gpu(0, tenant="acme", xids=[79] if i < 2 else []),  # failing 2 s
        gpu(1, tenant="acme", clock_event_reasons=0x20 if i < 4 else 0),  # degraded (thermal) 4 s
    ]) for i in range(10)]
    insert_reports(store, reports, ingest_ms=H + 20_000)

    def billable() -> tuple[float, float]:
        row = usage_rows(store)[0]
        return row["unhealthy_gpu_seconds"], row["billable_gpu_seconds"]

    assert billable() == (2.0, 18.0)
    sync_policy(store, BillingConfig(exclude_states=("failing", "degraded")), now_ms=H + 30_000)
    assert billable() == (6.0, 14.0)
    sync_policy(store, BillingConfig(exclude_states=()), now_ms=H + 40_000)
    assert billable() == (0.0, 20.0)


def test_idle_threshold_is_applied_at_query_time(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    reports = [report(seq=i, time_ms=H + (i + 1) * 1000, gpus=[
        gpu(0, tenant="acme", util_gpu_ratio=[0.0, 0.04, 0.05, 0.09, 0.10, 0.5][i % 6]),
        gpu(1, tenant="acme", compute_processes=0 if i < 3 else 1),  # held, no process: idle 3 s
    ]) for i in range(6)]
    insert_reports(store, reports, ingest_ms=H + 20_000)
    # default 5 %: 0.0 and 0.04 are idle (2 s), plus 3 s without a process
    assert usage_rows(store)[0]["idle_allocated_gpu_hours"] == 5 / 3600
    sync_policy(store, BillingConfig(idle_util_ratio=0.10), now_ms=H + 30_000)
    # 10 %: 0.0, 0.04, 0.05, 0.09 are idle (4 s), plus 3 s without a process
    assert usage_rows(store)[0]["idle_allocated_gpu_hours"] == 7 / 3600


def test_duplicates_change_no_billed_second(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    reports = _reports()
    insert_reports(store, reports, ingest_ms=H + 20_000)
    before = usage_rows(store)
    # Redelivery and agent spool replay: the ingester's dedup path drops every message already stored.
    replay = [*reports, *reports[3:6]]
    unique, dropped_in_batch = dedup.unique_in_batch(replay)
    stored = dedup.already_stored(store, unique, H + 30_000)  # a later batch's lookup
    fresh = [r for r in unique if dedup.identity(r) not in stored]
    assert (dropped_in_batch, len(stored), fresh) == (3, 10, [])
    # A client retrying the identical insert: ClickHouse drops the block at the source and at every rollup.
    insert_reports(store, reports, ingest_ms=H + 20_000)
    assert ch_client.query(f"SELECT count() FROM {db}.gpu_samples").result_rows[0][0] == 37
    assert usage_rows(store) == before


def test_late_sample_updates_its_own_hour(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    insert_reports(store, _reports(range(5)), ingest_ms=H + 10_000)
    later = [report(seq=100 + i, time_ms=H + 3 * HOUR + (i + 1) * 1000, gpus=[gpu(0, tenant="acme")])
             for i in range(4)]
    insert_reports(store, later, ingest_ms=H + 3 * HOUR + 10_000)
    # Second 7 of hour H arrives three hours late (a spool replayed after a network cut).
    insert_reports(store, _reports(range(7, 8)), ingest_ms=H + 3 * HOUR + 60_000)
    rows = {(r["hour"], r["tenant"]): r for r in usage_rows(store)}
    # acme in hour H: GPUs 0 and 1 for seconds 0-4 and 7 = 12 s, of which 3 s failing (GPU 1, 0-2)
    assert rows[("2026-11-18T11:00:00Z", "acme")]["allocated_gpu_seconds"] == 12.0
    assert rows[("2026-11-18T11:00:00Z", "acme")]["billable_gpu_seconds"] == 9.0
    assert rows[("2026-11-18T14:00:00Z", "acme")]["allocated_gpu_seconds"] == 4.0


def test_reordering_changes_nothing(ch_store, ch_client) -> None:
    other = Store(ch_client, f"t_{uuid.uuid4().hex[:12]}")
    migrate(ch_client, SchemaOptions(database=other.database))
    try:
        reports = _reports()
        insert_reports(ch_store, reports, ingest_ms=H + 20_000)
        shuffled = reports[:]
        random.Random(7).shuffle(shuffled)
        for n, r in enumerate(shuffled):  # one message per insert, in shuffled order
            insert_reports(other, [r], ingest_ms=H + 20_000 + n)
        assert usage_rows(other) == usage_rows(ch_store)
    finally:
        ch_client.command(f"DROP DATABASE IF EXISTS {other.database} SYNC")


def test_gaps_are_counted_not_billed_and_charged_to_the_main_tenant(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    reports = []
    for i in range(60):  # one minute; interval [H + i s, H + i + 1 s)
        gpus = [gpu(0, tenant="acme")]  # reports throughout: sets the fleet's reporting span to 60 s
        if i < 10:
            gpus.append(gpu(1, tenant="beta"))  # 10 s for beta ...
        elif 10 <= i < 40:
            gpus.append(gpu(1, tenant="acme"))  # ... then 30 s for acme, then silent for 20 s
        reports.append(report(seq=i, time_ms=H + (i + 1) * 1000, gpus=gpus))
    insert_reports(store, reports, ingest_ms=H + 70_000)
    rows = _by_tenant(usage_rows(store))
    assert rows["acme"]["allocated_gpu_seconds"] == 90.0  # 60 s (GPU 0) + 30 s (GPU 1)
    assert rows["acme"]["billable_gpu_seconds"] == 90.0  # the gap is not billed
    assert rows["acme"]["gap_gpu_seconds"] == 20.0  # GPU 1's gap goes to acme, its main tenant this hour
    assert rows["beta"]["allocated_gpu_seconds"] == 10.0
    assert rows["beta"]["gap_gpu_seconds"] == 0.0


def test_window_filters_by_hour_and_tenant(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    insert_reports(store, _reports(), ingest_ms=H + 20_000)
    nxt = [report(seq=50, time_ms=H + HOUR + 1000, gpus=[gpu(0, tenant="acme")])]
    insert_reports(store, nxt, ingest_ms=H + HOUR + 5000)
    assert [r["hour"] for r in usage_rows(store, tenant="acme")] == [
        "2026-11-18T11:00:00Z", "2026-11-18T12:00:00Z"]
    # from is rounded down to its hour; to is exclusive
    assert [(r["hour"], r["tenant"]) for r in usage_rows(store, H + 1_800_000, H + HOUR)] == [
        ("2026-11-18T11:00:00Z", "acme"), ("2026-11-18T11:00:00Z", "beta")]
    assert [r["hour"] for r in usage_rows(store, H + HOUR, H + 2 * HOUR)] == ["2026-11-18T12:00:00Z"]


def test_fleet_summary_for_status(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    insert_reports(store, _reports(), ingest_ms=H + 20_000)
    doc = fleet_summary(store, now_ms=H + 15_000, window_s=600)
    # fleet: GPU0 0.5 x 10 s, GPUs 1-2 0.25 x 10 s, GPU3 0.25 x 7 s, all H100: (5 + 2.5 + 2.5 + 1.75) / 37
    assert doc["fleet_mfu"] == pytest.approx(11.75 / 37, rel=1e-12)
    assert doc["fleet_mfu_allocated"] == pytest.approx(9.25 / 27, rel=1e-12)
    assert doc["mfu"] == {"acme": pytest.approx(0.375, rel=1e-12), "beta": pytest.approx(0.25, rel=1e-12)}
    # share of *allocated* GPU-seconds with measured FLOPs: GPU 0 (10 s) of GPUs 0, 1 and 3 (10 + 10 + 7 s)
    assert doc["mfu_measured_coverage"] == 10 / 27
    assert doc["billable_gpu_hours_by_tenant"] == {"acme": 17 / 3600, "beta": 7 / 3600}
    assert doc["billable_gpu_hours"] == 17 / 3600 + 7 / 3600
    # latest samples (second 9) are all healthy and 5 s old (< silent_after_s 30 s)
    assert doc["health"] == {"ok": 4, "degraded": 0, "failing": 0, "unknown": 0}


def test_usage_command_json_and_csv_use_the_view_columns(ch_target, ch_client, monkeypatch) -> None:
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    db = ch_target.database
    store = Store(ch_client, db)
    insert_reports(store, _reports(), ingest_ms=H + 20_000)
    target = ["--dsn", ch_target.dsn, "--database", db]
    out = CliRunner().invoke(usage_cmd, ["--format", "json", "--tenant", "beta", *target])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [list(r) for r in rows] == [list(USAGE_COLUMNS)]
    assert rows[0]["billable_gpu_hours"] == 7 / 3600
    out = CliRunner().invoke(usage_cmd, ["--format", "csv", "--from", "2026-11-18T11:00Z", "--to", "2026-11-18T12:00",
                                         *target])
    assert out.exit_code == 0, out.output
    table = list(csv.DictReader(io.StringIO(out.output)))
    assert [r["tenant"] for r in table] == ["acme", "beta"]
    assert tuple(table[0]) == USAGE_COLUMNS
    out = CliRunner().invoke(usage_cmd, ["--format", "table", *target])
    assert out.exit_code == 0, out.output
    assert "acme" in out.output
    assert "beta" in out.output
    out = CliRunner().invoke(usage_cmd, ["--from", "yesterday", *target])
    assert out.exit_code == 2
    assert "not a date or time" in out.output


FAILING_FAULTS = {"fell_off_bus", "ecc_dbe", "row_remap_failure", "nvlink_errors", "needs_reset", "needs_reboot"}
"""Simulated faults whose GPU is failing for their whole window: lost, volatile DBE, remap failure, link down,
a recovery action that needs a reset or a reboot."""
UNREPORTED_FAULTS = {"gpu_missing"}
"""Simulated faults during which the GPU is not enumerated: no sample, nothing billed."""


def test_simulated_fleet_bills_its_allocations_minus_silence_and_failures(ch_target, ch_client) -> None:
    from gpufleet.agents.simulation.faults import default_faults
    from gpufleet.agents.simulation.fleet import SimulatedFleet
    from gpufleet.agents.simulation.reports import simulate_reports
    from gpufleet.agents.simulation.truth import ground_truth
    from gpufleet.pipeline.ingest.rows import Deriver

    db, start = ch_target.database, H + 600_000

    store = Store(ch_client, db)
    end = start + 120_000
    fleet = SimulatedFleet(nodes=4, gpus_per_node=8, start_ms=start, faults=default_faults(start, nodes=4))
    reports = list(simulate_reports(fleet, start, end, 1000))
    deriver = Deriver()  # one ingester: counter-growth rules see each GPU's previous sample
    for i in range(0, len(reports), 100):
        insert_reports(store, reports[i:i + 100], ingest_ms=end, deriver=deriver)
    truth = ground_truth(fleet, start, end)

    def inside(t: int, f: dict) -> bool:
        return f["start_ms"] <= t < f["end_ms"]

    allocated: dict[str, int] = {}
    unhealthy: dict[str, int] = {}
    for t in range(start + 1000, end + 1, 1000):  # each sample's time; it belongs to the allocation holding t
        for a in truth["allocations"]:
            if not inside(t, a) or any(f["kind"] == "node_silent" and f["node"] == a["node"] and inside(t, f)
                                       for f in truth["faults"]):
                continue
            if any(f["kind"] in UNREPORTED_FAULTS and f["uuid"] == a["uuid"] and inside(t, f) for f in truth["faults"]):
                continue
            allocated[a["tenant"]] = allocated.get(a["tenant"], 0) + 1
            if any(f["kind"] in FAILING_FAULTS and f["uuid"] == a["uuid"] and inside(t, f) for f in truth["faults"]):
                unhealthy[a["tenant"]] = unhealthy.get(a["tenant"], 0) + 1
    rows = usage_rows(store)
    assert {r["tenant"]: r["allocated_gpu_seconds"] for r in rows} == allocated
    assert {r["tenant"]: r["billable_gpu_seconds"] for r in rows} == {
        t: s - unhealthy.get(t, 0) for t, s in allocated.items()}
    assert sum(unhealthy.values()) > 0  # the fleet's failures did hit allocated GPUs
