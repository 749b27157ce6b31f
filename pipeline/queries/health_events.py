"""GPU health changes and XIDs from the event tables, never from a scan of raw samples.

A change is a sample whose state differs from the GPU's previous sample's (the first is compared
with `ok`): the event rows, in time order per GPU, whose state differs from the row before (earlier
rows count). A GPU with a `late` event has its changes taken from its own raw samples, by key. XIDs
come from `gpu_xid_events`. The SQL is built once for the read side and the health board.
Design notes: docs/aggregations.md, "Health events".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gpufleet.pipeline.queries.rollups import WINDOW_END, WINDOW_START

if TYPE_CHECKING:
    from gpufleet.pipeline.queries.window import Window
    from gpufleet.pipeline.store import Store

COLUMNS: Final = ("time", "cluster", "node", "boot_id", "gpu_index", "gpu_uuid", "model", "tenant", "job",
                  "health", "prev_health", "health_reasons")
"""The columns of `changes`' rows (health and prev_health as text)."""
_SELECT: Final = ("time, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, health, "
                  "lagInFrame(health, 1, CAST('ok' AS Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3)))"
                  " OVER (PARTITION BY cluster, node, gpu_uuid ORDER BY time, boot_id"
                  " ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS prev_health, health_reasons")
_OUT: Final = ("time, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, toString(health) AS health, "
               "toString(prev_health) AS prev_health, health_reasons")


def changes(start: str, end: str, where: str = "1", prefix: str = "") -> str:
    """Every health change of a sample in `[start, end)` (DateTime SQL expressions) whose row passes `where`
    (conditions on the sample's cluster, node, tenant, model...), as a subquery with `COLUMNS`."""
    late = (f"SELECT DISTINCT cluster, node, gpu_uuid FROM {prefix}gpu_health_events "
            f"WHERE change = 'late' AND time < {end}")
    in_range = (f"SELECT DISTINCT cluster, node, gpu_uuid FROM {prefix}gpu_health_events "
                f"WHERE time >= {start} AND time < {end} AND (cluster, node, gpu_uuid) NOT IN ({late})")
    from_events = (f"SELECT {_SELECT} FROM {prefix}gpu_health_events FINAL "
                   f"WHERE (cluster, node, gpu_uuid) IN ({in_range}) AND time < {end}")
    from_samples = (f"SELECT {_SELECT} FROM {prefix}gpu_samples "
                    f"WHERE (cluster, node, gpu_uuid) IN ({late}) AND time < {end}")
    return (f"(SELECT {_OUT} FROM ({from_events}\n UNION ALL\n {from_samples})\n"
            f" WHERE time >= {start} AND health != prev_health AND ({where}))")


def xid_samples(start: str, end: str, where: str = "1", prefix: str = "") -> str:
    """Samples in `[start, end)` that carried XIDs (one row each, codes in the sample's order), as a subquery
    with `time, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, health, health_reasons, xids`."""
    return ("(SELECT time, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, "
            "toString(health) AS health, health_reasons, "
            "arrayMap(p -> p.2, arraySort(groupArray((position, xid)))) AS xids "
            f"FROM {prefix}gpu_xid_events FINAL WHERE time >= {start} AND time < {end} AND ({where}) "
            "GROUP BY time, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, health, health_reasons)")


@dataclass(frozen=True)
class Change:
    """One sample that changed its GPU's health state."""

    time_ms: int
    cluster: str
    node: str
    gpu_index: int
    gpu_uuid: str
    state: str
    previous: str
    reasons: tuple[str, ...]


_CHANGES: Final = (
    "SELECT toUnixTimestamp64Milli(time), cluster, node, gpu_index, gpu_uuid, health, prev_health, health_reasons "
    f"FROM {changes(WINDOW_START, WINDOW_END, prefix='{db:Identifier}.')} ORDER BY time, cluster, node, gpu_uuid"
)


def health_changes(store: Store, window: Window) -> list[Change]:
    """Every health change of a sample whose time (interval end) is in `window`, oldest first."""
    return [Change(int(t), c, n, int(i), u, s, p, tuple(r))
            for t, c, n, i, u, s, p, r in store.rows(_CHANGES, window.params())]
