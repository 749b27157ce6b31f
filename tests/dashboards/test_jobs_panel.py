"""The Jobs board's Jobs table on the job rollups (migration 0100), on hand-built one-minute samples: GPUs, nodes,
GPU-hours, tokens and samples per second and first/last seen worked out by hand, over whole hours (hour level),
ragged minutes (minute level) and both; a replayed batch, a late sample and the migration's backfill."""

from __future__ import annotations

from typing import Any

import pytest

from gpufleet.dashboards.macros import TimeRange, render
from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables, run
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from gpufleet.pipeline.store.migrate import SchemaOptions, available, statements
from gpufleet.wire import GpuSample
from tests.builders import gpu, report
from tests.dashboards.conftest import board_client, committed

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z
MIN = 60_000
HOUR = 3_600_000


def _train(i: int, node: str, k: int) -> GpuSample:
    """"train" (acme): 3 GPUs on n1 (2) and n2 (1); 1000 tokens and 2 samples per GPU-minute until minute 4, then 0."""
    reporting = k <= 4
    return gpu(i, node, tenant="acme", job="train", compute_processes=1, util_gpu_ratio=0.95,
               tokens_measured=1000.0 if reporting else 0.0, samples_measured=2.0 if reporting else 0.0)


def _reports() -> list[Any]:
    out = []
    for k in range(1, 11):  # samples ending at M + k minutes: claims in minutes M .. M + 9
        t = M + k * MIN
        out += [report(node="n1", seq=k, time_ms=t, interval_ms=MIN,
                       gpus=[_train(0, "n1", k), _train(1, "n1", k)]),
                report(node="n2", seq=k, time_ms=t, interval_ms=MIN, gpus=[_train(0, "n2", k)]),
                report(node="n3", seq=k, time_ms=t, interval_ms=MIN,
                       gpus=[gpu(i, "n3", tenant="beta", job="pair", util_gpu_ratio=0.5) for i in (0, 1)])]
    return out


def _panel(store: Store, chdb_dsn: str, title: str, start_ms: int, end_ms: int) -> tuple[Any, Any]:
    """The committed Jobs board's panel `title`: its query and its result over [start_ms, end_ms]."""
    client = board_client(Target(chdb_dsn, store.database))
    board = committed("gpufleet-jobs")
    variables = resolve_variables(client, board, TimeRange(start_ms, end_ms, MIN))
    (q,) = [q for q in panel_queries(board) if q.panel_title == title]
    return q, run(client, render(q.raw_sql, variables, panel_range(start_ms, end_ms, q.min_interval)))


def _jobs(store: Store, chdb_dsn: str, start_ms: int, end_ms: int) -> list[tuple[Any, ...]]:
    _, result = _panel(store, chdb_dsn, "Jobs", start_ms, end_ms)
    cols = ("tenant", "job", "gpus", "nodes", "gpu_hours", "tokens_per_s", "samples_per_s", "first_seen", "last_seen")
    idx = [result.columns.index(c) for c in cols]
    return [tuple(r[i] for i in idx) for r in result.rows]


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _check(rows: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    assert len(rows) == len(want)
    for got, exp in zip(rows, want, strict=True):
        *head, first, last = got
        assert (first.strftime("%Y-%m-%d %H:%M:%S"), last.strftime("%Y-%m-%d %H:%M:%S")) == exp[-2:]
        for g, e in zip(head, exp[:-2], strict=True):
            assert g == (pytest.approx(e, rel=1e-12) if isinstance(e, float) else e)


# train, whole: 30 GPU-minutes = 0.5 GPU-h; 12 reporting GPU-minutes x 1000 tokens (x 2 samples) over the
# 600 s from its first claimed second (M) to its last (M + 10 min); pair: 20 GPU-minutes, reports nothing.
WHOLE = [("acme", "train", 3, "n1, n2", 0.5, 12_000 / 600, 24 / 600, _iso(M), _iso(M + 10 * MIN)),
         ("beta", "pair", 2, "n3", 20 / 60, None, None, _iso(M), _iso(M + 10 * MIN))]


@pytest.mark.parametrize("span", ["whole hour (hour level)", "ten minutes (minute level)", "two hours (both)"])
def test_every_column_by_hand(ch_store: Store, chdb_dsn: str, span: str) -> None:
    insert_reports(ch_store, _reports(), M + 11 * MIN)
    start, end = {"whole hour (hour level)": (M, M + HOUR - 1000), "ten minutes (minute level)": (M, M + 10 * MIN),
                  "two hours (both)": (M - HOUR + 30 * MIN, M + HOUR + 5 * MIN)}[span]
    _check(_jobs(ch_store, chdb_dsn, start, end), WHOLE)


def test_a_range_starting_inside_the_job(ch_store: Store, chdb_dsn: str) -> None:
    insert_reports(ch_store, _reports(), M + 11 * MIN)
    # minutes M+2 .. M+9: 24 GPU-minutes; tokens only in minutes 2 and 3: 3 GPUs x 2 x 1000 over 480 s
    _check(_jobs(ch_store, chdb_dsn, M + 2 * MIN, M + HOUR - 1000), [
        ("acme", "train", 3, "n1, n2", 0.4, 6000 / 480, 12 / 480, _iso(M + 2 * MIN), _iso(M + 10 * MIN)),
        ("beta", "pair", 2, "n3", 16 / 60, None, None, _iso(M + 2 * MIN), _iso(M + 10 * MIN))])


def test_a_replayed_batch_adds_nothing_and_a_late_sample_counts(ch_store: Store, chdb_dsn: str) -> None:
    insert_reports(ch_store, _reports(), M + 11 * MIN)
    insert_reports(ch_store, _reports(), M + 12 * MIN)  # the same batch again: insert dedup drops it
    late = report(node="n4", seq=1, time_ms=M - 29 * MIN, interval_ms=MIN, gpus=[
        gpu(0, "n4", tenant="acme", job="train", compute_processes=1, util_gpu_ratio=0.95, tokens_measured=600.0,
            samples_measured=1.0)])
    insert_reports(ch_store, [late], M + 13 * MIN)  # the hour before, arriving last
    _check(_jobs(ch_store, chdb_dsn, M, M + HOUR - 1000), WHOLE)
    # with the hour before: 31 GPU-minutes on 4 GPUs and 3 nodes; 12,600 tokens over M-30 min .. M+10 min;
    # from its hour row, or from its minute row beside the hour row of the hour after
    for start in (M - HOUR, M - 45 * MIN):
        _check(_jobs(ch_store, chdb_dsn, start, M + HOUR - 1000), [
            ("acme", "train", 4, "n1, n2, n4", 31 / 60, 12_600 / 2400, 25 / 2400, _iso(M - 30 * MIN),
             _iso(M + 10 * MIN)),
            WHOLE[1]])


def test_the_migration_backfills_what_was_stored_before_it(ch_store: Store, chdb_dsn: str) -> None:
    insert_reports(ch_store, _reports(), M + 11 * MIN)
    db = ch_store.database
    client = ch_store.client
    # the store as 0040-0090 left it: job rows without nodes, no throughput rollup
    client.command(f"TRUNCATE TABLE {db}.job_usage_1h")
    client.command(f"TRUNCATE TABLE {db}.job_throughput_1m")
    client.command(f"TRUNCATE TABLE {db}.job_throughput_1h")
    client.command(
        f"INSERT INTO {db}.job_usage_1h SELECT toStartOfHour(minute) AS hour, tenant, job, cluster, model, "
        "groupUniqArray(toString(gpu_uuid)), [], sum(reported_ms), sum(claimed_ms), sum(mfu_ms), sum(measured_ms), "
        "sum(measured_flop), sum(estimated_unmeasured_flop), sum(peak_capacity_flop), 0, 0, min(first_start_ms), "
        f"max(last_end_ms) FROM {db}.gpu_usage_1m WHERE tenant != '' AND job != '' "
        "GROUP BY hour, tenant, job, cluster, model")
    (m,) = [m for m in available() if m.version == 100]
    for _ in range(2):  # and once more, as after a failure part-way: nothing twice
        for stmt in statements(m, SchemaOptions(database=db)):
            client.command(stmt)
    for start, end in ((M, M + HOUR - 1000), (M, M + 10 * MIN)):
        _check(_jobs(ch_store, chdb_dsn, start, end), WHOLE)


def test_throughput_series_reads_the_minute_rollup(ch_store: Store, chdb_dsn: str) -> None:
    """Throughput by job, one-minute buckets over [M, M + 10 min): "train" reports 3 GPUs x 1000 tokens per
    minute for the samples ending at M + 1..4 min (claims starting in minutes M..M + 3), then 0 tokens; "pair"
    reports none (NULL), so it has no line. A replayed batch changes nothing."""
    insert_reports(ch_store, _reports(), M + 11 * MIN)
    insert_reports(ch_store, _reports()[:4], M + 12 * MIN)  # the first minute's batch again: a replay
    q, result = _panel(ch_store, chdb_dsn, "Throughput by job (tokens/s reported over OTLP)", M, M + 10 * MIN - 1000)
    assert "gpu_samples" not in q.raw_sql
    got = [(t.strftime("%H:%M"), job, v) for t, job, v in result.rows]
    # 3 x 1000 tokens per minute = 50 tokens/s in minutes 11:00..11:03; 0 after
    assert got == [(f"11:{m:02d}", "acme/train", 50.0 if m < 4 else 0.0) for m in range(10)]
