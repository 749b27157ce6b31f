"""The billing policy in force: which health states are not billed and when an allocated GPU is idle.

The SLA policy (`billing.exclude_states`) and the idle threshold (`billing.idle_util_ratio`) are
applied when the rollups are read, from the one-row `billing_policy` table that `sync_policy`
writes from config, so the view, the commands and the dashboards all apply the same policy and
changing it needs no migration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gpufleet.config import BillingConfig
from gpufleet.pipeline.queries.window import ms_datetime

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

_READ: Final = (
    "SELECT argMax(exclude_states, updated_at), argMax(idle_util_pct, updated_at), count() "
    "FROM {db:Identifier}.billing_policy"
)
_COLUMNS: Final = ("key", "exclude_states", "idle_util_pct", "updated_at")


@dataclass(frozen=True)
class Policy:
    """The billing policy the rollups are read with."""

    exclude_states: tuple[str, ...] = ("failing",)
    """GPU-seconds in these health states are not billed (and are `unhealthy` in the waterfall)."""
    idle_util_pct: int = 5
    """An allocated GPU whose utilization, in whole percent, is below this is idle."""

    @classmethod
    def from_config(cls, billing: BillingConfig) -> Policy:
        """`idle_util_ratio` in whole percent, rounded up (NVML reports utilization in whole percents)."""
        return cls(tuple(sorted(set(billing.exclude_states))), math.ceil(round(billing.idle_util_ratio * 100, 6)))


def read_policy(store: Store) -> Policy:
    """The policy in force (the newest `billing_policy` row)."""
    excluded, pct, n = store.rows(_READ)[0]
    return Policy(tuple(excluded), int(pct)) if n else Policy()


def sync_policy(store: Store, billing: BillingConfig, now_ms: int) -> Policy:
    """Make the config's policy the one in force; writes only when it differs. Returns it."""
    wanted = Policy.from_config(billing)
    if read_policy(store) != wanted:
        store.insert("billing_policy", [[0, list(wanted.exclude_states), wanted.idle_util_pct, ms_datetime(now_ms)]],
                     _COLUMNS)
    return wanted


IDLE_MS: Final = (
    "(held_no_process_ms + arraySum(mapValues(mapFilter((k, v) -> k < {idle_pct:UInt8}, active_ms_by_util_pct))))"
)
"""Idle milliseconds of a rollup row: allocated with no process, or below the idle utilization (bind
`idle_pct`, the policy's `idle_util_pct`)."""
