"""stall_candidates_1h (migration 0108) on hand-built samples: each row's extremes by hand, which rows may hold a
stall-like sample (`job_signals.candidate_rows`), and the same rows after a replay and a late sample."""

from __future__ import annotations

from typing import Any

import pytest

from gpufleet.config import StallConfig
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries import job_signals
from gpufleet.pipeline.store import Store
from tests.builders import gpu, report

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z
JOB: dict[str, Any] = {"tenant": "t", "job": "j", "compute_processes": 1}
STALL_LIKE: dict[str, Any] = {"util_gpu_ratio": 0.95, "tensor_active_ratio": 0.01, "power_w": 100.0}
"""Under the default thresholds: utilization >= 0.9, tensor <= 0.05, power <= 0.3 x 700 W (H100), no FLOPs sent."""


def _gpus(i: int) -> list:
    """Interval i (of five, 10 s each, ending at M + 10 s ... M + 50 s: all in hour M) of node n1's GPUs."""
    return [
        gpu(0, **JOB, **(STALL_LIKE if i == 2 else {})),  # one stall-like sample
        # never stall-like, but each figure reaches its threshold in some sample: the minute's extremes pass
        gpu(1, **JOB, util_gpu_ratio=0.95 if i == 0 else 0.5, tensor_active_ratio=0.01 if i == 1 else 0.25,
            power_w=100.0 if i == 2 else 300.0),
        gpu(2, **JOB),  # busy: utilization 0.5, tensor 0.25, 300 W throughout
        gpu(3, tenant="", **STALL_LIKE),  # stall-like but unallocated: no job, no row
    ]


def _reports() -> list:
    return [report(seq=i, time_ms=M + (i + 1) * 10_000, interval_ms=10_000, gpus=_gpus(i)) for i in range(5)]


@pytest.fixture
def store(ch_store: Store) -> Store:
    insert_reports(ch_store, _reports(), ingest_ms=M + 70_000)
    return ch_store


def _rows(store: Store) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in store.rows(
        "SELECT gpu_uuid, tenant, job, round(toFloat64(max(util_max)), 4), "
        "round(toFloat64(min(tensor_min)), 4), min(power_min), "
        "sum(flops_unreported) > 0, min(sm_untensored_min), min(flops_ratio_min) "
        "FROM {db:Identifier}.stall_candidates_1h WHERE hour = toDateTime({m:Int64} / 1000, 'UTC') "
        "GROUP BY gpu_uuid, tenant, job ORDER BY gpu_uuid", {"m": M})]


def _candidates(store: Store) -> list[str]:
    terms = job_signals.stall_literal(StallConfig())
    return [str(g) for (g,) in store.rows(
        "SELECT DISTINCT gpu_uuid FROM {db:Identifier}.stall_candidates_1h "
        f"WHERE {job_signals.candidate_rows(terms)} ORDER BY gpu_uuid", {})]


EXPECTED = [
    # GPU, tenant, job, max utilization, min tensor, min power, a sample without FLOPs, SM (no tensor), FLOPs ratio
    ("GPU-n1-0", "t", "j", 0.95, 0.01, 100.0, True, None, None),
    ("GPU-n1-1", "t", "j", 0.95, 0.01, 100.0, True, None, None),
    ("GPU-n1-2", "t", "j", 0.5, 0.25, 300.0, True, None, None),
]


def test_each_rows_extremes_by_hand(store: Store) -> None:
    assert _rows(store) == EXPECTED


def test_rows_that_may_hold_a_stall_like_sample(store: Store) -> None:
    # GPU 0 holds one; GPU 1 holds none but its hour's extremes pass (a candidate is a superset: its raw samples are
    # read and judged, never counted unread); GPU 2 never reaches utilization 0.9 nor 210 W
    assert _candidates(store) == ["GPU-n1-0", "GPU-n1-1"]
    # thresholds that GPU 1's extremes miss (power at or below 0.1 x 700 W): no candidate
    strict = job_signals.stall_literal(StallConfig(power_below_ratio=0.1))
    assert store.rows("SELECT count() FROM {db:Identifier}.stall_candidates_1h "
                      f"WHERE {job_signals.candidate_rows(strict)}", {}) == [(0,)]


def test_a_replay_changes_no_row_and_a_late_sample_widens_its_own(store: Store) -> None:
    insert_reports(store, _reports(), ingest_ms=M + 80_000)  # the same samples again (a replay)
    assert _rows(store) == EXPECTED
    assert _candidates(store) == ["GPU-n1-0", "GPU-n1-1"]
    # a late stall-like sample of GPU 2 in hour M (ending at M + 55 s): its row's extremes widen to it
    late = report(seq=9, time_ms=M + 55_000, interval_ms=5_000, gpus=[gpu(2, **JOB, **STALL_LIKE)])
    insert_reports(store, [late], ingest_ms=M + 90_000)
    assert _rows(store)[2] == ("GPU-n1-2", "t", "j", 0.95, 0.01, 100.0, True, None, None)
    assert _candidates(store) == ["GPU-n1-0", "GPU-n1-1", "GPU-n1-2"]
