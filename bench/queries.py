"""Item 4: every dashboard panel query and `gpufleet usage`, p50/p95, against the same answer from raw samples.

History: `bench.history` (at least 1,000 GPUs x 7 days at 10 s, generated inside ClickHouse). Each
board's panels run as Grafana would run them (`dashboards.queries`: variables resolved on load,
macros expanded, `$__interval` for the panel width), over the board's default time range ending at
the history's end (against raw samples too) and over the whole history (rollups only: the raw
reference over a week takes minutes per panel).

The raw reference: the same panel SQL with each rollup it reads replaced by the rollup's own
definition computed from `gpu_samples` (the materialized view's SELECT over all samples, the
panel's time filter pushed down by ClickHouse; `gpu_latest` as argMax per GPU; `usage_hourly` as
its view over that raw hourly rollup). Both answers are compared (floats to 1e-9 relative), so the
speed-up is for the same answer. Panels that already read raw samples or state tables (alerts,
dead letters, agents, billing tables) have no rollup to compare and are timed alone; panels on
`usage_hourly` are compared through `gpufleet usage` (the same view from raw samples takes minutes
per run over a week).
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import percentile

log = logging.getLogger("bench.queries")

ROLLUPS = ("gpu_usage_1m", "gpu_usage_1h", "gpu_latest", "usage_hourly", "fleet_usage_1m", "fleet_usage_1h",
           "job_usage_1h", "job_throughput_1m", "job_throughput_1h", "gpu_health_1m", "gpu_health_1h")
BOARDS = Path(__file__).resolve().parent.parent / "dashboards" / "boards"
SETTINGS = {"max_execution_time": 300, "max_memory_usage": 8_000_000_000}


def _views(client: Any, db: str) -> dict[str, str]:
    """Rollup table (or view) name -> the SELECT that defines its content."""
    out = {}
    for name, engine, as_select, create in client.query(
        "SELECT name, engine, as_select, create_table_query FROM system.tables WHERE database = {db:String}",
        parameters={"db": db},
    ).result_rows:
        if engine == "MaterializedView":
            target = re.search(r"\bTO\s+([\w.`]+)", create)
            if target:
                out[target.group(1).replace("`", "").split(".")[-1]] = as_select
        elif engine == "View":
            out[name] = as_select
    return out


def raw_sources(client: Any, db: str, from_ms: int, to_ms: int) -> dict[str, str]:
    """Each rollup's content computed from raw samples, for a panel over [from_ms, to_ms]."""
    views = _views(client, db)
    del from_ms, to_ms  # no pruning by the panel's range: some panels read beyond it ("this period")
    minute = views["gpu_usage_1m"]
    hour = views["gpu_usage_1h"].replace(f"{db}.gpu_usage_1m", f"({minute}) AS gpu_usage_1m")
    columns = re.search(r"SELECT\s+(.*?)\s+FROM", views["gpu_latest"], re.S)
    latest_cols = [c.strip() for c in columns.group(1).split(",")] if columns else []
    latest = "SELECT " + ", ".join(
        "s.gpu_uuid AS gpu_uuid" if c == "gpu_uuid" else
        ("max(s.time) AS time" if c == "time" else f"argMax(s.{c}, s.time) AS {c}")
        for c in latest_cols) + f" FROM {db}.gpu_samples AS s GROUP BY s.gpu_uuid"
    usage = views["usage_hourly"].replace(f"{db}.gpu_usage_1h", f"({hour})").replace(
        f"{db}.gpu_usage_1m", f"({minute})")  # its outranked claims (gpu_claim_outranked) stay the view
    fleet_minute = views["fleet_usage_1m"].replace(f"{db}.gpu_usage_1m", f"({minute})")
    health_minute = views["gpu_health_1m"]
    return {"gpu_usage_1m": minute, "gpu_usage_1h": hour, "gpu_latest": latest, "usage_hourly": usage,
            "fleet_usage_1m": fleet_minute,
            "fleet_usage_1h": views["fleet_usage_1h"].replace(f"{db}.fleet_usage_1m", f"({fleet_minute})"),
            "job_usage_1h": views["job_usage_1h"].replace(f"{db}.gpu_usage_1m", f"({minute})"),
            "job_throughput_1m": views["job_throughput_1m"],
            "job_throughput_1h": views["job_throughput_1h"].replace(f"{db}.job_throughput_1m",
                                                                    f"({views['job_throughput_1m']})"),
            "gpu_health_1m": health_minute,
            "gpu_health_1h": views["gpu_health_1h"].replace(f"{db}.gpu_health_1m", f"({health_minute})")}


_FROM = re.compile(r"\b(FROM|JOIN)\s+(?:\w+\.)?(" + "|".join(ROLLUPS) + r")\b(\s+FINAL\b)?(\s+AS\s+\w+)?", re.I)


def as_raw(sql: str, sources: dict[str, str]) -> tuple[str, list[str]]:
    """`sql` reading raw samples instead of rollups, and which rollups it read."""
    used: list[str] = []

    def swap(m: re.Match[str]) -> str:
        used.append(m.group(2))
        alias = m.group(4) or f" AS {m.group(2)}"
        return f"{m.group(1)} ({sources[m.group(2)]}){alias}"

    return _FROM.sub(swap, sql), used


def _timed(client: Any, sql: str, runs: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = client.query(sql, settings=SETTINGS).result_rows
        times.append((time.perf_counter() - t) * 1000)
    return times, result


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _sorted(rows: list[Any]) -> list[Any]:
    return sorted(rows, key=lambda r: json.dumps(r, default=str, sort_keys=True))


def run_boards(client: Any, db: str, end_ms: int, span_ms: int | None, runs: int = 5,
               raw_runs: int = 1) -> list[dict[str, Any]]:
    """Every panel of every board over [end - span (the board's default when None), end]; against
    raw samples too when `raw_runs`."""
    from gpufleet.dashboards.macros import TimeRange, go_duration_seconds, render
    from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables

    out = []
    for path in sorted(BOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        if span_ms is None:
            default = board.get("time", {}).get("from", "now-6h")
            text = default.removeprefix("now-")
            days = text.endswith("d") and text[:-1].isdigit()  # Grafana's range syntax has d, Go's durations not
            span = int(text[:-1]) * 86_400_000 if days else int(go_duration_seconds(text) * 1000)
        else:
            span = span_ms
        whole = TimeRange(end_ms - span, end_ms, 60_000)
        variables = resolve_variables(client, board, whole)
        sources = raw_sources(client, db, end_ms - span, end_ms)
        for q in panel_queries(board):
            sql = render(q.raw_sql, variables, panel_range(end_ms - span, end_ms, q.min_interval))
            row: dict[str, Any] = {"board": board["uid"], "panel": q.panel_title, "ref": q.ref_id,
                                   "range_ms": span}
            try:
                _timed(client, sql, 1)
                times, answer = _timed(client, sql, runs)
            except Exception as exc:
                row["error"] = str(exc).splitlines()[0][:300]
                out.append(row)
                continue
            row.update(p50_ms=statistics.median(times), p95_ms=percentile(times, 95), rows=len(answer))
            raw_sql, used = as_raw(sql, sources)
            row["reads"] = sorted(set(used))
            if "usage_hourly" in used:
                row["raw"] = "see usage: the same view from raw samples takes minutes"
            elif used and raw_runs:
                try:
                    raw_times, raw_answer = _timed(client, raw_sql, raw_runs)
                    row.update(raw_p50_ms=statistics.median(raw_times), raw_p95_ms=percentile(raw_times, 95),
                               speedup_p50=statistics.median(raw_times) / max(row["p50_ms"], 1e-6),
                               answers_equal=_same(_sorted(answer), _sorted(raw_answer)))
                except Exception as exc:
                    row["raw_error"] = str(exc).splitlines()[0][:300]
            out.append(row)
    return out


def run_usage(client: Any, db: str, start_ms: int, end_ms: int, runs: int = 5, raw_runs: int = 1) -> dict[str, Any]:
    """`gpufleet usage` for the whole history (`pipeline.usage.usage_rows`: the stored rows, refreshed by the
    first call), the view it read before (`usage_hourly`), and its raw equivalent; all must agree."""
    from gpufleet.pipeline.queries.usage import USAGE_COLUMNS, usage_rows
    from gpufleet.pipeline.queries.window import iso
    from gpufleet.pipeline.store import Store

    store = Store(client, db)
    times = []
    rows: list[Any] = []
    usage_rows(store, start_ms, end_ms)
    for _ in range(runs):
        t = time.perf_counter()
        rows = usage_rows(store, start_ms, end_ms)
        times.append((time.perf_counter() - t) * 1000)
    sources = raw_sources(client, db, start_ms, end_ms)
    raw_sql = (f"SELECT {', '.join(USAGE_COLUMNS)} FROM ({sources['usage_hourly']}) "
               f"WHERE hour >= toDateTime(intDiv({start_ms}, 3600000) * 3600, 'UTC') "
               f"AND hour < toDateTime(intDiv({end_ms}, 1000), 'UTC') ORDER BY hour, tenant, gpu_model")
    raw_times, raw_rows = _timed(client, raw_sql, raw_runs)
    view_sql = (f"SELECT {', '.join(USAGE_COLUMNS)} FROM {db}.usage_hourly "
                f"WHERE hour >= toDateTime(intDiv({start_ms}, 3600000) * 3600, 'UTC') "
                f"AND hour < toDateTime(intDiv({end_ms}, 1000), 'UTC') ORDER BY hour, tenant, gpu_model")
    view_times, view_rows = _timed(client, view_sql, raw_runs)
    stored = [tuple(r.values()) for r in rows]
    viewed = [(iso(v[0]), *(None if isinstance(x, float) and math.isnan(x) else x for x in v[1:])) for v in view_rows]
    return {"rows": len(rows), "p50_ms": statistics.median(times), "p95_ms": percentile(times, 95),
            "raw_p50_ms": statistics.median(raw_times), "raw_p95_ms": percentile(raw_times, 95),
            "speedup_p50": statistics.median(raw_times) / max(statistics.median(times), 1e-6),
            # the view over the per-GPU rollups: what `gpufleet usage` read before the stored rows (0090)
            "view_p50_ms": statistics.median(view_times),
            "answers_equal": _same(_sorted(view_rows), _sorted(raw_rows)) and _same(stored, viewed)}


def run(dsn: str, gpus: int = 1000, days: float = 7.0, runs: int = 5, raw_runs: int = 1) -> dict[str, Any]:
    from bench import history
    from gpufleet.config import BillingConfig
    from gpufleet.pipeline.queries.policy import sync_policy
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.client import Target, connect
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

    db = f"bench_queries_{uuid.uuid4().hex[:8]}"
    admin = connect(Target(dsn, "default"), create=True)
    migrate(admin, SchemaOptions(database=db))
    try:
        log.info("generating %d GPUs x %g days", gpus, days)
        gen = history.generate(admin, db, gpus=gpus, days=days)
        sync_policy(Store(admin, db), BillingConfig(), gen["start_ms"])
        client = connect(Target(dsn, db))
        client.database = db  # unqualified table names, as the Grafana datasource's default database
        log.info("history: %d rows in %.0f s; default ranges", gen["rows"], gen["seconds"])
        default = run_boards(client, db, gen["end_ms"], None, runs, raw_runs)
        log.info("default ranges done; whole history")
        week = run_boards(client, db, gen["end_ms"], gen["end_ms"] - gen["start_ms"], 2, 0)
        log.info("whole history done; gpufleet usage")
        usage = run_usage(client, db, gen["start_ms"], gen["end_ms"], runs, raw_runs)
    finally:
        admin.command(f"DROP DATABASE IF EXISTS {db} SYNC")
    panels = [p for p in default + week if "p95_ms" in p]
    compared = [p for p in panels if "speedup_p50" in p]
    aggregated = [p for p in compared if set(p["reads"]) & (set(ROLLUPS) - {"gpu_latest"})]
    return {
        "history": gen,
        "panels_default_range": default,
        "panels_whole_history": week,
        "usage": usage,
        "panel_count": len({(p["board"], p["panel"], p["ref"]) for p in default}),
        "errors": [p for p in default + week if "error" in p or "raw_error" in p],
        "worst_p95_ms": max((p["p95_ms"] for p in panels), default=None),
        "min_speedup_vs_raw": min((p["speedup_p50"] for p in aggregated), default=None),
        "median_speedup_vs_raw": statistics.median([p["speedup_p50"] for p in aggregated]) if aggregated else None,
        "min_speedup_latest_state_panels": min((p["speedup_p50"] for p in compared if p not in aggregated),
                                               default=None),
        "answers_all_equal": all(p.get("answers_equal") for p in compared) and usage["answers_equal"],
        "target_p95_ms": 200,
        "target_speedup": 20,
    }
