"""SQL of the job-level detectors over raw samples: stalled jobs, stalled GPU-seconds and stragglers.

Design notes: docs/design-notes.md#pipeline-queries-job-signals-py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from gpufleet.gpu_facts import (
    THROTTLE_HW_POWER_BRAKE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_THERMAL_MASK,
)
from gpufleet.pipeline.queries import formulas

JOB_ROWS: Final = "tenant != '' AND job != '' AND error = ''"
"""Samples a job-level detector reads: allocated to a job, GPU readable."""
POWER_BITS: Final = THROTTLE_SW_POWER_CAP | THROTTLE_HW_SLOWDOWN | THROTTLE_HW_POWER_BRAKE
CAUSES: Final = {
    "thermal_throttle": "thermal throttling",
    "power_throttle": "power throttling",
    "pcie_nvlink_errors": "PCIe/NVLink errors",
    "clock": "SM clock held low (no throttle reason: clocks set or locked low?)",
    "below_median": "tensor activity or FLOPs below the job's median (no throttling, clock or link errors seen)",
}
"""A straggler's likely cause (code: what the alert says), first that applies: thermal or power throttling in
at least half its samples, PCIe replays or NVLink errors rising in the window, an SM clock below the job's
median in at least half its samples with no throttle reason (clocks set low), else only its activity or FLOPs
are below the median."""


class StallThresholds(Protocol):
    """`gpufleet.config.StallConfig`, or a JobStalled rule: the figures `formulas.stall_like` compares with."""

    util_above: float
    tensor_below: float
    sm_below: float
    power_below_ratio: float
    flops_below_ratio: float


class StragglerThresholds(Protocol):
    """`gpufleet.config.StragglerConfig`, or a JobStraggler rule."""

    below_ratio: float
    throttle_mask: int
    peers_throttling_below: float
    min_job_util: float
    min_job_tensor: float


@dataclass(frozen=True)
class StallTerms:
    """`StallThresholds` as SQL expressions."""

    util_above: str
    tensor_below: str
    sm_below: str
    power_below_ratio: str
    flops_below_ratio: str

    def like(self) -> str:
        """The stall-like condition of one sample (`formulas.stall_like`; NULL when a figure is unknown)."""
        return formulas.stall_like(self.util_above, self.tensor_below, self.sm_below, self.power_below_ratio,
                                   self.flops_below_ratio)


@dataclass(frozen=True)
class StragglerTerms:
    """`StragglerThresholds` as SQL expressions."""

    below_ratio: str
    throttle_mask: str
    peers_throttling_below: str
    min_job_util: str
    min_job_tensor: str


@dataclass(frozen=True)
class Span:
    """Which samples a detector reads and what "now", "fresh" and "for D" are, as SQL."""

    where: str
    """Filter on `gpu_samples` (the window: `(now - max(D, max age), now]`)."""
    fresh_ms: str
    """A GPU whose newest sample ended at or before this (Unix ms) is stale and left out."""
    since_ms: str
    """now - D (Unix ms)."""
    cover_ms: str
    """coverage x D (ms)."""


_STALL_NAMES: Final = ("util_above", "tensor_below", "sm_below", "power_below_ratio", "flops_below_ratio")
_STRAGGLER_NAMES: Final = ("below_ratio", "throttle_mask", "peers_throttling_below", "min_job_util",
                           "min_job_tensor")
STALL_BOUND: Final = StallTerms(*(f"{{st_{n}:Float64}}" for n in _STALL_NAMES))
STRAGGLER_BOUND: Final = StragglerTerms("{sg_below_ratio:Float64}", "{sg_throttle_mask:UInt64}",
                                        "{sg_peers_throttling_below:Float64}", "{sg_min_job_util:Float64}",
                                        "{sg_min_job_tensor:Float64}")


def stall_params(th: StallThresholds) -> dict[str, float]:
    """The parameters `STALL_BOUND` names."""
    return {f"st_{n}": float(getattr(th, n)) for n in _STALL_NAMES}


def straggler_params(th: StragglerThresholds) -> dict[str, float | int]:
    """The parameters `STRAGGLER_BOUND` names."""
    return {f"sg_{n}": int(getattr(th, n)) if n == "throttle_mask" else float(getattr(th, n))
            for n in _STRAGGLER_NAMES}


def stall_literal(th: StallThresholds) -> StallTerms:
    """The thresholds written into the SQL (Grafana rules and boards, which cannot bind parameters)."""
    return StallTerms(*(repr(float(getattr(th, n))) for n in _STALL_NAMES))


def straggler_literal(th: StragglerThresholds) -> StragglerTerms:
    return StragglerTerms(*(repr(int(getattr(th, n))) if n == "throttle_mask" else repr(float(getattr(th, n)))
                            for n in _STRAGGLER_NAMES))


def candidate_rows(terms: StallTerms) -> str:
    """Over `stall_candidates_1h` (migration 0108): true for every row that could hold a stall-like sample
    (`StallTerms.like`), each figure's extreme compared as the sample's is; the FLOPs ratio with a margin for
    its rounding (a row passing wrongly costs a read, never an answer)."""
    return (
        f"ifNull(util_max >= toFloat32({terms.util_above}), 0)"
        f" AND (ifNull(tensor_min <= toFloat32({terms.tensor_below}), 0)"
        f" OR ifNull(sm_untensored_min <= toFloat32({terms.sm_below}), 0))"
        f" AND ifNull(power_min <= {terms.power_below_ratio} * {formulas.POWER_LIMIT_W}, 0)"
        f" AND (flops_unreported > 0 OR ifNull(flops_ratio_min <= {terms.flops_below_ratio} * 1.000001 + 1e-12, 0))"
    )


def candidates_between(start: str, end: str, db: str = "") -> str:
    """`<db>stall_candidates_1h WHERE <hours>`: the rows holding the samples whose time is in (`start`, `end`]
    (SQL DateTime expressions), for `stalled_samples`/`stalled_jobs`' `candidates`. A sample is filed under
    its time's hour (migration 0108); a caller may add `AND <filters>`."""
    return f"{db}stall_candidates_1h WHERE hour >= toStartOfHour({start}) AND hour <= {end}"


def _candidate_gpus(candidates: str | None, terms: StallTerms) -> str:
    """`AND (cluster, node, gpu_index) IN (...)`: the GPUs with a candidate row, or nothing without a rollup.
    `candidates` is `candidates_between(...)`, perhaps with filters."""
    if candidates is None:
        return ""
    return (f" AND (cluster, node, gpu_index) IN (SELECT DISTINCT cluster, node, gpu_index FROM {candidates} "
            f"AND {candidate_rows(terms)})")


_SINCE: Final = f"if(countIf(c = 0) > 0, toUnixTimestamp64Milli(maxIf(time, c = 0)), {formulas.FIRST_START_MS})"
"""Where a series' current run of samples meeting `c` began: the end of its newest sample that did not."""


def stalled_jobs(table: str, span: Span, terms: StallTerms, candidates: str | None = None) -> str:
    """One row per job (cluster, tenant, job) whose every fresh GPU's newest sample is stall-like: `gpus`,
    `nodes`, `gpu_uuids`, `sustained` (every GPU for D), `since_ms` (the latest GPU's run start), `last_ms`,
    `power_ratio` and `util` (newest samples, mean over the GPUs). With `candidates` (see `_candidate_gpus`),
    only the jobs with a row that could hold a stall-like sample are read, all their GPUs by the raw key."""
    sustained = formulas.sustained(span.since_ms, span.cover_ms)
    jobs = ""
    if candidates is not None:
        some = f"SELECT DISTINCT cluster, tenant, job FROM {candidates} AND {candidate_rows(terms)}"
        jobs = (f" AND (cluster, tenant, job) IN ({some}) AND (cluster, node, gpu_index) IN (SELECT DISTINCT "
                f"cluster, node, gpu_index FROM {candidates} AND (cluster, tenant, job) IN ({some}))")
    return f"""
SELECT cluster, tenant, job,
       count() AS gpus,
       arraySort(groupUniqArray(node)) AS nodes,
       arraySort(groupArray(gpu_uuid)) AS gpu_uuids,
       min(sustained) AS sustained,
       max(since_ms) AS since_ms,
       max(last_ms) AS last_ms,
       avg(power_ratio) AS power_ratio,
       avg(util) AS util
FROM (
    SELECT cluster, node, gpu_uuid, tenant, job,
           toUnixTimestamp64Milli(max(time)) AS last_ms,
           argMax(c, time) AS last_c,
           toUInt8({sustained}) AS sustained,
           {_SINCE} AS since_ms,
           argMax(power_w / limit_w, time) AS power_ratio,
           argMax(util_gpu_ratio, time) AS util
    FROM (
        SELECT cluster, node, gpu_uuid, tenant, job, time, interval_ms, claimed_ms, util_gpu_ratio, power_w,
               {formulas.POWER_LIMIT_W} AS limit_w,
               toUInt8(ifNull({terms.like()}, 0)) AS c
        FROM {table}
        WHERE {span.where} AND {JOB_ROWS}{jobs}
    )
    GROUP BY cluster, node, gpu_uuid, tenant, job
    HAVING last_ms > {span.fresh_ms}
)
GROUP BY cluster, tenant, job
HAVING min(last_c) = 1
ORDER BY cluster, tenant, job
"""


def stall_like_count(table: str, where: str, terms: StallTerms) -> str:
    """How many samples (filtered by `where`) of GPUs allocated to a job are stall-like. A job `stalled_jobs`
    finds has a stall-like newest sample in `(fresh, now]`, so a count of 0 there means it finds none."""
    return f"SELECT count() FROM {table} WHERE ({where}) AND {JOB_ROWS} AND ifNull({terms.like()}, 0)"


_RUN: Final = "PARTITION BY cluster, node, gpu_uuid, tenant, job"
_ORDERED: Final = f"{_RUN} ORDER BY time ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW"


def stalled_samples(table: str, where: str, terms: StallTerms, for_ms: str, gap_ms: str,
                    candidates: str | None = None) -> str:
    """The samples (filtered by `where`) in a run of stall-like samples of one GPU and job lasting at least
    `for_ms`: from the start of its first sample to the end of its last, with no sample that is not
    stall-like and no gap over `gap_ms` between them. Columns: cluster, node, gpu_uuid, model, tenant, job,
    health, util_gpu_ratio, compute_processes, interval_ms, start_ms, end_ms, run_start_ms, run_end_ms, and
    what a reader sums and files the sample under, as the rollups do (docs/aggregations.md, "Claims"):
    `claimed_ms` and `claim_ms` (its claim start, Unix ms).

    A run is judged on the samples `where` reads: read D (and the gap) beyond both ends of the window
    whose samples are counted, so a run that crosses its edge is judged whole. Only the series (GPU and
    job) with a stall-like sample are ordered into runs: most GPUs never stall, and ordering every sample
    cost most of the time. With `candidates` (see `_candidate_gpus`), only the GPUs whose hour rollup could
    hold a stall-like sample are read, by the raw table's key.
    """
    series = "(cluster, node, gpu_uuid, tenant, job)"
    gpus = _candidate_gpus(candidates, terms)
    samples = (
        "SELECT cluster, node, gpu_uuid, model, tenant, job, time, health, util_gpu_ratio, compute_processes, "
        "interval_ms, claimed_ms, toInt64(toUnixTimestamp64Milli(claim_start)) AS claim_ms, "
        "toInt64(toUnixTimestamp64Milli(time)) AS end_ms, end_ms - interval_ms AS start_ms, "
        f"toUInt8(ifNull({terms.like()}, 0)) AS c FROM {table} WHERE ({where}) AND {JOB_ROWS}{gpus} "
        f"AND {series} IN (SELECT DISTINCT {series} FROM {table} WHERE ({where}) AND {JOB_ROWS}{gpus} "
        f"AND ifNull({terms.like()}, 0))"
    )
    breaks = (f"SELECT *, sum(toUInt8(c = 0 OR start_ms - prev_end > {gap_ms})) OVER ({_ORDERED}) AS run "
              f"FROM (SELECT *, lagInFrame(end_ms, 1, toInt64(0)) OVER ({_ORDERED}) AS prev_end FROM ({samples}))")
    runs = (f"SELECT *, minIf(start_ms, c = 1) OVER ({_RUN}, run) AS run_start_ms, "
            f"maxIf(end_ms, c = 1) OVER ({_RUN}, run) AS run_end_ms FROM ({breaks})")
    return (
        "SELECT cluster, node, gpu_uuid, model, tenant, job, health, util_gpu_ratio, compute_processes, "
        "interval_ms, claimed_ms, claim_ms, start_ms, end_ms, run_start_ms, run_end_ms "
        f"FROM ({runs}) WHERE c = 1 AND run_end_ms - run_start_ms >= {for_ms}"
    )


def _straggler_samples(table: str, where: str) -> str:
    nvlink = ("if(nvlink_replay_errors IS NULL AND nvlink_recovery_errors IS NULL, NULL, "
              "ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0))")
    return (
        "SELECT cluster, node, gpu_uuid, gpu_index, tenant, job, time, interval_ms, claimed_ms, clock_sm_mhz AS clock, "
        "tensor_active_ratio AS tensor, util_gpu_ratio AS util, "
        "if(flops_measured IS NULL, NULL, flops_measured * 1000 / interval_ms) AS flop_rate, "
        f"ifNull(clock_event_reasons, 0) AS bits, pcie_replay_count, {nvlink} AS nvlink_errors "
        f"FROM {table} WHERE ({where}) AND {JOB_ROWS}"
    )


def _job_medians(samples: str, terms: StragglerTerms) -> str:
    """Per job on 2+ GPUs: its GPUs, per node too, the medians over its GPUs of their window means, and
    how many of its GPUs throttled at some sample."""
    per_gpu = (
        "SELECT cluster, tenant, job, node, gpu_uuid, avg(clock) AS clock, avg(tensor) AS tensor, "
        f"avg(flop_rate) AS flop_rate, avg(util) AS util, toUInt8(countIf(bitAnd(bits, {terms.throttle_mask}) "
        f"!= 0) > 0) AS throttled FROM ({samples}) GROUP BY cluster, tenant, job, node, gpu_uuid"
    )
    median = "quantileExactInclusive(0.5)"
    return (
        "SELECT cluster, tenant, job, count() AS job_gpus, sumMap(map(toString(node), toUInt64(1))) AS node_gpus, "
        f"{median}(clock) AS med_clock, {median}(tensor) AS med_tensor, {median}(flop_rate) AS med_flop_rate, "
        f"{median}(util) AS med_util, sum(throttled) AS throttling "
        f"FROM ({per_gpu}) GROUP BY cluster, tenant, job HAVING job_gpus >= 2"
    )


MATERIALIZED_CTE: Final = {"enable_materialized_cte": 1}
"""The setting a `stragglers(..., materialize=True)` query runs with (ClickHouse's materialized CTEs)."""


def stragglers(table: str, span: Span, terms: StragglerTerms, *, materialize: bool = False) -> str:
    """One row per GPU of a job on 2+ GPUs whose newest fresh sample is a straggler's: cluster, tenant, job,
    node, gpu_uuid, gpu_index, `job_gpus`, `node_job_gpus` (the job's GPUs on that node), `sustained` (for
    D), `since_ms`, `last_ms`, the GPU's and the job's mean SM clock and tensor activity, and `cause`
    (`CAUSES`). `materialize`: the window's samples are read once into a materialized CTE that both the
    per-sample side and the job medians read (the same rows; run with `MATERIALIZED_CTE`), instead of
    twice; for the evaluator, where the server supports it (the boards and Grafana keep the plain form)."""
    samples = _straggler_samples(table, span.where)
    prefix = ""
    if materialize:
        prefix, samples = f"WITH straggler_samples AS MATERIALIZED ({samples})\n", "SELECT * FROM straggler_samples"
    below = terms.below_ratio
    thermal = f"bitAnd(bits, bitAnd({THROTTLE_THERMAL_MASK}, {terms.throttle_mask})) != 0"
    power = f"bitAnd(bits, bitAnd({POWER_BITS}, {terms.throttle_mask})) != 0"
    links = f"{formulas.rose('pcie_replay_count')} OR {formulas.rose('nvlink_errors')}"
    return f"""
{prefix}SELECT cluster, tenant, job, node, gpu_uuid, gpu_index,
       any(job_gpus) AS job_gpus,
       any(node_gpus)[toString(node)] AS node_job_gpus,
       toUnixTimestamp64Milli(max(time)) AS last_ms,
       argMax(c, time) AS last_c,
       toUInt8({formulas.sustained(span.since_ms, span.cover_ms)}) AS sustained,
       {_SINCE} AS since_ms,
       avg(clock) AS clock_mhz, any(med_clock) AS job_clock_mhz,
       avg(tensor) AS tensor, any(med_tensor) AS job_tensor,
       multiIf(countIf({thermal}) * 2 >= count(), 'thermal_throttle',
               countIf({power}) * 2 >= count(), 'power_throttle',
               {links}, 'pcie_nvlink_errors',
               countIf(slow_clock = 1 AND bits = 0) * 2 >= count(), 'clock',
               'below_median') AS cause
FROM (
    SELECT *,
           toUInt8(ifNull(clock < {below} * med_clock, 0)) AS slow_clock,
           toUInt8(ifNull(med_tensor >= {terms.min_job_tensor} AND tensor < {below} * med_tensor, 0)) AS slow_tensor,
           toUInt8(ifNull(med_flop_rate > 0 AND flop_rate < {below} * med_flop_rate, 0)) AS slow_flops,
           toUInt8(bitAnd(bits, {terms.throttle_mask}) != 0
                   AND (throttling - 1) / (job_gpus - 1) < {terms.peers_throttling_below}) AS lone_throttle,
           toUInt8(ifNull(med_util, 0) >= {terms.min_job_util}
                   AND (slow_clock OR slow_tensor OR slow_flops OR lone_throttle)) AS c
    FROM ({samples}) AS s
    INNER JOIN ({_job_medians(samples, terms)}) AS j USING (cluster, tenant, job)
)
GROUP BY cluster, tenant, job, node, gpu_uuid, gpu_index
HAVING last_ms > {span.fresh_ms} AND last_c = 1
ORDER BY cluster, tenant, job, node, gpu_index
"""
