"""Fleet health now (by state, reason, node; silent GPUs unknown) and per-minute history, by hand."""

from __future__ import annotations

from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries.fleet_health import classify_now, current_health, health_history
from gpufleet.pipeline.queries.window import Window
from gpufleet.pipeline.store import Store
from tests.builders import gpu, report

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z


def test_current_health_by_state_reason_and_node(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    n1 = [report("n1", seq=i, time_ms=M + (i + 1) * 1000, gpus=[
        gpu(0, "n1"),
        gpu(1, "n1", clock_event_reasons=0x20 if i == 9 else 0),  # degraded in its latest sample only
        gpu(2, "n1", xids=[79] if i == 9 else [], ecc_uncorrected_volatile=1 if i == 9 else 0),  # failing now
    ]) for i in range(10)]
    # n2's last sample ended 38 s before `now` (silent_after_s is 30): both its GPUs are unknown
    n2 = [report("n2", seq=i, time_ms=M + (i + 1) * 1000, gpus=[gpu(0, "n2"), gpu(1, "n2", xids=[79])])
          for i in range(2)]
    insert_reports(store, [*n1, *n2], ingest_ms=M + 20_000)
    # an old sample of n1/0 arriving late must not replace its newer state
    late = report("n1", seq=99, time_ms=M + 500, gpus=[gpu(0, "n1", xids=[48])])
    insert_reports(store, [late], ingest_ms=M + 30_000)

    now = current_health(store, now_ms=M + 40_000, silent_after_s=30)
    assert now.by_state == {"ok": 1, "degraded": 1, "failing": 1, "unknown": 2}
    assert now.by_reason == {"ecc_dbe": 1, "silent": 2, "thermal_throttle": 1, "xid_79": 1}
    assert now.by_node == {
        "c1/n1": {"ok": 1, "degraded": 1, "failing": 1, "unknown": 0},
        "c1/n2": {"ok": 0, "degraded": 0, "failing": 0, "unknown": 2},
    }
    # 1 ms later n1 is silent too (its last sample ended at M + 10 s)
    assert current_health(store, now_ms=M + 40_001, silent_after_s=30).by_state["unknown"] == 5


def test_classify_now_boundary_is_inclusive_of_silent_after() -> None:
    latest = [("g0", "c", "n", "ok", [], 1_000)]
    assert classify_now(latest, now_ms=31_000, silent_after_s=30).by_state["ok"] == 1
    assert classify_now(latest, now_ms=31_001, silent_after_s=30).by_state["unknown"] == 1


def test_history_per_minute(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    reports = []
    for i in range(12):  # two minutes at 10 s intervals; node n1, GPUs 0 and 1
        gpus = [gpu(0, xids=[79] if i == 8 else [])]  # minute 2 has one failing sample: worst wins
        if i < 6:
            gpus.append(gpu(1, clock_event_reasons=0x40))  # degraded in minute 1, then silent
        reports.append(report(seq=i, time_ms=M + (i + 1) * 10_000, interval_ms=10_000, gpus=gpus))
    insert_reports(store, reports, ingest_ms=M + 200_000)
    history = health_history(store, Window.covering(M, M + 180_000))
    assert [h.minute_ms for h in history] == [M, M + 60_000, M + 120_000]
    assert [h.counts for h in history] == [
        {"ok": 1, "degraded": 1, "failing": 0, "unknown": 0},
        {"ok": 0, "degraded": 0, "failing": 1, "unknown": 1},
        {"ok": 0, "degraded": 0, "failing": 0, "unknown": 2},  # nobody reported in the third minute
    ]
