"""The job view behind `gpufleet jobs` and the Jobs board: per job, where it runs, how well, and what holds it back.

Design notes: docs/design-notes.md#pipeline-queries-jobs-py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gpufleet.config import JobsConfig
from gpufleet.pipeline.queries import formulas, job_signals, stalls
from gpufleet.pipeline.queries.mfu import source_label
from gpufleet.pipeline.queries.window import WINDOW, Window, iso
from gpufleet.wire import MAX_INTERVAL_MS

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

FRESH_MS: Final = 60_000
"""A GPU whose newest sample is older than this at the window's end has no straggler verdict (the rules'
default `max_sample_age`)."""
COVERAGE: Final = 0.9
"""Share of the straggler window a GPU's samples must cover (the rules' default `coverage`)."""

_TENANT: Final = " AND tenant = {tenant:String}"
_ROLLUP: Final = (
    "SELECT tenant, job, arraySort(groupUniqArray(cluster)), uniqExact(gpu_uuid), arraySort(groupUniqArray(node)), "
    f"sum(claimed_ms), {formulas.MFU}, sum(mfu_ms), sum(measured_ms), min(first_start_ms), max(last_end_ms) "
    f"FROM {{db:Identifier}}.gpu_usage_1m WHERE {WINDOW} AND tenant != '' AND job != ''@TENANT@ "
    "GROUP BY tenant, job ORDER BY tenant, job"
)
_THROUGHPUT: Final = (
    "SELECT tenant, job, sum(tokens_measured * claimed_ms / interval_ms), "
    "sum(samples_measured * claimed_ms / interval_ms) FROM {db:Identifier}.gpu_samples "
    "WHERE time > fromUnixTimestamp64Milli({w_start:Int64}, 'UTC') "
    "AND time <= fromUnixTimestamp64Milli({r_end:Int64}, 'UTC') "
    "AND toUnixTimestamp64Milli(claim_start) >= {w_start:Int64} "
    "AND toUnixTimestamp64Milli(claim_start) < {w_end:Int64} "
    "AND tenant != '' AND job != ''@TENANT@ GROUP BY tenant, job"
)


@dataclass(frozen=True)
class Straggler:
    """A GPU that lags its job at the window's end."""

    node: str
    gpu: str
    gpu_index: int
    cause: str
    """One of `job_signals.CAUSES`."""
    since: str
    clock_mhz: float | None
    job_clock_mhz: float | None


@dataclass(frozen=True)
class JobRow:
    """One job over the window."""

    tenant: str
    job: str
    clusters: list[str]
    gpus: int
    nodes: list[str]
    gpu_seconds: float
    first_seen: str
    last_seen: str
    mfu: float | None
    mfu_source: str
    """`measured`, `estimated` (hardware tensor-activity estimate), `mixed` or `none`."""
    stalled_gpu_seconds: float
    stalled_since: str | None
    """Where the job's latest stalled run began; None when nothing stalled in the window."""
    tokens: float | None
    samples: float | None
    tokens_per_s: float | None
    samples_per_s: float | None
    stragglers: list[Straggler] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _for_tenant(sql: str, tenant: str | None) -> tuple[str, dict[str, str]]:
    """`sql` filtered to one tenant (bound), or to all."""
    if tenant is None:
        return sql.replace("@TENANT@", ""), {}
    return sql.replace("@TENANT@", _TENANT), {"tenant": tenant}


def _rate(total: float | None, seconds: float) -> float | None:
    return total / seconds if total is not None and seconds > 0 else None


def _rollup_rows(store: Store, window: Window, tenant: str | None) -> list[tuple[Any, ...]]:
    sql, extra = _for_tenant(_ROLLUP, tenant)
    return store.rows(sql, {**window.params(), **extra})


def _throughput(store: Store, window: Window, tenant: str | None) -> dict[tuple[str, str], tuple[Any, Any]]:
    sql, extra = _for_tenant(_THROUGHPUT, tenant)
    rows = store.rows(sql, {**window.params(), "r_end": window.end_ms + MAX_INTERVAL_MS, **extra})
    return {(str(t), str(j)): (tok, smp) for t, j, tok, smp in rows}


def stragglers_at(store: Store, end_ms: int, cfg: JobsConfig, tenant: str | None = None) -> dict[
        tuple[str, str], list[Straggler]]:
    """Per (tenant, job), the GPUs that lag it at `end_ms`: sustained over the last `jobs.straggler.for_s`."""
    for_ms = int(cfg.straggler.for_s * 1000)
    where, extra = _for_tenant("time > fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC') "
                               "AND time <= fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC')@TENANT@", tenant)
    span = job_signals.Span(where, "{fresh_ms:Int64}", "{since_ms:Int64}", "{cover_ms:Float64}")
    sql = job_signals.stragglers("{db:Identifier}.gpu_samples", span, job_signals.STRAGGLER_BOUND)
    params = {"from_ms": end_ms - max(for_ms, FRESH_MS), "now_ms": end_ms, "fresh_ms": end_ms - FRESH_MS,
              "since_ms": end_ms - for_ms, "cover_ms": COVERAGE * for_ms, **job_signals.straggler_params(cfg.straggler),
              **extra}
    out: dict[tuple[str, str], list[Straggler]] = {}
    for r in store.query(sql, params).named_results():
        if r["sustained"]:
            out.setdefault((r["tenant"], r["job"]), []).append(Straggler(
                r["node"], r["gpu_uuid"], int(r["gpu_index"]), r["cause"], iso(int(r["since_ms"])),
                r["clock_mhz"], r["job_clock_mhz"]))
    return out


def job_view(store: Store, window: Window, cfg: JobsConfig | None = None, tenant: str | None = None) -> list[JobRow]:
    """Every job seen in `window` (only `tenant`'s when given), by tenant and job."""
    cfg = cfg or JobsConfig()
    stalled = stalls.stalled_by_job(store, window, cfg.stall, tenant)
    lagging = stragglers_at(store, window.end_ms, cfg, tenant)
    throughput = _throughput(store, window, tenant)
    out = []
    for t, j, clusters, gpus, nodes, reported, mfu, mfu_ms, measured, first, last in _rollup_rows(store, window,
                                                                                                  tenant):
        key = (str(t), str(j))
        tokens, samples = throughput.get(key, (None, None))
        seconds = (min(int(last), window.end_ms) - max(int(first), window.start_ms)) / 1000
        st = stalled.get(key)
        out.append(JobRow(
            tenant=key[0], job=key[1], clusters=list(clusters), gpus=int(gpus), nodes=list(nodes),
            gpu_seconds=int(reported) / 1000, first_seen=iso(int(first)), last_seen=iso(int(last)),
            mfu=None if mfu is None else float(mfu), mfu_source=source_label(int(mfu_ms), int(measured)),
            stalled_gpu_seconds=st["stalled_ms"] / 1000 if st else 0.0,
            stalled_since=iso(st["since_ms"]) if st else None,
            tokens=tokens, samples=samples, tokens_per_s=_rate(tokens, seconds), samples_per_s=_rate(samples, seconds),
            stragglers=lagging.get(key, []),
        ))
    return out
