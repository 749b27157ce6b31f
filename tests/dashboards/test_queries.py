"""Every committed panel query and alert rule runs on chDB loaded with the simulated fleet.

Each query goes through what Grafana and the ClickHouse plugin do to it (`$__conditionalAll`,
variable interpolation, backend macros) with the board's variables filled from ClickHouse the way
Grafana fills them: once with every variable at All, once with one concrete cluster, node, tenant,
GPU model and GPU (the fleet's focus GPU). Each must return exactly the columns its panel expects,
with rows.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from gpufleet.dashboards import alerting, build
from gpufleet.dashboards.definitions import BOARDS
from gpufleet.dashboards.macros import TimeRange, expand_macros
from gpufleet.dashboards.queries import PanelQuery, panel_queries, panel_range, resolve_variables, run
from gpufleet.gpu_facts import peak_flops
from tests.dashboards import fleet_data as fd
from tests.dashboards.conftest import Fleet, committed, hexed

SPECS = {(b.uid, pid, q.ref_id): q for b in BOARDS for pid, p in b.query_panels() for q in p.queries}
TIME_SERIES_PANELS = {"timeseries", "heatmap", "state-timeline"}


def selection(kind: str, fleet: Fleet, uid: str) -> dict[str, str]:
    data = fleet.data
    chosen = {"gpu": data.focus_gpu_uuid} if uid == "gpufleet-gpu" else {}
    if kind == "one":
        chosen.update(cluster=fd.CLUSTER, node=data.focus_node, tenant=data.focus_tenant, model=data.model)
    return chosen


def _numeric(type_name: str) -> bool:
    base = type_name.removeprefix("Nullable(").removesuffix(")")
    return base.startswith(("Int", "UInt", "Float", "Decimal"))


def check_result(q: PanelQuery, columns: tuple[str, ...], types: tuple[str, ...], rows: list[tuple[Any, ...]],
                 kind: str) -> None:
    spec = SPECS[q.key]
    where = f"{q.board_uid} panel {q.panel_id} {q.panel_title!r} ({kind})"
    assert columns == spec.columns, f"{where}: columns"
    assert rows, f"{where}: no rows"
    if q.panel_type in TIME_SERIES_PANELS:
        assert q.format == 0, f"{where}: a time series panel needs format 0"
        assert types[0].startswith("DateTime"), f"{where}: a time series starts with its time"
        times = [r[0] for r in rows]
        assert times == sorted(times), f"{where}: time must ascend (the plugin's long-to-wide needs it)"
        assert all(_numeric(t) or t.startswith(("String", "LowCardinality(String")) for t in types[1:]), where
    if kind == "all" and any(_numeric(t) for t in types):
        numbers = [v for r in rows for v, t in zip(r, types, strict=True) if _numeric(t) and v is not None]
        assert any(v != 0 for v in numbers), f"{where}: every number is zero or NULL"


@pytest.mark.parametrize("kind", ["all", "one"])
@pytest.mark.parametrize("uid", [b.uid for b in BOARDS])
def test_every_panel_query_runs_with_the_expected_columns_and_data(fleet: Fleet, uid: str, kind: str) -> None:
    board = committed(uid)
    whole = TimeRange(fd.START_MS, fd.END_MS, 60_000)
    values = resolve_variables(fleet.client, board, whole, selection(kind, fleet, uid))
    queries = panel_queries(board)
    assert {q.key for q in queries} == {k for k in SPECS if k[0] == uid}
    for q in queries:
        r = run(fleet.client, _render(q, values))
        check_result(q, r.columns, r.types, r.rows, kind)


def _render(q: PanelQuery, values: dict[str, Any]) -> str:
    from gpufleet.dashboards.macros import render

    return render(q.raw_sql, values, panel_range(fd.START_MS, fd.END_MS, q.min_interval))


@pytest.mark.parametrize("uid", [b.uid for b in BOARDS])
def test_variable_queries_list_the_fleet(fleet: Fleet, uid: str) -> None:
    """Each option's value is the string's hex, its text the string; a pick by text selects that value."""
    board = committed(uid)
    chosen = selection("one", fleet, uid)
    values = resolve_variables(fleet.client, board, TimeRange(fd.START_MS, fd.END_MS, 60_000), chosen)
    assert set(values["cluster"].options) == {"73696D"}  # "sim"
    assert set(values["node"].options) == {hexed(f"sim-node-{i:03d}") for i in range(fd.NODES)}
    assert set(values["tenant"].options) == {"74656E616E742D61", "74656E616E742D62"}  # tenant-a, tenant-b
    assert set(values["model"].options) == {hexed(fd.H100)}
    for name, text in chosen.items():
        assert values[name].value == ((hexed(text),) if name != "gpu" else hexed(text)), name
        assert values[name].text() == text, name


def test_overrides_name_real_fields(fleet: Fleet) -> None:
    """A field override names a column of its query, or a series its query returns (long format)."""
    for board in BOARDS:
        values = resolve_variables(fleet.client, committed(board.uid), TimeRange(fd.START_MS, fd.END_MS, 60_000),
                                   selection("all", fleet, board.uid))
        for q in panel_queries(committed(board.uid)):
            panel = next(p for p in committed(board.uid)["panels"] if p["id"] == q.panel_id)
            names = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]}
            unknown = names - set(SPECS[q.key].columns)
            if unknown:
                r = run(fleet.client, _render(q, values))
                series = {row[i] for row in r.rows for i, t in enumerate(r.types) if "String" in t}
                assert unknown <= series, f"{board.uid} panel {q.panel_id}: overrides {unknown - series} match nothing"


# --- alert rules ---------------------------------------------------------------------------------

RULES = alerting.provisioning()["groups"][0]["rules"]


def run_rule(fleet: Fleet, rule: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...], list[tuple[Any, ...]]]:
    query = rule["data"][0]
    window = query["relativeTimeRange"]
    tr = TimeRange(fd.END_MS - window["from"] * 1000, fd.END_MS - window["to"] * 1000, 1000)
    r = run(fleet.client, expand_macros(query["model"]["rawSql"], tr))
    return r.columns, r.types, r.rows


def firing(rule: dict[str, Any], columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The rows Grafana's threshold expression (B) keeps."""
    cond = rule["data"][1]["model"]["conditions"][0]["evaluator"]
    limit = cond["params"][0]
    passes = {"gt": lambda v: v > limit, "lt": lambda v: v < limit}[cond["type"]]
    out = []
    for row in rows:
        d = dict(zip(columns, row, strict=True))
        if passes(row[-1]):
            out.append(d)
    return out


def test_alert_rule_queries_return_labels_and_one_number(fleet: Fleet) -> None:
    committed_rules = build.outputs()[build.RULES_FILE]
    assert (build.ROOT / build.RULES_FILE).read_text() == committed_rules
    for rule in RULES:
        columns, types, _ = run_rule(fleet, rule)
        labels = alerting.labels_of(rule)
        assert columns[:-1] == labels, rule["title"]
        assert all("String" in t for t in types[:-1]), f"{rule['title']}: labels must be strings"
        assert _numeric(types[-1]), f"{rule['title']}: the last column is the value Grafana judges"
        for ref in ("gpu_index", "node", "cluster", "tenant"):
            if "$labels." + ref in rule["annotations"]["summary"]:
                assert ref in labels, f"{rule['title']}: summary uses $labels.{ref}, which the query does not return"


def test_alert_rules_fire_for_exactly_the_injected_faults(fleet: Fleet) -> None:
    """Fault placement (fleet_data._faults) says which GPU or node each rule must catch at the end."""
    expected = {
        "GpuFailing": {("sim-node-001", "0"), ("sim-node-002", "1"), ("sim-node-002", "2")},  # + the recovery actions
        "GpuDegraded": {("sim-node-001", "1")},
        "GpuIdleAllocated": {("sim-node-000", "1")},
        "GpuHeldNoProcess": {("sim-node-000", "2")},
        "GpuBusyUnallocated": {("sim-node-000", "3")},
        "NodeSilent": {("sim-node-003", None)},
        "JobStalled": {(None, None)},  # a job: fleet_data's job_hang on node 2 (labels cluster, tenant, job)
        "JobStraggler": {("sim-node-001", "1")},  # the thermal GPU that lags its node's job
        "GpuNeedsReset": {("sim-node-002", "2")},
        "NodeNeedsReboot": {("sim-node-002", None)},
        "GpuNeedsDrain": {("sim-node-001", "3")},
        "FabricDegraded": {("sim-node-002", "3")},
        "NetworkPortDown": {("sim-node-002", None)},
        "NetworkPortDegraded": {("sim-node-002", None)},
        "GpuMissing": {("sim-node-000", None)},
        "NodeConfigDrift": {("sim-node-001", None)},
    }
    for rule in RULES:
        if rule["title"] not in expected:
            continue
        columns, _, rows = run_rule(fleet, rule)
        got = {(d.get("node"), d.get("gpu_index")) for d in firing(rule, columns, rows)}
        assert got == expected[rule["title"]], rule["title"]
    conflict = next(r for r in RULES if r["title"] == "GpuClaimConflict")  # labelled by GPU UUID only
    twice = next(g.uuid for r in fd.simulated_reports(fleet.data.fleet) if r.node == "sim-node-002"
                 for g in r.gpus if g.index == 3)
    assert [d["gpu"] for d in firing(conflict, *run_rule(fleet, conflict)[::2])] == [twice]
    idle = next(r for r in RULES if r["title"] == "GpuIdleAllocated")
    (row,) = firing(idle, *run_rule(fleet, idle)[::2])
    assert row["tenant"] == fleet.data.focus_tenant
    for title, kind in (("JobStalled", "job_hang"), ("JobStraggler", "straggler")):  # the job the simulator hit
        rule = next(r for r in RULES if r["title"] == title)
        (row,) = firing(rule, *run_rule(fleet, rule)[::2])
        job = fleet.data.fleet.fault_job(next(f for f in fleet.data.fleet.faults if f.kind == kind))
        assert job is not None
        assert (row["tenant"], row["job"]) == (job.tenant, job.id), title


def test_grafana_rules_agree_with_the_gpufleet_evaluator(fleet: Fleet) -> None:
    """The alerts the evaluator has firing at the end are the ones the Grafana rules fire."""
    evaluator = {
        (name, labels.get("node", ""), labels.get("gpu_index", ""), labels.get("gpu", ""), labels.get("job", ""))
        for name, labels in fleet.client.query(
            "SELECT alertname, labels FROM alerts FINAL WHERE state = 'firing' AND alertname NOT LIKE '%Mfu%'"
        ).result_rows
    }
    grafana = set()
    for rule in RULES:
        if "Mfu" in rule["title"]:
            continue
        columns, _, rows = run_rule(fleet, rule)
        grafana |= {(rule["title"], d.get("node", ""), d.get("gpu_index", ""), d.get("gpu", ""), d.get("job", ""))
                    for d in firing(rule, columns, rows)}
    assert grafana == evaluator


def _expected_mfu(fleet: Fleet, tenant: str | None) -> float:
    """MFU of allocated GPUs over the last hour, from the simulated reports, in Python.

    Intervals starting in the rule's window count (the rollup files an interval under the minute of
    its start); known models only; achieved = measured FLOPs, else the hardware estimate (tensor
    activity x peak x seconds), else 0 for a GPU that could not be read.
    """
    achieved = capacity = 0.0
    for r in fd.simulated_reports(fleet.data.fleet):
        if r.time_ms - r.interval_ms < fd.END_MS - 3_600_000:
            continue
        for g in r.gpus:
            peak = peak_flops(g.model) if g.model else None
            if not g.tenant or peak is None or (tenant and g.tenant != tenant):
                continue
            estimate = None if g.error or g.tensor_active_ratio is None else (
                g.tensor_active_ratio * peak * r.interval_ms / 1000)
            if g.flops_measured is None and estimate is None and not g.error:
                continue
            achieved += g.flops_measured if g.flops_measured is not None else (estimate or 0.0)
            capacity += peak * r.interval_ms / 1000
    return achieved / capacity


def test_mfu_rules_compute_mfu_as_defined(fleet: Fleet) -> None:
    fleet_rule = next(r for r in RULES if r["title"] == "FleetMfuBelowTarget")
    tenant_rule = next(r for r in RULES if r["title"] == "TenantMfuBelowTarget")
    _, _, rows = run_rule(fleet, fleet_rule)
    assert math.isclose(rows[0][0], _expected_mfu(fleet, None), rel_tol=1e-9)
    assert firing(fleet_rule, ("mfu",), rows)  # the simulated fleet runs below 50%
    columns, _, rows = run_rule(fleet, tenant_rule)
    for d in (dict(zip(columns, row, strict=True)) for row in rows):
        assert math.isclose(d["mfu"], _expected_mfu(fleet, d["tenant"]), rel_tol=1e-9), d["tenant"]
    assert {d["tenant"] for d in (dict(zip(columns, r, strict=True)) for r in rows)} == {"tenant-a", "tenant-b"}
