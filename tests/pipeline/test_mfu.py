"""MFU per scope on hand-built samples: measured vs estimated FLOPs, coverage, unknown models."""

from __future__ import annotations

import pytest

from gpufleet.pipeline.ingest.rows import Deriver, insert_reports
from gpufleet.pipeline.queries.mfu import mfu_by_scope, source_label
from gpufleet.pipeline.queries.window import Window
from gpufleet.pipeline.store import Store
from tests.builders import gpu, report

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z, a whole minute
A100 = "NVIDIA A100-SXM4-80GB"
MYSTERY = "Mystery X1"
H100_PEAK, A100_PEAK = 989e12, 312e12


def _fleet(i: int) -> list:
    return [
        report(node="n1", seq=i, time_ms=M + (i + 1) * 1000, gpus=[
            gpu(0, "n1", tenant="a", job="j1"),  # tensor 0.25: estimated 0.25 x peak
            gpu(1, "n1", tenant="a", job="j2", flops_measured=0.5 * H100_PEAK),  # measured wins over tensor 0.25
        ]),
        report(node="n2", seq=i, time_ms=M + (i + 1) * 1000, gpus=[
            gpu(0, "n2", tenant="b", job="j1", model=A100, tensor_active_ratio=0.5),
            gpu(1, "n2", tenant="b", job="j1", model=MYSTERY, tensor_active_ratio=0.5),  # no peak: excluded
            gpu(2, "n2", tensor_active_ratio=0.0),  # unallocated, idle
            gpu(3, "n2", tensor_active_ratio=None),  # no FLOPs figure at all: excluded
        ]),
    ]


@pytest.fixture
def store(ch_store: Store) -> Store:
    insert_reports(ch_store, [r for i in range(10) for r in _fleet(i)], ingest_ms=M + 20_000)
    return ch_store


WINDOW = Window.covering(M, M + 60_000)


def _rows(store: Store, scope: str) -> dict:
    return {r.key: r for r in mfu_by_scope(store, scope, WINDOW).rows}


def test_fleet_mfu_excludes_unknown_models_and_flags_them(store) -> None:
    report_ = mfu_by_scope(store, "fleet", WINDOW)
    (fleet,) = report_.rows
    # per second: 0.25 + 0.5 H100 peaks, 0.5 A100 peak, 0 (idle H100); GPU n2/3 (no figure) and the
    # unknown model are left out of numerator and denominator
    achieved = 10 * (0.25 * H100_PEAK + 0.5 * H100_PEAK + 0.5 * A100_PEAK)
    peak = 10 * (3 * H100_PEAK + A100_PEAK)
    assert fleet.mfu == pytest.approx(achieved / peak, rel=1e-12)
    assert fleet.achieved_flop == pytest.approx(achieved, rel=1e-12)
    assert fleet.peak_flop == pytest.approx(peak, rel=1e-12)
    assert fleet.gpu_seconds == 40.0
    assert fleet.measured_coverage == 10 / 40
    assert fleet.source == "mixed"
    assert fleet.unknown_model_gpu_seconds == 10.0
    assert fleet.no_flops_gpu_seconds == 10.0
    assert report_.unknown_models == [{"model": MYSTERY, "gpu_seconds": 10.0}]


def test_allocated_only(store) -> None:
    (row,) = mfu_by_scope(store, "fleet_allocated", WINDOW).rows
    achieved = 10 * (0.75 * H100_PEAK + 0.5 * A100_PEAK)
    assert row.mfu == pytest.approx(achieved / (10 * (2 * H100_PEAK + A100_PEAK)), rel=1e-12)
    assert row.gpu_seconds == 30.0
    assert row.unknown_model_gpu_seconds == 10.0


def test_per_tenant_job_node_model(store) -> None:
    tenants = _rows(store, "tenant")
    assert set(tenants) == {"a", "b"}
    assert tenants["a"].mfu == pytest.approx(0.375, rel=1e-12)
    assert (tenants["a"].source, tenants["a"].measured_coverage) == ("mixed", 0.5)
    assert tenants["b"].mfu == pytest.approx(0.5, rel=1e-12)  # the A100 alone; the unknown model is flagged
    assert (tenants["b"].source, tenants["b"].unknown_model_gpu_seconds) == ("estimated", 10.0)

    jobs = _rows(store, "job")
    assert set(jobs) == {"a/j1", "a/j2", "b/j1"}
    assert jobs["a/j1"].mfu == pytest.approx(0.25, rel=1e-12)
    assert (jobs["a/j1"].source, jobs["a/j2"].source) == ("estimated", "measured")
    assert jobs["a/j2"].mfu == pytest.approx(0.5, rel=1e-12)
    assert jobs["a/j2"].measured_coverage == 1.0

    nodes = _rows(store, "node")
    assert nodes["c1/n1"].mfu == pytest.approx(0.375, rel=1e-12)
    assert nodes["c1/n2"].mfu == pytest.approx(0.5 * A100_PEAK / (A100_PEAK + H100_PEAK), rel=1e-12)

    models = _rows(store, "model")
    assert models[A100].mfu == pytest.approx(0.5, rel=1e-12)
    assert models["NVIDIA H100 80GB HBM3"].mfu == pytest.approx(0.75 / 3, rel=1e-12)
    assert models[MYSTERY].mfu is None  # unknown: no MFU, never 0
    assert models[MYSTERY].source == "none"
    assert models[MYSTERY].unknown_model_gpu_seconds == 10.0


def test_window_attributes_a_sample_to_the_minute_of_its_interval_start(ch_store) -> None:
    store = ch_store
    # ends 0.5 s into minute M+1 but started 0.5 s before it: belongs to minute M
    straddling = report(seq=1, time_ms=M + 60_500, gpus=[gpu(0, tenant="a")])
    inside_next = report(seq=2, time_ms=M + 62_000, gpus=[gpu(0, tenant="a", tensor_active_ratio=0.5)])
    insert_reports(store, [straddling, inside_next], ingest_ms=M + 70_000)
    (first,) = mfu_by_scope(store, "fleet", Window.covering(M, M + 60_000)).rows
    (second,) = mfu_by_scope(store, "fleet", Window.covering(M + 60_000, M + 120_000)).rows
    assert (first.gpu_seconds, first.mfu) == (1.0, 0.25)
    assert (second.gpu_seconds, second.mfu) == (1.0, 0.5)
    assert mfu_by_scope(store, "fleet", Window.covering(M + 120_000, M + 180_000)).rows == []


def test_configured_peak_makes_an_unknown_model_count(ch_store) -> None:
    store = ch_store
    reports = [report(seq=i, time_ms=M + (i + 1) * 1000,
                      gpus=[gpu(0, tenant="a", model=MYSTERY, tensor_active_ratio=0.5)]) for i in range(4)]
    insert_reports(store, reports, ingest_ms=M + 10_000, deriver=Deriver(peak_overrides={MYSTERY: 100e12}))
    report_ = mfu_by_scope(store, "model", WINDOW)
    assert report_.unknown_models == []
    assert report_.rows[0].mfu == 0.5
    assert report_.rows[0].peak_flop == 4 * 100e12


def test_unknown_scope_is_refused(ch_store) -> None:
    with pytest.raises(ValueError, match="unknown MFU scope 'rack'"):
        mfu_by_scope(ch_store, "rack", WINDOW)  # type: ignore[arg-type]


def test_source_labels() -> None:
    assert [source_label(0, 0), source_label(10, 10), source_label(10, 0), source_label(10, 4)] == [
        "none", "measured", "estimated", "mixed"]
