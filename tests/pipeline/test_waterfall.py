"""The capacity waterfall on hand-built samples: every step by hand, and the steps add up exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.config import StallConfig
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries.policy import Policy
from gpufleet.pipeline.queries.waterfall import GpuTotals, HardwareScope, build, waterfall
from gpufleet.pipeline.queries.window import Window
from gpufleet.pipeline.store import Store
from tests.builders import gpu, report

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z
H100_PEAK = 989e12
IDLE_UTIL = 0.03125  # 3 %, below the default 5 % threshold
WINDOW = Window.covering(M, M + 60_000)  # one minute; six 10 s intervals per GPU


def _gpus(i: int) -> list:
    """Interval i (of six, 10 s each) of node n1's GPUs."""
    out = [
        gpu(0, tenant="t"),  # A: busy all minute
        # B: failing 0-1, idle by utilization 2-3, held with no process 4-5
        gpu(1, tenant="t", xids=[79] if i < 2 else [], util_gpu_ratio=IDLE_UTIL if i in (2, 3) else 0.5,
            compute_processes=0 if i >= 4 else 1),
        gpu(2, tensor_active_ratio=0.0),  # C: unallocated all minute
        gpu(4, tenant="t", model="Mystery X1"),  # E: busy, unknown model
        gpu(5, tenant="t", clock_event_reasons=0x20),  # F: busy but degraded (thermal)
    ]
    if i < 3:
        out.append(gpu(3, tenant="t"))  # D: busy, then silent for the last 30 s
    return out


@pytest.fixture
def store(ch_store: Store) -> Store:
    reports = [report(seq=i, time_ms=M + (i + 1) * 10_000, interval_ms=10_000, gpus=_gpus(i)) for i in range(6)]
    insert_reports(ch_store, reports, ingest_ms=M + 70_000)
    return ch_store


def test_every_step_by_hand_and_they_add_up(store) -> None:
    w = waterfall(store, WINDOW, Policy(("failing",), 5))
    s = 1000  # ms per second
    assert w.gpus == 6
    assert w.installed_ms == 6 * 60 * s
    assert w.unknown_ms == 30 * s  # D silent for 30 s
    assert w.unhealthy_ms == 20 * s  # B failing 2 x 10 s
    assert w.unallocated_ms == 60 * s  # C
    assert w.idle_allocated_ms == 40 * s  # B: 20 s at 3 % + 20 s with no process
    assert w.busy_ms == (60 + 30 + 60 + 60) * s  # A, D, E, F (degraded is not excluded by this policy)
    assert w.installed_ms - w.unknown_ms - w.unhealthy_ms - w.unallocated_ms - w.idle_allocated_ms == w.busy_ms
    assert w.stalled_ms == 0  # nothing ran without a job
    assert [v for _, v in w.steps()] == [360.0, -30.0, -20.0, -60.0, -40.0, 0.0, 210.0]
    # achieved: 21 known-model intervals at tensor 0.25 (C ran 0; E has no peak, so no estimate)
    achieved = 21 * 0.25 * H100_PEAK * 10
    assert w.achieved_flop == pytest.approx(achieved, rel=1e-12)
    # installed peak: the five known-model GPUs for the whole minute (E is unknown, D counts its silence)
    assert w.installed_peak_flop == pytest.approx(5 * 60 * H100_PEAK, rel=1e-12)
    assert w.achieved_share_of_peak == pytest.approx(52.5 / 300, rel=1e-12)
    assert w.measured_coverage == 0.0
    assert w.unknown_models == [{"model": "Mystery X1", "installed_gpu_seconds": 60.0}]


def test_policy_decides_what_is_unhealthy(store) -> None:
    w = waterfall(store, WINDOW, Policy(("degraded", "failing"), 5))
    assert (w.unhealthy_ms, w.busy_ms) == (80_000, 150_000)  # F's 60 s move from busy to unhealthy
    w = waterfall(store, WINDOW, Policy((), 50))  # nothing excluded; idle below 50 %
    # B's failing 20 s now count as allocated; its util 0.5 is not below 50 %, so they stay busy;
    # everything at 0.5 utilization is busy, so idle is B's 3 % and no-process intervals again
    assert (w.unhealthy_ms, w.idle_allocated_ms, w.busy_ms) == (0, 40_000, 230_000)


def test_scope_and_window(store) -> None:
    only_mystery = waterfall(store, WINDOW, Policy(), HardwareScope(model="Mystery X1"))
    assert (only_mystery.gpus, only_mystery.busy_ms, only_mystery.achieved_share_of_peak) == (1, 60_000, None)
    assert waterfall(store, WINDOW, Policy(), HardwareScope(node="n9")).gpus == 0
    # a two-minute window: every GPU seen is installed for both minutes
    w = waterfall(store, Window.covering(M, M + 120_000), Policy())
    assert (w.installed_ms, w.unknown_ms) == (6 * 120_000, 30_000 + 6 * 60_000)


def test_overlapping_reports_never_make_unknown_negative() -> None:
    g = GpuTotals("m", claimed_ms=70_000, unhealthy_ms=0, unallocated_ms=70_000, idle_ms=0,
                  achieved_flop=0.0, mfu_ms=0, measured_ms=0, peak_flop_s=None)
    w = build([g], window_ms=60_000)
    assert (w.installed_ms, w.unknown_ms, w.busy_ms) == (70_000, 0, 0)


@given(st.lists(st.tuples(st.integers(0, 60_000), st.integers(0, 100), st.integers(0, 100), st.integers(0, 100)),
                max_size=20))
def test_steps_always_add_up(parts) -> None:
    gpus = []
    for reported, unhealthy_pct, unalloc_pct, idle_pct in parts:
        unhealthy = reported * unhealthy_pct // 100
        unallocated = (reported - unhealthy) * unalloc_pct // 100
        idle = (reported - unhealthy - unallocated) * idle_pct // 100
        gpus.append(GpuTotals("m", reported, unhealthy, unallocated, idle, 0.0, 0, 0, 1.0))
    w = build(gpus, 60_000)
    assert w.installed_ms == 60_000 * len(gpus)
    assert w.installed_ms - w.unknown_ms - w.unhealthy_ms - w.unallocated_ms - w.idle_allocated_ms == w.busy_ms
    stalled = w.busy_ms // 3
    assert build(gpus, 60_000, stalled).busy_ms == w.busy_ms - stalled
    assert min(w.unknown_ms, w.unhealthy_ms, w.unallocated_ms, w.idle_allocated_ms, w.busy_ms) >= 0


def _stall_like(i: int, job: str, **over: object):
    """A GPU of a hung job: fully utilized, no tensor work, 90 W of its 700 W (H100 SXM default)."""
    fields = {"tenant": "t", "job": job, "util_gpu_ratio": 1.0, "tensor_active_ratio": 0.0, "power_w": 90.0, **over}
    return gpu(i, "n2", **fields)


def _working(i: int, job: str):
    return gpu(i, "n2", tenant="t", job=job, util_gpu_ratio=0.9, tensor_active_ratio=0.5, power_w=550.0)


def test_stalled_time_is_the_part_of_busy_in_long_stalls(ch_store: Store) -> None:
    """jobs.stall.for_s = 30 s; 10 s intervals from 30 s before the window to 30 s after it."""
    def gpus(k: int) -> list:  # interval k covers (M + 10(k-1) s, M + 10k s], k = -2 .. 9
        return [
            _stall_like(0, "hung"),  # stalled since before the window: its whole minute
            _stall_like(1, "slow-step") if k in (2, 3) else _working(1, "slow-step"),  # 20 s: a slow step
            _stall_like(2, "late") if k >= 5 else _working(2, "late"),  # 20 s in, 50 s in all: judged whole
            _stall_like(3, "broken", xids=[79]),  # failing: unhealthy, not stalled
        ]
    reports = [report(node="n2", seq=k + 2, time_ms=M + k * 10_000, interval_ms=10_000, gpus=gpus(k))
               for k in range(-2, 10)]
    # a second agent on n2 reports the hung GPU again: its seconds are claimed once, so stalled once
    reports += [report(node="n2", boot_id="boot-2", seq=k + 2, time_ms=M + k * 10_000, interval_ms=10_000,
                       gpus=[_stall_like(0, "hung")]) for k in range(-2, 10)]
    insert_reports(ch_store, reports, ingest_ms=M + 100_000)
    w = waterfall(ch_store, WINDOW, Policy(("failing",), 5), stall=StallConfig(for_s=30))
    assert (w.installed_ms, w.unknown_ms, w.unhealthy_ms, w.unallocated_ms, w.idle_allocated_ms) == (
        240_000, 0, 60_000, 0, 0)
    assert (w.stalled_ms, w.busy_ms) == (80_000, 100_000)
    assert [v for _, v in w.steps()] == [240.0, 0.0, -60.0, 0.0, 0.0, -80.0, 100.0]
    # with the default 10 minutes nothing here lasted long enough
    assert waterfall(ch_store, WINDOW, Policy(("failing",), 5)).stalled_ms == 0
    # stalled seconds of a failing GPU count once its health is billed
    assert waterfall(ch_store, WINDOW, Policy((), 5), stall=StallConfig(for_s=30)).stalled_ms == 140_000
def test_mig_instances_count_as_their_share_of_the_gpu() -> None:
    window = 60_000
    one = GpuTotals("H100", 60_000, 0, 0, 0, 0.0, 0, 0, 989e12 / 7, (1, 7))
    three = GpuTotals("H100", 30_000, 0, 30_000, 0, 0.0, 0, 0, 3 * 989e12 / 7, (3, 7))
    w = build([one, three], window)
    assert w.installed_ms == 60_000 * 4 / 7  # 4 of the GPU's 7 slices are carved into instances
    assert w.unknown_ms == 30_000 * 3 / 7
    assert w.unallocated_ms == 30_000 * 3 / 7
    assert w.busy_ms == 60_000 / 7
    assert w.installed_peak_flop == (989e12 / 7 + 3 * 989e12 / 7) * 60
    whole = build([GpuTotals("H100", 60_000, 0, 0, 0, 0.0, 0, 0, 989e12)], window)
    assert (whole.installed_ms, type(whole.installed_ms)) == (60_000, int)
