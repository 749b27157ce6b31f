"""The read_path benchmark harness (bench/read_path.py) works: at 8 GPUs x 1 hour it runs end to end,
VictoriaMetrics included where installed (.ci/run installs it), produces every key BENCHMARKS.md and
issue 12 read, and every compared answer equals the raw-sample answer. Nothing here is timed against
a target; the growth table's arithmetic is checked by hand."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from bench import panels, read_path, report_read_path

pytestmark = pytest.mark.integration

KEYS = ("worst_panel_p95_ms", "usage_7d_p95_ms", "usage_30d_p95_ms", "alert_cycle_p95_ms", "equal_to_raw",
        "growth_1k_to_4k_worst", "growth_one_gpu_worst")


@pytest.mark.timeout(600)
def test_the_harness_runs_at_a_tiny_size(chdb_dsn: str, tmp_path: Path) -> None:
    peer = shutil.which("victoria-metrics") is not None
    sizes = read_path.TINY if peer else dataclasses.replace(read_path.TINY, peer_gpus=None)
    out = read_path.run(chdb_dsn, tmp_path, sizes, plot=tmp_path / "growth.png")

    for key in KEYS:
        assert out[key] is not None, key
    assert out["equal_to_raw"] is True, [c for c in out["main"]["compared"] + out["month"]["compared"]
                                         if not c["equal"]]
    assert {c["question"] for c in out["main"]["compared"]} >= {
        "fleet utilization over time", "GPUs by health state over time", "usage per tenant-hour", "MFU per tenant"}
    assert out["panel_errors"] == []
    boards = {p["board"] for p in out["main"]["panels_default_range"]}
    assert boards == {b["uid"] for b in panels.boards()}, "every committed board is timed"
    assert len(out["main"]["panels_default_range"]) == len(out["main"]["panels_whole_history"])
    assert out["main"]["alert_cycle"]["rules"] > 0
    assert out["ingest"]["views"]["views"], "the views' share of the insert names the views it measured"
    assert {"fleet_usage_1m_mv", "gpu_health_1m_mv"} <= set(out["ingest"]["views"]["issue_12_views"])
    assert out["ingest"]["views"]["issue_12_views_extra_cost"] is not None, "issue 12's views: before and after"
    assert out["main"]["history"]["fill_seconds"]["gpu_usage_1m_mv"] >= 0
    assert (tmp_path / "growth.png").read_bytes().startswith(b"\x89PNG")
    if peer:
        assert out["peer"]["victoriametrics"]["worst_p95_ms"] > 0
        assert out["peer"]["gpufleet"]["worst_p95_ms"] > 0
        assert out["peer"]["victoriametrics"]["bytes_per_sample"] > 0

    section = report_read_path.render({**out, "status": "ok", "measured_at": "now", "bench_seconds": 1.0})
    assert section.startswith(report_read_path.START)
    assert section.endswith(report_read_path.END)
    assert "| fleet | Power draw |" in section
    assert any(row.startswith("| 7 | read path: worst panel p95") for row in report_read_path.table_rows(out))


def test_growth_ratios_floor_noise_and_split_one_gpu_panels() -> None:
    def size(p95_fleet: float, p95_gpu: float, usage: float) -> dict[str, object]:
        return {"panels": [{"board": "gpufleet-fleet", "panel": "P", "ref": "A", "range_h": 6, "scope": "fleet",
                            "p95_ms": p95_fleet},
                           {"board": "gpufleet-gpu", "panel": "G", "ref": "A", "range_h": 6, "scope": "one_gpu",
                            "p95_ms": p95_gpu}],
                "usage": {"p95_ms": usage}, "alert_cycle": {"p95_ms": 50.0}}

    table = read_path.growth_table((250, 1000, 4000), {250: size(10, 3, 20), 1000: size(40, 3, 100),
                                                       4000: size(160, 6, 110)})
    rows = {r["question"]: r for r in table}
    assert rows["gpufleet-fleet/P/A @6h"]["ratio"] == 4.0  # 160 / 40
    assert rows["gpufleet-gpu/G/A @6h"]["ratio"] == 1.0  # 3 -> 6 ms: both under the 10 ms floor
    assert rows["gpufleet-gpu/G/A @6h"]["ratio_unfloored"] == 2.0
    assert rows["gpufleet usage"]["ratio"] == 1.1
    assert rows["alert cycle"]["p95_ms"] == {"250": 50.0, "1000": 50.0, "4000": 50.0}
    assert {r["scope"] for r in table} == {"fleet", "one_gpu"}
