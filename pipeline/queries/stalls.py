"""Stalled GPU-seconds on the read side: the capacity waterfall's `stalled` step and each job's stalled time.

Design notes: docs/design-notes.md#pipeline-queries-stalls-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from gpufleet.config import StallConfig
from gpufleet.pipeline.queries import job_signals
from gpufleet.pipeline.queries.policy import Policy
from gpufleet.pipeline.queries.window import Window

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

_READ: Final = ("time > fromUnixTimestamp64Milli({r_start:Int64}, 'UTC') "
                "AND time <= fromUnixTimestamp64Milli({r_end:Int64}, 'UTC')")
_CANDIDATES: Final = job_signals.candidates_between("fromUnixTimestamp64Milli({r_start:Int64}, 'UTC')",
                                                   "fromUnixTimestamp64Milli({r_end:Int64}, 'UTC')",
                                                   "{db:Identifier}.")
"""The rows of `stall_candidates_1h` holding the samples `_READ` reads."""
_IN_WINDOW: Final = "claim_ms >= {w_start:Int64} AND claim_ms < {w_end:Int64}"
BUSY_BY_POLICY: Final = (
    "NOT has({excl:Array(String)}, toString(health)) AND NOT ifNull(compute_processes = 0, 0) "
    "AND least(floor(ifNull(util_gpu_ratio, 0) * 100 + 0.0001), 100) >= {idle_pct:UInt8}"
)
"""A sample the rollups count as busy under the policy (healthy, a process, utilization at or above the idle
threshold: the rollups' whole-percent utilization, migration 0002), so `stalled` is a part of `busy`."""


def samples_sql(where: str = "1") -> str:
    """The stalled samples read for a window (bind `params`), `where` filtering the raw rows too."""
    return job_signals.stalled_samples("{db:Identifier}.gpu_samples", f"{_READ} AND ({where})",
                                       job_signals.STALL_BOUND, "{st_for_ms:Int64}", "{st_gap_ms:Int64}",
                                       f"{_CANDIDATES} AND ({where})")


def params(window: Window, stall: StallConfig) -> dict[str, Any]:
    """The parameters `samples_sql` and `_IN_WINDOW` name."""
    for_ms, gap_ms = int(stall.for_s * 1000), int(stall.max_gap_s * 1000)
    return {"r_start": window.start_ms - for_ms - gap_ms, "r_end": window.end_ms + for_ms + gap_ms,
            "st_for_ms": for_ms, "st_gap_ms": gap_ms, **window.params(), **job_signals.stall_params(stall)}


def stalled_ms(store: Store, window: Window, policy: Policy, stall: StallConfig, scope_sql: str = "1",
               scope_params: dict[str, str] | None = None) -> int:
    """Stalled milliseconds in `window` over the GPUs `scope_sql` selects, of samples the policy counts as busy."""
    ((ms,),) = store.rows(
        f"SELECT sum(claimed_ms) FROM ({samples_sql(scope_sql)}) WHERE {_IN_WINDOW} AND {BUSY_BY_POLICY}",
        {**params(window, stall), "excl": list(policy.exclude_states), "idle_pct": policy.idle_util_pct,
         **(scope_params or {})},
    )
    return int(ms or 0)


def stalled_by_job(store: Store, window: Window, stall: StallConfig, tenant: str | None = None) -> dict[
        tuple[str, str], dict[str, int]]:
    """Per (tenant, job): stalled milliseconds in `window` (`stalled_ms`) and the start of its latest stalled
    run (`since_ms`), whatever the health state."""
    where, extra = ("tenant = {tenant:String}", {"tenant": tenant}) if tenant is not None else ("1", {})
    rows = store.rows(
        f"SELECT tenant, job, sum(claimed_ms), max(run_start_ms) FROM ({samples_sql(where)}) WHERE {_IN_WINDOW} "
        "GROUP BY tenant, job ORDER BY tenant, job",
        {**params(window, stall), **extra},
    )
    return {(str(t), str(j)): {"stalled_ms": int(ms), "since_ms": int(since)} for t, j, ms, since in rows}
