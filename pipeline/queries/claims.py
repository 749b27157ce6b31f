"""Conflicting claims: GPU time claimed by more than one node, and which claims billing leaves out.

The rule lives in one place, the `gpu_claim_outranked` view (migration 0032): a node's claims on a
GPU in a minute are not billed when they overlap the claims of another node that ranks higher
(more claimed ms in its minute, ties: the smaller cluster, then node). `usage_hourly` subtracts
those claims; `not_outranked` is the same filter for queries on the minute rollup, and
`unbilled_claims` lists them for `gpufleet billing verify` (docs/aggregations.md, "Claims").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gpufleet.pipeline.queries.window import ALL_TIME, MINUTE_MS, WINDOW, Window, iso

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

def not_outranked(where: str) -> str:
    """A condition on `gpu_usage_1m` rows: the row's claims are billed (not outranked in the minutes `where`
    keeps: `window.WINDOW` or `window.ALL_TIME`)."""
    return ("(minute, gpu_uuid, cluster, node) NOT IN "
            f"(SELECT minute, gpu_uuid, cluster, node FROM {{db:Identifier}}.gpu_claim_outranked WHERE {where})")


@dataclass(frozen=True)
class UnbilledClaims:
    """A node's claims on a GPU that overlapped a higher-ranked node's and were not billed."""

    gpu_uuid: str
    cluster: str
    node: str
    owner_cluster: str
    owner_node: str
    """The highest-ranked node whose claims overlapped these (the one billed)."""
    first_minute_ms: int
    last_minute_ms: int
    minutes: int
    claimed_ms: int
    """Claimed milliseconds left unbilled."""

    def describe(self) -> str:
        span = iso(self.first_minute_ms)
        if self.last_minute_ms != self.first_minute_ms:
            span += f" .. {iso(self.last_minute_ms + MINUTE_MS)}"
        return (f"{self.gpu_uuid}: {self.cluster}/{self.node} claimed {self.claimed_ms / 1000:.3f} s in "
                f"{self.minutes} minute(s) ({span}) that {self.owner_cluster}/{self.owner_node} also claimed: "
                "not billed")


_UNBILLED: Final = {
    # windowed? -> each node's unbilled claims, one row per (GPU, node, owner) (bind the window's parameters)
    windowed: "SELECT gpu_uuid, cluster, node, outranked_by.1, outranked_by.2, "
              "toInt64(toUnixTimestamp(min(minute))) * 1000, toInt64(toUnixTimestamp(max(minute))) * 1000, count(), "
              f"sum(claimed_ms) FROM {{db:Identifier}}.gpu_claim_outranked WHERE {WINDOW if windowed else ALL_TIME} "
              "GROUP BY gpu_uuid, cluster, node, outranked_by ORDER BY gpu_uuid, cluster, node, outranked_by"
    for windowed in (False, True)
}


def unbilled_claims(store: Store, window: Window | None = None) -> list[UnbilledClaims]:
    """Every node's unbilled claims, one entry per (GPU, node, owner), in the window (None: all time)."""
    rows = store.rows(_UNBILLED[window is not None], window.params() if window else {})
    return [UnbilledClaims(g, c, n, oc, on, int(lo), int(hi), int(m), int(ms))
            for g, c, n, oc, on, lo, hi, m, ms in rows]
