"""gpufleet against VictoriaMetrics on the same samples: the shared questions side by side, and storage.

Each question of bench/questions.py runs on both, in the same run, over the fleet board's default
range (6 h) and over the whole history: gpufleet's panel SQL (or bench query) on ClickHouse, and
the question's MetricsQL on VictoriaMetrics with the same step as the panel's `$__interval` (a
range query) or as an instant query at the range's end. Both are timed with the same limits.
Storage: VictoriaMetrics' bytes on disk per sample after a flush and a forced merge; beside it,
ClickHouse's bytes for the same four counters (their columns in `gpu_samples` after
`OPTIMIZE ... FINAL`) and for the whole row with every counter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.timing import Limits, measure

FOUR_COLUMNS = ("util_gpu_ratio", "power_w", "energy_j", "health")
"""The `gpu_samples` columns holding what the four VictoriaMetrics series hold."""


def _promql(template: str, step_s: int, range_s: int) -> str:
    return template.replace("$step", f"{step_s}s").replace("$range", f"{range_s}s")


def side_by_side(h: Any, vm: Any, span_ms: int, limits: Limits) -> list[dict[str, Any]]:
    """Every shared question over [end - span, end] on both stores."""
    from bench.answers import question_sql
    from bench.panels import SETTINGS, expanded
    from bench.questions import QUESTIONS
    from bench.victoria import VictoriaError
    from gpufleet.dashboards.queries import panel_range

    start, end = h.end_ms - span_ms, h.end_ms
    panels = list(expanded(h.client, end, span_ms))
    out = []
    for q in QUESTIONS:
        if q.promql is None:  # no dcgm-exporter series answers it
            continue
        sql, interval = question_sql(q, panels, start, end)
        step_s = panel_range(start, end, interval).interval_ms // 1000
        promql = _promql(q.promql, step_s, span_ms // 1000)
        ours, _ = measure(lambda sql=sql: h.client.query(sql, settings=SETTINGS).result_rows, limits)
        if q.instant:
            theirs, result = measure(lambda p=promql: vm.query(p, end / 1000), limits)
        else:
            theirs, result = measure(lambda p=promql, s=step_s: vm.query_range(p, start / 1000, end / 1000, s), limits)
        if not result:
            raise VictoriaError(f"VictoriaMetrics returned nothing for {q.name!r}: {promql}")
        out.append({"question": q.name, "range_h": round(span_ms / 3_600_000, 2), "promql": promql,
                    "gpufleet": ours, "victoriametrics": theirs,
                    "ratio": round(ours["p95_ms"] / max(theirs["p95_ms"], 1e-3), 3)})
    return out


def clickhouse_storage(h: Any) -> dict[str, Any]:
    """`gpu_samples` merged into one part per partition; bytes of the four columns and of whole rows."""
    h.client.command(f"OPTIMIZE TABLE {h.db}.gpu_samples FINAL")
    rows, row_bytes = h.client.query(
        "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE database = {db:String} "
        "AND table = 'gpu_samples' AND active", parameters={"db": h.db}).result_rows[0]
    four = h.client.query(
        "SELECT sum(data_compressed_bytes) FROM system.columns WHERE database = {db:String} "
        "AND table = 'gpu_samples' AND has({cols:Array(String)}, name)",
        parameters={"db": h.db, "cols": list(FOUR_COLUMNS)}).result_rows[0][0]
    return {"gpu_samples_rows": int(rows), "gpu_samples_bytes": int(row_bytes), "four_columns_bytes": int(four),
            "bytes_per_value_four_columns": int(four) / (int(rows) * len(FOUR_COLUMNS)),
            "bytes_per_gpu_row_all_counters": int(row_bytes) / int(rows)}


def compare(h: Any, data_dir: Path, limits: Limits) -> dict[str, Any]:
    """Load VictoriaMetrics with `h`'s samples, then the questions side by side and storage."""
    from bench import victoria
    from bench.read_path import PEER_SPANS_MS

    with victoria.VictoriaMetrics(data_dir) as vm:
        load = victoria.load(vm, h.client, h.db)
        counted = victoria.count_samples(vm, h.start_ms, h.end_ms)
        if counted != load["samples"]:
            raise victoria.VictoriaError(f"VictoriaMetrics holds {counted} samples of {load['samples']} exported")
        stored = vm.storage_bytes()
        questions = []
        for span in PEER_SPANS_MS:
            questions += side_by_side(h, vm, span or h.end_ms - h.start_ms, limits)
    ch = clickhouse_storage(h)
    vm_bytes = stored["data"] + stored["index"]
    return {
        "load": load, "victoriametrics_storage": stored, "clickhouse_storage": ch, "questions": questions,
        "summary": {
            "victoriametrics": {"worst_p95_ms": max(q["victoriametrics"]["p95_ms"] for q in questions),
                                "bytes_per_sample": vm_bytes / load["samples"], "samples": load["samples"]},
            "gpufleet": {"worst_p95_ms": max(q["gpufleet"]["p95_ms"] for q in questions),
                         "bytes_per_value_four_columns": ch["bytes_per_value_four_columns"],
                         "bytes_per_gpu_row_all_counters": ch["bytes_per_gpu_row_all_counters"]},
            "questions_at_or_below_peer": sum(q["gpufleet"]["p95_ms"] <= q["victoriametrics"]["p95_ms"]
                                              for q in questions),
            "questions": len(questions),
        },
    }
