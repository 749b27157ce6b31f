"""Hostile strings in tenant, job, node, cluster, model and GPU fields are data: stored and read back byte for byte.

They go through the real ingester (the JSON staging path, with msgspec's encoding and with every
non-ASCII character written as a `\\u` escape) and through the column path, then come back
unchanged from every query that takes or returns them: usage per tenant, MFU by tenant, job and
node, billable hours, the status document and the alerts (labels and annotations). The HTML
preview of the dashboards escapes them.
"""

from __future__ import annotations

import html
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet import wire
from gpufleet.config import Config, with_clickhouse
from gpufleet.dashboards import preview
from gpufleet.dashboards.definitions import BOARDS
from gpufleet.dashboards.macros import TimeRange
from gpufleet.dashboards.macros import render as render_sql
from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables, run
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.rules import parse_rules
from gpufleet.pipeline.alerts.state import firing_alerts
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries import mfu
from gpufleet.pipeline.queries.policy import Policy, sync_policy
from gpufleet.pipeline.queries.status import fleet_status
from gpufleet.pipeline.queries.usage import billable_by_tenant, usage_rows
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target, connect
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import gpu, report
from tests.security import HOSTILE, ingest_config, produce, running_ingester, wait_for

MIN = 60_000
MINUTES = 3
CLUSTERS = ("via-json", "via-json-escaped", "via-columns")
"""One copy of the fleet per insert path, so each path's rows can be told apart."""


def _name(s: str) -> str:
    """A wire `Name` (node, cluster, GPU uuid) holds at most 256 characters."""
    return s[:256]


def fleet(cluster: str, base_ms: int) -> list[wire.NodeReport]:
    """One node per hostile string: its GPU's tenant is that string, its job, model and error the next ones."""
    out = []
    n = len(HOSTILE)
    for i, hostile in enumerate(HOSTILE):
        node = _name(f"{i:02d}{hostile}")
        # each path's copy has GPUs of its own: one GPU reported by three clusters would be billed once
        g = gpu(0, node, uuid=_name(f"GPU-{CLUSTERS.index(cluster)}-{i}-{hostile}"), tenant=hostile,
                job=HOSTILE[(i + 1) % n], model=HOSTILE[(i + 2) % n], error=None, compute_processes=0,
                util_gpu_ratio=0.0)
        out += [report(node=node, cluster=_name(cluster + hostile[:8]) if i % 2 else cluster, seq=k,
                       time_ms=base_ms + k * MIN, interval_ms=MIN, gpus=[g]) for k in range(1, MINUTES + 1)]
    return out


def _escaped(r: wire.NodeReport) -> bytes:
    """The message as another JSON writer may send it: every non-ASCII character as a `\\u` escape."""
    return json.dumps(json.loads(wire.encode(r)), ensure_ascii=True).encode()


@pytest.fixture(scope="module")
def ch_target(chdb_dsn: str, ch_client) -> Iterator[Target]:
    """One migrated database for the whole module: the hostile fleet is ingested once, then only read."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    migrate(ch_client, SchemaOptions(database=name))
    yield Target(dsn=chdb_dsn, database=name)
    ch_client.command(f"DROP DATABASE IF EXISTS {name} SYNC")


@pytest.fixture(scope="module")
def stored(broker, ch_target, ch_client) -> dict[str, list[wire.NodeReport]]:
    """The hostile fleet, once per insert path; returns the reports by path."""
    base = (int(time.time()) // 60 - 30) * MIN
    by_path = {c: fleet(c, base) for c in CLUSTERS}
    cfg = ingest_config(broker.bootstrap, ch_target, f"t-{uuid.uuid4().hex[:10]}")
    items = [(r.node.encode(), wire.encode(r)) for r in by_path["via-json"]]
    items += [(r.node.encode(), _escaped(r)) for r in by_path["via-json-escaped"]]
    with running_ingester(cfg) as ing:
        produce(cfg, items)
        wait_for(ing, lambda: ing.stats.rows == len(items), f"{len(items)} hostile rows")
        assert ing.stats.dead_letters == 0
    staging_tables = ch_client.query("SELECT count() FROM system.tables WHERE database = {db:String} "
                                     "AND name LIKE 'gpu_samples_json_%'", parameters={"db": ch_target.database})
    assert staging_tables.result_rows[0][0] > 0, "the ingester did not use its JSON staging path"
    insert_reports(Store(ch_client, ch_target.database), by_path["via-columns"], base + 40 * MIN)
    return by_path


def test_every_string_column_reads_back_byte_identical(stored, ch_target, ch_client) -> None:
    db = ch_target.database
    want = sorted({(r.cluster, r.node, r.seq, g.uuid, g.tenant, g.job, g.model) for rs in stored.values()
                   for r in rs for g in r.gpus})
    got = sorted(ch_client.query(
        f"SELECT cluster, node, seq, gpu_uuid, tenant, job, model FROM {db}.gpu_samples").result_rows)
    assert got == want
    # Bound parameters find each value exactly, whatever it contains.
    for hostile in HOSTILE:
        n = ch_client.query(f"SELECT count() FROM {db}.gpu_samples WHERE tenant = {{t:String}}",
                            parameters={"t": hostile}).result_rows[0][0]
        assert n == MINUTES * len(CLUSTERS), repr(hostile)


def test_usage_mfu_billing_and_status_return_the_strings_unchanged(stored, ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    sync_policy(store, Config().billing, int(time.time() * 1000))
    for hostile in HOSTILE:
        rows = usage_rows(store, tenant=hostile)
        assert {r["tenant"] for r in rows} == {hostile}
        # 3 one-minute samples per insert path, 3 paths: 540 allocated GPU-seconds for this tenant.
        assert sum(r["allocated_gpu_seconds"] for r in rows) == MINUTES * 60 * len(CLUSTERS)
    assert [r.key for r in mfu.mfu_by_scope(store, "tenant").rows] == sorted(HOSTILE)
    jobs = {f"{g.tenant}/{g.job}" for r in stored["via-json"] for g in r.gpus}
    assert {r.key for r in mfu.mfu_by_scope(store, "job").rows} == jobs
    nodes = {f"{r.cluster}/{r.node}" for rs in stored.values() for r in rs}
    assert {r.key for r in mfu.mfu_by_scope(store, "node").rows} == nodes
    models = {g.model for r in stored["via-json"] for g in r.gpus}
    assert {m["model"] for m in mfu.mfu_by_scope(store, "fleet").unknown_models} == models
    billable = billable_by_tenant(store, None, Policy())
    assert billable == {h: MINUTES * len(CLUSTERS) / 60 for h in HOSTILE}
    cfg = with_clickhouse(Config(), ch_target.dsn, db)
    assert fleet_status(store, cfg)["tenants"] == sorted(HOSTILE)


def test_alert_labels_and_annotations_keep_the_strings(stored, ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    rules = parse_rules({"rules": [{
        "name": "GpuHeldNoProcess", "kind": "gpu_held_no_process", "severity": "warning", "for": "2m",
        "annotations": {"summary": "Tenant {tenant} holds {gpu} on {node}, job '{job}'"},
    }]})
    cfg = with_clickhouse(Config(), ch_target.dsn, db)
    last = max(r.time_ms for r in stored["via-json"])
    report_ = Evaluator(cfg, store, rules=rules).evaluate_once(last + 1000)
    assert report_.errors == []
    firing = firing_alerts(store)
    want = sorted((r.cluster, r.node, g.uuid, g.tenant) for rs in stored.values() for r in rs for g in r.gpus)
    assert sorted({(a["labels"]["cluster"], a["labels"]["node"], a["labels"]["gpu"], a["labels"]["tenant"])
                   for a in firing}) == sorted(set(want))
    for a in firing:
        lab = a["labels"]
        job = next(g.job for r in stored["via-json"] for g in r.gpus if g.tenant == lab["tenant"])
        assert a["annotations"]["summary"] == f"Tenant {lab['tenant']} holds {lab['gpu']} on {lab['node']}, job '{job}'"


def test_the_dashboard_preview_escapes_hostile_strings(stored, ch_target, tmp_path: Path) -> None:
    client = connect(Target(ch_target.dsn, ch_target.database))
    client.database = ch_target.database
    last = max(r.time_ms for r in stored["via-json"])
    page = preview.write(client, [b.to_json() for b in BOARDS], tmp_path, last - 60 * MIN, last + MIN,
                         "test").read_text(encoding="utf-8")
    for hostile in ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>'):
        assert hostile not in page
        assert html.escape(hostile, quote=True) in page  # shown, as text
    assert page.count("<script") == 1  # the preview's own one-line script, nothing injected



GRAFANA_INJECTION = (
    "Grafana's ${tenant:singlequote} (and :sqlstring) leave backslashes unescaped: through them a tenant named "
    "back\\slash\\ breaks every tenant-filtered panel, and choosing one named x\\') OR 1=1 -- selects every "
    "tenant's rows. dashboards/ therefore gives each variable the hex of the string as its value and reads it "
    "through '${tenant:percentencode}' (dashboards.fragments.selected); this test guards that."
)


def test_every_panel_runs_with_a_hostile_tenant_chosen(stored, ch_target) -> None:
    """As Grafana does: the tenant variable set to each hostile tenant, every panel's SQL rendered and run."""
    client = connect(Target(ch_target.dsn, ch_target.database))
    client.database = ch_target.database
    last = max(r.time_ms for r in stored["via-json"])
    lo, hi = last - 60 * MIN, last + MIN
    for b in BOARDS:
        board = b.to_json()
        if "tenant" not in {v["name"] for v in board["templating"]["list"] if v["type"] == "query"}:
            continue
        for hostile in HOSTILE:
            values = resolve_variables(client, board, TimeRange(lo, hi, 60_000), {"tenant": hostile})
            for q in panel_queries(board):
                result = run(client, render_sql(q.raw_sql, values, panel_range(lo, hi, q.min_interval)))
                if "tenant" in result.columns:
                    shown = {row[result.columns.index("tenant")] for row in result.rows}
                    assert shown <= {hostile}, f"{board['uid']} panel {q.panel_id} with tenant {hostile!r}: {shown}"
