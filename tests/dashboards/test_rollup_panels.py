"""Every panel on the fleet, job and health rollups gives the answer it would give on raw samples.

Each rollup in a panel's SQL is replaced by the rollup's own definition computed from `gpu_samples`
(its materialized view's SELECT, chained; `bench.queries.raw_sources`), and both answers must be
equal (floats to 1e-9 relative): over the simulated fleet's 70 minutes (minute level only) and over
a week around it (whole hours from the hour level, hourly buckets), at All and for one node.
"""

from __future__ import annotations

import pytest

from bench.queries import _same, _sorted, as_raw, raw_sources
from gpufleet.dashboards.macros import TimeRange, render
from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables, run
from tests.dashboards import fleet_data as fd
from tests.dashboards.conftest import Fleet, committed

NEW_ROLLUPS = {"fleet_usage_1m", "fleet_usage_1h", "job_usage_1h", "job_throughput_1m", "job_throughput_1h",
               "gpu_health_1m", "gpu_health_1h"}
WEEK = 7 * 86_400_000
RANGES = {"fleet range": (fd.START_MS, fd.END_MS), "a week": (fd.END_MS - WEEK + 3_600_000, fd.END_MS + 3_600_000)}


@pytest.mark.parametrize("uid", ["gpufleet-fleet", "gpufleet-tenant", "gpufleet-health", "gpufleet-jobs"])
@pytest.mark.parametrize("span", sorted(RANGES))
@pytest.mark.parametrize("kind", ["all", "one node"])
def test_rollup_panels_equal_their_raw_answers(fleet: Fleet, uid: str, span: str, kind: str) -> None:
    start, end = RANGES[span]
    board = committed(uid)
    chosen = {"node": f"sim-node-{fd.FOCUS_NODE:03d}"} if kind == "one node" else {}
    variables = resolve_variables(fleet.client, board, TimeRange(start, end, 60_000), chosen)
    sources = raw_sources(fleet.client, fleet.target.database, start, end)
    compared = 0
    for q in panel_queries(board):
        sql = render(q.raw_sql, variables, panel_range(start, end, q.min_interval))
        raw_sql, used = as_raw(sql, sources)
        if not NEW_ROLLUPS & set(used):
            continue
        got, want = run(fleet.client, sql).rows, run(fleet.client, raw_sql).rows
        assert _same(_sorted(got), _sorted(want)), f"{uid} {q.panel_title} ({span}, {kind})"
        compared += 1
    assert compared > 0
