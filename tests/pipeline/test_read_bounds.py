"""What the read side reads, in rows (ClickHouse's own `rows_read`, deterministic: no timing).

- Narrow questions are bounded by their key: every panel of the GPU board for one GPU, of the health
  and fleet boards for one node, and one job's rows, read about the same rows in a fleet of 32 GPUs
  and in one of 256 (issue 12 item 4).
- One alert-evaluation cycle of every default rule reads the same rows whether the store holds one
  day of history or three (item 5): it reads the last minutes and the small latest-state tables.

History comes from `bench.history` (generated inside ClickHouse, every view filling as in
production), one day at 10 s.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench import history
from gpufleet.dashboards import build
from gpufleet.dashboards.macros import TimeRange, render
from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables
from gpufleet.pipeline.alerts.queries import build as build_rule_query
from gpufleet.pipeline.alerts.rules import load_rules
from gpufleet.pipeline.queries import rollups
from gpufleet.pipeline.store.client import Target, connect
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

DAY_MS = 86_400_000
GRANULE = 8192
"""MergeTree's index_granularity: ClickHouse reads whole granules."""


@dataclass(frozen=True)
class History:
    client: Any
    """A client whose default database is the history's (as Grafana's datasource)."""
    database: str
    start_ms: int
    end_ms: int
    gpus: int


def _agent_reports(client: Any, db: str, nodes: int, start_ms: int, end_ms: int, interval_ms: int) -> None:
    """One agent report per node and interval (the generator writes GPU samples only)."""
    n = (end_ms - start_ms) // interval_ms
    client.command(
        f"INSERT INTO {db}.agent_reports (time, ingest_time, cluster, node, boot_id, seq, interval_ms, gpus, "
        "collect_seconds, nvml_errors, spool_depth, spool_dropped_total, send_errors_total, "
        "otlp_points_accepted_total, otlp_points_rejected_total) "
        f"SELECT fromUnixTimestamp64Milli(toInt64({start_ms} + (intDiv(number, {nodes}) + 1) * {interval_ms}), 'UTC'), "
        f"fromUnixTimestamp64Milli(toInt64({start_ms} + (intDiv(number, {nodes}) + 1) * {interval_ms} + 700), 'UTC'), "
        "'bench', concat('node-', leftPad(toString(number % " + str(nodes) + "), 4, '0')), 'boot-1', "
        f"intDiv(number, {nodes}), {interval_ms}, 8, 0.01, 0, 0, 0, 0, 0, 0 FROM numbers({n * nodes})")


def _inventory(client: Any, db: str) -> None:
    """Each GPU's inventory every 300 s (`agent.nvml_inventory_every_s`), as `gpu_inventory_mv` writes it from
    the samples that carry one (the generator's samples carry none)."""
    client.command(
        f"INSERT INTO {db}.gpu_inventory SELECT gpu_uuid, time, cluster, node, model, concat('S-', gpu_uuid), "
        f"'96.00.89.00.01', '580.95.05', true, true FROM {db}.gpu_samples WHERE toUnixTimestamp(time) % 300 = 0")


def _history(chdb_dsn: str, admin: Any, gpus: int, days: int, end_ms: int) -> Iterator[History]:
    db = f"t_{uuid.uuid4().hex[:12]}"
    migrate(admin, SchemaOptions(database=db, raw_ttl_days=3650))
    start = end_ms - days * DAY_MS
    history.generate(admin, db, gpus=gpus, days=days, start_ms=start)
    _agent_reports(admin, db, gpus // 8, start, end_ms, 10_000)
    _inventory(admin, db)
    for table in ("gpu_samples", "agent_reports", "node_latest", "gpu_usage_1m", "fleet_usage_1m", "gpu_inventory"):
        admin.command(f"OPTIMIZE TABLE {db}.{table} FINAL")  # one part per partition: the same layout every run
    client = connect(Target(chdb_dsn, db))
    client.database = db
    yield History(client, db, start, end_ms, gpus)
    admin.command(f"DROP DATABASE IF EXISTS {db} SYNC")


END_MS = history.T0_MS - history.T0_MS % DAY_MS + 3 * DAY_MS


@pytest.fixture(scope="module")
def small(chdb_dsn: str, ch_client: Any) -> Iterator[History]:
    yield from _history(chdb_dsn, ch_client, 32, 1, END_MS)


@pytest.fixture(scope="module")
def large(chdb_dsn: str, ch_client: Any) -> Iterator[History]:
    yield from _history(chdb_dsn, ch_client, 256, 1, END_MS)


def rows_read(client: Any, sql: str, parameters: dict[str, Any] | None = None) -> int:
    """ClickHouse's `rows_read` for one query (its JSON output's statistics)."""
    out = json.loads(client.raw_query(sql + "\nFORMAT JSON", parameters=parameters))
    return int(out["statistics"]["rows_read"])


def _board(uid: str) -> dict[str, Any]:
    return json.loads((build.ROOT / build.BOARDS_DIR / f"{uid}.json").read_text())


_TABLE_READ = re.compile(r"\bFROM\s+[a-z_]", re.IGNORECASE)


def panel_reads(h: History, uid: str, chosen: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Rows read by each panel of board `uid` over the whole history, with the variables `chosen` (by text),
    and how many table reads its SQL has."""
    board = _board(uid)
    variables = resolve_variables(h.client, board, TimeRange(h.start_ms, h.end_ms, 60_000), chosen)
    out = {}
    for q in panel_queries(board):
        sql = render(q.raw_sql, variables, panel_range(h.start_ms, h.end_ms, q.min_interval))
        out[f"{q.panel_title}/{q.ref_id}"] = (rows_read(h.client, sql), len(_TABLE_READ.findall(sql)))
    return out


def _table_rows(h: History, table: str) -> int:
    return int(h.client.query(f"SELECT count() FROM {table}").result_rows[0][0])


NARROW = {
    # board -> the variables that make it one GPU's or one node's
    "gpufleet-gpu": {"gpu": "GPU-000005"},
    "gpufleet-health": {"node": "node-0000"},
    "gpufleet-fleet": {"node": "node-0000"},
}
WHOLE_FLEET_PANELS = {"Agents", "Ingest lag (ingest time - sample time)", "Agent spool depth and send errors",
                      "Dead-lettered messages", "Dead letters by reason"}
"""Fleet-board panels on agent_reports and dead_letters: per node, not narrowed by the node variable's key here."""


@pytest.mark.parametrize("uid", sorted(NARROW))
def test_one_gpus_or_one_nodes_panels_read_the_same_rows_in_an_eight_times_larger_fleet(
        small: History, large: History, uid: str) -> None:
    few, many = panel_reads(small, uid, NARROW[uid]), panel_reads(large, uid, NARROW[uid])
    assert _table_rows(large, "gpu_samples") == 8 * _table_rows(small, "gpu_samples")
    for panel, (rows, reads) in many.items():
        if panel.split("/")[0] in WHOLE_FLEET_PANELS:
            continue
        # the same GPU's or node's rows; each table read may take one granule more, as granule
        # boundaries fall elsewhere in the larger tables
        assert rows <= few[panel][0] + reads * GRANULE, (panel, few[panel], rows)


def test_one_jobs_rows_are_read_by_key(small: History, large: History) -> None:
    def job_reads(h: History) -> tuple[int, int]:
        tenant, job = h.client.query("SELECT tenant, job FROM job_usage_1h WHERE job != '' ORDER BY job LIMIT 1"
                                     ).result_rows[0]
        sql = ("SELECT sum(reported_ms), length(groupUniqArrayArray(gpus)) FROM "
               + rollups.rows(rollups.JOB, rollups.WINDOW_START, rollups.WINDOW_END,
                              where="tenant = {t:String} AND job = {j:String}")
               + " WHERE reported_ms > 0")
        params = {"t": tenant, "j": job, "w_start": h.start_ms + 1800_000, "w_end": h.end_ms - 1800_000}
        return rows_read(h.client, sql, params), _table_rows(h, "gpu_usage_1m")

    (few, few_total), (many, many_total) = job_reads(small), job_reads(large)
    assert many_total > 6 * few_total
    assert many <= few + 2 * GRANULE, (few, many)


# --- the alert evaluator ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_day(chdb_dsn: str, ch_client: Any) -> Iterator[History]:
    yield from _history(chdb_dsn, ch_client, 16, 1, END_MS)


@pytest.fixture(scope="module")
def three_days(chdb_dsn: str, ch_client: Any) -> Iterator[History]:
    yield from _history(chdb_dsn, ch_client, 16, 3, END_MS)


def cycle_reads(h: History) -> dict[str, int]:
    """Rows each default rule's query reads in one evaluation at the end of the history."""
    now = h.end_ms
    out = {}
    for rule in load_rules().rules:
        q = build_rule_query(rule, now)
        out[rule.name] = rows_read(h.client, q.sql, {**q.parameters, "db": h.database})
    return out


def test_an_alert_cycle_reads_the_same_rows_after_one_day_or_three(one_day: History, three_days: History) -> None:
    short, long = cycle_reads(one_day), cycle_reads(three_days)
    assert _table_rows(three_days, "gpu_samples") == 3 * _table_rows(one_day, "gpu_samples")
    assert set(short) == set(long)
    for name in short:
        # the last day's rows are laid out alike in both stores; the monthly rollup parts differ by
        # where their granules start, so a rule may read one granule more
        assert long[name] <= short[name] + GRANULE, (name, short[name], long[name])
    # and, the job kinds aside, a cycle reads less than a day of samples: the last minutes and the
    # latest-state tables. JobStalled and JobStraggler read their window of every GPU's raw samples
    # (pipeline/queries/job_signals.py): whole granules per GPU, at 10 s about a day per GPU.
    per_gpu_and_fleet = {name: rows for name, rows in long.items() if not name.startswith("Job")}
    # NodeConfigDrift reads each GPU's newest inventory (gpu_inventory, a row per GPU once merged), not the
    # window of every sample: twice, as its `latest` CTE is read for the majority and for the nodes
    assert long["NodeConfigDrift"] == short["NodeConfigDrift"] == 2 * three_days.gpus, long
    assert sum(per_gpu_and_fleet.values()) < _table_rows(one_day, "gpu_samples") // 2 + 10 * GRANULE, long
