"""The health board's per-GPU fleet panels draw a bounded set of GPUs, picked exactly, by hand.

`fragments.top_gpus` picks the GPUs not ok the longest within the range (not within the hours it
touches), ties by cluster, node and GPU UUID; the not-ok timeline draws those GPUs only. Worst GPUs
ranks every GPU of the range (its shares need each GPU's reported time): its order, ties by UUID.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from gpufleet.dashboards import fragments
from gpufleet.dashboards.macros import TimeRange, render
from gpufleet.dashboards.queries import panel_range, resolve_variables, run
from gpufleet.gpu_facts import THROTTLE_SW_THERMAL
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries import rollups
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from tests.builders import gpu, report
from tests.dashboards.conftest import board_answers, board_client, committed

B = 1_794_996_000_000  # 2026-11-18T10:00:00Z, an hour boundary
MIN = 60_000
TIMELINE = f"Health timeline of the {fragments.TOP_GPUS} GPUs not ok the longest"

# node -> GPU index -> (state, first minute, last minute + 1) from B: thermal throttling degrades, a link down fails
NOT_OK: dict[str, dict[int, tuple[str, int, int]]] = {
    "n1": {
        0: ("degraded", 60, 80),    # P: 11:00-11:20, 20 min in a whole hour
        1: ("degraded", 90, 95),    # T: 11:30-11:35, 5 min
        2: ("failing", 120, 130),   # Q: 12:00-12:10, 10 min
        3: ("degraded", 160, 175),  # R: 12:40-12:55, 15 min
        4: ("degraded", 0, 12),     # S: 10:00-10:12, 12 min
        5: ("degraded", 120, 123),  # U: 12:00-12:03, 3 min
        6: ("degraded", 95, 100),   # W: 11:35-11:40, 5 min
    },
    "n2": {0: ("degraded", 100, 105)},  # V: 11:40-11:45, 5 min
}
MINUTES = 180  # every GPU reports every minute 10:00-13:00


def _load(target: Target, client: Any) -> None:
    def sample(node: str, index: int, minute: int) -> Any:
        state, first, end = NOT_OK[node][index]
        bad = first <= minute < end
        return gpu(index, node, clock_event_reasons=THROTTLE_SW_THERMAL if bad and state == "degraded" else 0,
                   nvlink_links_down=1 if bad and state == "failing" else 0)

    reports = [report(node, seq=m, time_ms=B + (m + 1) * MIN, interval_ms=MIN,
                      gpus=[sample(node, i, m) for i in sorted(gpus)])
               for node, gpus in NOT_OK.items() for m in range(MINUTES)]
    insert_reports(Store(client, target.database), reports, ingest_ms=B + (MINUTES + 5) * MIN)


def _render(client: Any, sql: str, start: int, end: int) -> str:
    board = committed("gpufleet-health")
    return render(sql, resolve_variables(client, board, TimeRange(start, end, MIN)), panel_range(start, end, "1m"))


def _picked(target: Target, start: int, end: int) -> list[str]:
    """The GPUs `top_gpus` picks over [start, end] (ms, Grafana's inclusive end), as node/index."""
    client = board_client(target)
    cond = fragments.top_gpus(rollups.HEALTH, ("failing_ms", "degraded_ms"))
    sql = f"SELECT DISTINCT concat(node, '/', toString(gpu_index)) AS g FROM gpu_health_1m WHERE {cond} ORDER BY g"
    return [r[0] for r in run(client, _render(client, sql, start, end)).rows]


def _at(minute: int) -> int:
    return B + minute * MIN


def test_the_longest_not_ok_within_the_range_not_within_the_hours_it_touches(
        ch_target: Target, ch_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _load(ch_target, ch_client)
    monkeypatch.setattr(fragments, "TOP_GPUS", 2)
    # [10:30, 12:30): P 20 min (the whole hour 11), Q 10 (12:00-12:10, a ragged end), T, W and V 5, U 3; R (12:40)
    # and S (10:00-10:12) were not ok longer than Q but only in the hours the range cuts, outside it
    assert _picked(ch_target, _at(30), _at(150) - 1000) == ["n1/0", "n1/2"]
    # [10:00, 13:00): R 15 and S 12 are in it now; P 20 first, R second
    assert _picked(ch_target, _at(0), _at(180) - 1000) == ["n1/0", "n1/3"]
    # [12:05, 12:59): Q 5 min (12:05-12:10), R 15; U's 3 minutes are before the range
    assert _picked(ch_target, _at(125), _at(179) - 1000) == ["n1/2", "n1/3"]
    # a range with no GPU not ok picks none
    assert _picked(ch_target, _at(20), _at(60) - 1000) == []


def test_ties_by_cluster_node_and_uuid(ch_target: Target, ch_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _load(ch_target, ch_client)
    # [11:25, 11:50): T (GPU-n1-1), W (GPU-n1-6) and V (GPU-n2-0) each 5 min: n1 before n2, GPU-n1-1 before GPU-n1-6
    monkeypatch.setattr(fragments, "TOP_GPUS", 1)
    assert _picked(ch_target, _at(85), _at(110) - 1000) == ["n1/1"]
    monkeypatch.setattr(fragments, "TOP_GPUS", 2)
    assert _picked(ch_target, _at(85), _at(110) - 1000) == ["n1/1", "n1/6"]
    monkeypatch.setattr(fragments, "TOP_GPUS", 3)
    assert _picked(ch_target, _at(85), _at(110) - 1000) == ["n1/1", "n1/6", "n2/0"]
    # the same with whole hours in the range: [10:30, 12:30) has P 20, Q 10, then the three 5-minute GPUs
    assert _picked(ch_target, _at(30), _at(150) - 1000) == ["n1/0", "n1/1", "n1/2"]


def _answers(target: Target, start: int, end: int) -> dict[str, list[Any]]:
    return board_answers(target, "gpufleet-health", start, end, MIN)


def _m(minute: int) -> datetime:
    return datetime(2026, 11, 18, 10) + timedelta(minutes=minute)  # naive UTC, as the client returns it


def test_the_timeline_draws_the_picked_gpus(ch_target: Target, ch_client: Any) -> None:
    _load(ch_target, ch_client)
    got = _answers(ch_target, _at(30), _at(150) - 1000)
    # every GPU not ok in [10:30, 12:30) (fewer than TOP_GPUS): its first minute, then each change of state
    assert got[TIMELINE] == [
        (_m(30), "n1 / GPU 0", 0), (_m(30), "n1 / GPU 1", 0), (_m(30), "n1 / GPU 2", 0), (_m(30), "n1 / GPU 5", 0),
        (_m(30), "n1 / GPU 6", 0), (_m(30), "n2 / GPU 0", 0),
        (_m(60), "n1 / GPU 0", 1), (_m(80), "n1 / GPU 0", 0),
        (_m(90), "n1 / GPU 1", 1), (_m(95), "n1 / GPU 1", 0), (_m(95), "n1 / GPU 6", 1),
        (_m(100), "n1 / GPU 6", 0), (_m(100), "n2 / GPU 0", 1), (_m(105), "n2 / GPU 0", 0),
        (_m(120), "n1 / GPU 2", 2), (_m(120), "n1 / GPU 5", 1), (_m(123), "n1 / GPU 5", 0),
        (_m(130), "n1 / GPU 2", 0),
    ]


def test_worst_gpus_order(ch_target: Target, ch_client: Any) -> None:
    _load(ch_target, ch_client)
    got = _answers(ch_target, _at(30), _at(150) - 1000)["Worst GPUs"]
    # (node, gpu, failing share, degraded share) of 120 reported minutes each; ok GPUs (R, S) by UUID last
    assert [(r[2], r[3], r[6], r[7]) for r in got] == [
        ("n1", 2, 10 / 120, 0.0), ("n1", 0, 0.0, 20 / 120), ("n1", 1, 0.0, 5 / 120), ("n1", 6, 0.0, 5 / 120),
        ("n2", 0, 0.0, 5 / 120), ("n1", 5, 0.0, 3 / 120), ("n1", 3, 0.0, 0.0), ("n1", 4, 0.0, 0.0),
    ]
