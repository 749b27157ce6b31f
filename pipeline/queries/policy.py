"""The billing policy in force: which health states are not billed and when an allocated GPU is idle.

The SLA policy (`billing.exclude_states`) and the idle threshold (`billing.idle_util_ratio`) are
applied when the rollups are read, from the one-row `billing_policy` table that `sync_policy`
writes from config, so the view, the commands and the dashboards all apply the same policy and
changing it needs no migration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.config import BillingConfig
from gpufleet.pipeline.queries.window import ms_datetime

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


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


def read_policy(client: Client, db: str) -> Policy:
    """The policy in force (the newest `billing_policy` row)."""
    rows = client.query(
        "SELECT argMax(exclude_states, updated_at), argMax(idle_util_pct, updated_at), count() "
        f"FROM {db}.billing_policy"
    ).result_rows
    excluded, pct, n = rows[0]
    return Policy(tuple(excluded), int(pct)) if n else Policy()


def sync_policy(client: Client, db: str, billing: BillingConfig, now_ms: int) -> Policy:
    """Make the config's policy the one in force; writes only when it differs. Returns it."""
    wanted = Policy.from_config(billing)
    if read_policy(client, db) != wanted:
        client.insert(
            f"{db}.billing_policy", [[0, list(wanted.exclude_states), wanted.idle_util_pct, ms_datetime(now_ms)]],
            column_names=["key", "exclude_states", "idle_util_pct", "updated_at"],
        )
    return wanted


def idle_ms_sql(pct_param: str = "idle_pct") -> str:
    """Idle milliseconds of a rollup row: allocated with no process, or below the idle utilization."""
    return (f"(held_no_process_ms + arraySum(mapValues(mapFilter((k, v) -> k < {{{pct_param}:UInt8}}, "
            "active_ms_by_util_pct))))")
