"""Item 7, the read path at fleet scale (issue 12): `python -m bench.run --only read_path`.

Histories are generated inside ClickHouse (bench/history.py), one database each: **main** (1,000
GPUs x 7 days at 10 s: every board panel at its default range and over the history, `gpufleet
usage`, one alert cycle, `equal_to_raw`), **month** (30 days at 5 min, for `gpufleet usage` over
30 days), **growth** (250, 1,000, 4,000 GPUs x 1 day: the same questions; VictoriaMetrics side by
side at 1,000) and **ingest** (bench/ingest.py's throughput and the views' share of the insert).
Every loop is bounded by count and time (bench/timing.py); growth ratios floor both p95s at
`GROWTH_FLOOR_MS`. BENCHMARKS.md item 7 says how each figure is taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.panels import Panel, expanded, time_panels
from bench.timing import Limits, measure

log = logging.getLogger("bench.read_path")

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
TARGET_P95_MS = 200.0
TARGET_GROWTH = 1.5
GROWTH_FLOOR_MS = 10.0
PEER_SPANS_MS = (6 * HOUR_MS, None)
"""The peer questions over the fleet board's default range and over the whole history (None)."""
ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "bench" / "read_path_growth.png"


@dataclass(frozen=True)
class Sizes:
    gpus: int = 1000
    days: float = 7.0
    interval_ms: int = 10_000
    month_days: float = 30.0
    month_interval_ms: int = 300_000
    growth_gpus: tuple[int, ...] = (250, 1000, 4000)
    growth_days: float = 1.0
    peer_gpus: int | None = 1000
    """Which growth size VictoriaMetrics loads; None: no peer."""
    ingest_messages: int = 20_000
    """Messages through the broker and the real ingester; 0: not measured."""
    views_messages: int = 15_000
    panels: Limits = field(default_factory=lambda: Limits(runs=20, budget_s=4.0))
    """20 timed runs of a query within 200 ms (a meaningful p95); slower ones stop after 4 s (over target anyway)."""
    long_panels: Limits = field(default_factory=lambda: Limits(runs=20, budget_s=4.0))
    calls: Limits = field(default_factory=lambda: Limits(runs=20, budget_s=6.0))


TINY = Sizes(gpus=8, days=1 / 24, month_days=4 / 24, growth_gpus=(8, 16, 32), growth_days=1 / 24, peer_gpus=16,
             ingest_messages=0, views_messages=300, panels=Limits(2, 1.0), long_panels=Limits(1, 1.0),
             calls=Limits(2, 1.0))
"""8 GPUs x 1 hour: for the test that proves the harness works (figures meaningless)."""

QUICK = Sizes(gpus=200, days=1.0, month_days=7.0, growth_gpus=(100, 200, 400), growth_days=0.25, peer_gpus=200,
              ingest_messages=4000, views_messages=3000, panels=Limits(3, 1.0), long_panels=Limits(2, 1.0),
              calls=Limits(3, 2.0))
"""`--quick`: to try the item (figures not comparable)."""


@dataclass(frozen=True)
class History:
    client: Any
    """A client whose default database is the history's (as the Grafana datasource's defaultDatabase)."""
    db: str
    gen: dict[str, Any]

    @property
    def store(self) -> Any:
        """The pipeline's handle on the history's database (what the read functions take)."""
        from gpufleet.pipeline.store import Store

        return Store(self.client, self.db)

    @property
    def start_ms(self) -> int:
        return int(self.gen["start_ms"])

    @property
    def end_ms(self) -> int:
        return int(self.gen["end_ms"])


@contextlib.contextmanager
def history(admin: Any, dsn: str, gpus: int, days: float, interval_ms: int, end_ms: int) -> Iterator[History]:
    """A fresh database holding `gpus` x `days` ending at `end_ms` (TTL far enough for old fixed dates)."""
    from bench import history as gen_history
    from gpufleet.config import BillingConfig
    from gpufleet.pipeline.queries.policy import sync_policy
    from gpufleet.pipeline.queries.usage import refresh
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.client import Target, connect
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

    db = f"bench_read_{uuid.uuid4().hex[:8]}"
    migrate(admin, SchemaOptions(database=db, raw_ttl_days=3650))
    try:
        start_ms = end_ms - int(days * DAY_MS)
        log.info("generating %d GPUs x %g days at %d s", gpus, days, interval_ms // 1000)
        gen = gen_history.generate(admin, db, gpus=gpus, days=days, interval_ms=interval_ms, start_ms=start_ms)
        expected = gpus * int(days * DAY_MS / interval_ms)
        if gen["rows"] != expected:  # e.g. a TTL that expires the fixed historical dates
            raise RuntimeError(f"history holds {gen['rows']} samples, expected {expected}")
        sync_policy(Store(admin, db), BillingConfig(), gen["start_ms"])
        refresh(Store(admin, db))  # the stored usage the ingester keeps current after each batch
        gen["merges"] = settle(admin, db)
        client = connect(Target(dsn, db))
        client.database = db
        yield History(client, db, gen)
    finally:
        admin.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def settle(admin: Any, db: str, timeout_s: float = 300.0, quiet_s: float = 5.0) -> dict[str, Any]:
    """Wait (bounded) until the background merges of the fresh inserts have finished, so that queries are
    timed on the parts a steady-state store has, not against merges competing for the same cores.

    Quiet means no merge running in `db` and its set of active parts unchanged for `quiet_s`: the merge
    selector starts the next merge a moment after one ends (and after an insert), so one poll seeing none
    running is not the end of them (measured: merges of the rollups landing seconds after such a poll)."""
    started = time.perf_counter()
    state_sql = ("SELECT (SELECT count() FROM system.merges WHERE database = {db:String}), "
                 "(SELECT (count(), sum(cityHash64(table, name))) FROM system.parts "
                 " WHERE database = {db:String} AND active)")
    last: Any = None
    quiet_since = started
    running = 1
    while time.perf_counter() - started < timeout_s:
        running, parts = admin.query(state_sql, parameters={"db": db}).result_rows[0]
        now = time.perf_counter()
        if running or parts != last:
            last, quiet_since = parts, now
        elif now - quiet_since >= quiet_s:
            break
        time.sleep(0.5)
    parts = admin.query("SELECT count() FROM system.parts WHERE database = {db:String} AND table = 'gpu_samples' "
                        "AND active", parameters={"db": db}).result_rows[0][0]
    return {"waited_s": round(time.perf_counter() - started, 1), "still_running": int(running),
            "gpu_samples_parts": int(parts)}


# --- the read functions, as the CLI and the evaluator call them ---------------------------------


def usage(h: History, limits: Limits) -> dict[str, Any]:
    """`gpufleet usage` over the whole history."""
    from gpufleet.pipeline.queries.usage import usage_rows

    figures, rows = measure(lambda: usage_rows(h.store, h.start_ms, h.end_ms), limits)
    return {**figures, "rows": len(rows), "range_h": round((h.end_ms - h.start_ms) / HOUR_MS, 2)}


def alert_cycle(h: History, dsn: str, limits: Limits) -> dict[str, Any]:
    """One evaluation of every default rule, at the history's end and on (the evaluator's state kept)."""
    from gpufleet.config import parse
    from gpufleet.pipeline.alerts.evaluator import Evaluator

    evaluator = Evaluator(parse({"clickhouse": {"dsn": dsn, "database": h.db}}), h.store)
    evaluator.evaluate_once(h.end_ms)  # loads the (empty) alert state: not a cycle
    step = iter(range(1, 1_000_000))

    def cycle() -> Any:
        report = evaluator.evaluate_once(h.end_ms + 1000 * next(step))
        if report.errors:
            raise RuntimeError(f"alert evaluation failed: {report.errors[:3]}")
        return report

    figures, report = measure(cycle, limits)
    return {**figures, "rules": len(evaluator.rules.rules), "firing": report.firing, "pending": report.pending}


# --- main history: panels, usage, alerts, equal_to_raw --------------------------------------------


def _panel_lists(h: History) -> tuple[list[Panel], list[Panel]]:
    return list(expanded(h.client, h.end_ms, None)), list(expanded(h.client, h.end_ms, h.end_ms - h.start_ms))


def compare_all(h: History, panels: list[Panel]) -> list[dict[str, Any]]:
    """Every compared answer over the whole history (bench/answers.py)."""
    from bench import answers
    from bench.questions import QUESTIONS

    out = [answers.compare_question(h.client, q, panels, h.start_ms, h.end_ms) for q in QUESTIONS]
    out.append(answers.compare_usage(h.store, h.start_ms, h.end_ms, "usage per tenant-hour"))
    out.append(answers.compare_mfu(h.store, h.start_ms, h.end_ms))
    for c in out:
        log.info("equal to raw: %s %s (raw %.1f s)", c["question"], c["equal"], c["raw_seconds"])
    return out


def main_history(admin: Any, dsn: str, s: Sizes) -> dict[str, Any]:
    end_ms = _end_ms(s.days)
    with history(admin, dsn, s.gpus, s.days, s.interval_ms, end_ms) as h:
        default, whole = _panel_lists(h)
        log.info("main: %d panels at their default range", len(default))
        out: dict[str, Any] = {"history": h.gen, "panels_default_range": time_panels(h.client, default, s.panels)}
        log.info("main: the same over the whole history")
        out["panels_whole_history"] = time_panels(h.client, whole, s.long_panels)
        out["usage"] = usage(h, s.calls)
        out["alert_cycle"] = alert_cycle(h, dsn, s.calls)
        out["compared"] = compare_all(h, whole)
    return out


def month_history(admin: Any, dsn: str, s: Sizes) -> dict[str, Any]:
    from bench import answers

    with history(admin, dsn, s.gpus, s.month_days, s.month_interval_ms, _end_ms(s.days)) as h:
        return {"history": h.gen, "usage": usage(h, s.calls),
                "compared": [answers.compare_usage(h.store, h.start_ms, h.end_ms, "usage per tenant-hour (month)")]}


def _end_ms(days: float) -> int:
    """Every history ends where the main one does: a fixed day boundary after bench.common.T0_MS."""
    from bench.common import T0_MS

    return T0_MS - T0_MS % DAY_MS + int(days * DAY_MS)


# --- growth and the peer -------------------------------------------------------------------------


def growth_size(admin: Any, dsn: str, s: Sizes, gpus: int, workdir: Path) -> dict[str, Any]:
    """The same questions at one size; the peer comparison when this is the peer's size."""
    with history(admin, dsn, gpus, s.growth_days, s.interval_ms, _end_ms(s.growth_days)) as h:
        default, whole = _panel_lists(h)
        out: dict[str, Any] = {
            "history": h.gen,
            "panels": time_panels(h.client, default, s.panels) + time_panels(h.client, whole, s.long_panels),
            "usage": usage(h, s.calls), "alert_cycle": alert_cycle(h, dsn, s.calls)}
        if gpus == s.peer_gpus:
            from bench import peer

            out["peer"] = peer.compare(h, workdir / f"vm-{uuid.uuid4().hex[:6]}", s.panels)
    return out


def growth_table(sizes: tuple[int, ...], per_size: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per question: its p95 at each size and the ratio from the middle size to the largest."""
    rows: dict[str, dict[str, Any]] = {}

    def add(key: str, scope: str, gpus: int, p95: float | None) -> None:
        rows.setdefault(key, {"question": key, "scope": scope, "p95_ms": {}})["p95_ms"][str(gpus)] = p95

    for gpus in sizes:
        r = per_size[gpus]
        for p in r["panels"]:
            add(f"{p['board']}/{p['panel']}/{p['ref']} @{p['range_h']:g}h", p["scope"], gpus, p.get("p95_ms"))
        add("gpufleet usage", "fleet", gpus, r["usage"]["p95_ms"])
        add("alert cycle", "fleet", gpus, r["alert_cycle"]["p95_ms"])
    mid, top = str(sizes[-2]), str(sizes[-1])
    for row in rows.values():
        a, b = row["p95_ms"].get(mid), row["p95_ms"].get(top)
        if a is not None and b is not None:
            row["ratio"] = round(max(b, GROWTH_FLOOR_MS) / max(a, GROWTH_FLOOR_MS), 3)
            row["ratio_unfloored"] = round(b / a, 3) if a > 0 else None
    return list(rows.values())


def growth(admin: Any, dsn: str, s: Sizes, workdir: Path) -> dict[str, Any]:
    per_size = {}
    for gpus in s.growth_gpus:
        log.info("growth: %d GPUs", gpus)
        per_size[gpus] = growth_size(admin, dsn, s, gpus, workdir)
    table = growth_table(s.growth_gpus, per_size)
    errors = [f"{g} GPUs: {p['board']}/{p['panel']}: {p['error']}" for g in s.growth_gpus
              for p in per_size[g]["panels"] if "error" in p]
    out: dict[str, Any] = {"sizes": list(s.growth_gpus), "days": s.growth_days, "floor_ms": GROWTH_FLOOR_MS,
                           "table": table, "errors": errors,
                           "histories": {str(g): per_size[g]["history"] for g in s.growth_gpus},
                           "usage": {str(g): per_size[g]["usage"] for g in s.growth_gpus},
                           "alert_cycle": {str(g): per_size[g]["alert_cycle"] for g in s.growth_gpus}}
    for g in s.growth_gpus:
        if "peer" in per_size[g]:
            out["peer"] = per_size[g]["peer"]
    return out


# --- ingest ----------------------------------------------------------------------------------------


def ingest(admin: Any, dsn: str, s: Sizes, workdir: Path) -> dict[str, Any]:
    from bench import ingest as item
    from bench.common import fleet_messages

    out: dict[str, Any] = {"views": item.views_cost(admin, fleet_messages(s.views_messages))}
    if s.ingest_messages:
        r = item.run(messages=s.ingest_messages, workdir=workdir / "ingest", dsn=dsn, variants=("optimized",))
        out.update(messages=r["messages"], gpu_samples_per_s=r["gpu_samples_per_s"],
                   ratio_to_raw_consume=r["ratio_to_raw_consume"],
                   raw_consume_gpu_samples_per_s=r["raw_consume"]["gpu_samples_per_s"],
                   clickhouse_insert=r["clickhouse_insert"])
    return out


# --- the item ----------------------------------------------------------------------------------------


def _worst(rows: list[dict[str, Any]], key: str = "p95_ms") -> dict[str, Any] | None:
    timed = [r for r in rows if r.get(key) is not None]
    return max(timed, key=lambda r: r[key]) if timed else None


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """The headline keys of `read_path` in results.json."""
    main = out["main"]
    panels = main["panels_default_range"] + main["panels_whole_history"]
    worst = _worst(panels)
    compared = main["compared"] + out["month"]["compared"]
    table = out["growth"]["table"]
    fleet = _worst([r for r in table if r["scope"] == "fleet"], "ratio")
    one = _worst([r for r in table if r["scope"] == "one_gpu"], "ratio")
    peer = out["growth"].get("peer")
    return {
        "worst_panel_p95_ms": worst["p95_ms"] if worst else None,
        "worst_panel": f"{worst['board']}/{worst['panel']} @{worst['range_h']:g}h" if worst else None,
        "panels_over_target": sorted({f"{p['board']}/{p['panel']}" for p in panels
                                      if p.get("p95_ms", 0) > TARGET_P95_MS}),
        "panel_errors": [f"{p['board']}/{p['panel']}: {p['error']}" for p in panels if "error" in p]
        + out["growth"]["errors"],
        "usage_7d_p95_ms": main["usage"]["p95_ms"],
        "usage_30d_p95_ms": out["month"]["usage"]["p95_ms"],
        "alert_cycle_p95_ms": main["alert_cycle"]["p95_ms"],
        "equal_to_raw": all(c["equal"] for c in compared),
        "growth_1k_to_4k_worst": fleet["ratio"] if fleet else None,
        "growth_1k_to_4k_worst_question": fleet["question"] if fleet else None,
        "growth_one_gpu_worst": one["ratio"] if one else None,
        "growth_one_gpu_worst_question": one["question"] if one else None,
        "peer": peer["summary"] if peer else None,
        "target_p95_ms": TARGET_P95_MS,
        "target_growth": TARGET_GROWTH,
    }


def run(dsn: str, workdir: Path, sizes: Sizes | None = None, plot: Path | None = PLOT) -> dict[str, Any]:
    """The whole item; `sizes` default to issue 12's (TINY for a quick proof that it works)."""
    from gpufleet.pipeline.store.client import Target, connect

    s = sizes or Sizes()
    admin = connect(Target(dsn, "default"), create=True)
    started = time.perf_counter()
    out: dict[str, Any] = {"sizes": _sizes_dict(s)}
    for name, step in (("main", lambda: main_history(admin, dsn, s)), ("month", lambda: month_history(admin, dsn, s)),
                       ("growth", lambda: growth(admin, dsn, s, workdir)),
                       ("ingest", lambda: ingest(admin, dsn, s, workdir))):
        t = time.perf_counter()
        out[name] = step()
        out[name]["seconds"] = round(time.perf_counter() - t, 1)
        log.info("%s done in %.0f s (%.0f s so far)", name, out[name]["seconds"], time.perf_counter() - started)
    out.update(summary(out))
    if plot is not None:
        from bench import plot as plotting

        plotting.growth_png(out["growth"], plot)
        out["plot"] = str(plot.relative_to(ROOT)) if plot.is_relative_to(ROOT) else str(plot)
    return out


def _sizes_dict(s: Sizes) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in d.items()}
