"""Fleet health now (counts by state, reason and node) and its history (GPUs per state per minute).

The per-sample state and reasons are decided by the ingester (pipeline/ingest/health.py). Here:
- **now**: each GPU's latest sample (table `gpu_latest`); a GPU whose latest sample ended more
  than `health.silent_after_s` before the injected `now_ms` is `unknown` with reason `silent`;
- **history**: per minute of the window, each GPU counts once in the worst state of its samples
  that started in that minute (`gpu_usage_1m`); a GPU seen in the window with no sample in a minute
  is `unknown` there. This assumes reporting intervals of at most a minute (the agent default is 1 s).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gpufleet.pipeline.queries.window import MINUTE_MS, STATES, WINDOW, Window

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

SILENT = "silent"

_LATEST: Final = (
    "SELECT gpu_uuid, argMax(cluster, time), argMax(node, time), toString(argMax(health, time)), "
    "argMax(health_reasons, time), toUnixTimestamp64Milli(max(time)) "
    "FROM {db:Identifier}.gpu_latest GROUP BY gpu_uuid ORDER BY gpu_uuid"
)
_KNOWN_GPUS: Final = f"SELECT uniqExact(cluster, node, gpu_uuid) FROM {{db:Identifier}}.gpu_usage_1m WHERE {WINDOW}"
_WORST_PER_MINUTE: Final = (
    "SELECT toInt64(toUnixTimestamp(minute)) * 1000, toString(worst), count() FROM ("
    f"SELECT minute, max(health) AS worst FROM {{db:Identifier}}.gpu_usage_1m WHERE {WINDOW} "
    "GROUP BY minute, cluster, node, gpu_uuid) GROUP BY minute, worst"
)
"""Per minute of the window, GPUs per worst state of their samples in it (bind `Window.params()`)."""


@dataclass(frozen=True)
class GpuState:
    gpu_uuid: str
    cluster: str
    node: str
    state: str
    reasons: tuple[str, ...]
    last_seen_ms: int


@dataclass(frozen=True)
class HealthNow:
    now_ms: int
    gpus: list[GpuState]
    by_state: dict[str, int]
    by_reason: dict[str, int]
    by_node: dict[str, dict[str, int]]
    """`cluster/node` -> state -> GPUs."""

    def to_dict(self) -> dict[str, Any]:
        return {"now_ms": self.now_ms, "by_state": self.by_state, "by_reason": self.by_reason,
                "by_node": self.by_node}


@dataclass(frozen=True)
class HealthMinute:
    minute_ms: int
    counts: dict[str, int] = field(default_factory=dict)


def classify_now(latest: Iterable[tuple[str, str, str, str, list[str], int]], now_ms: int,
                 silent_after_s: float) -> HealthNow:
    """Counts from each GPU's latest (uuid, cluster, node, state, reasons, end ms) (pure)."""
    gpus = []
    for uuid, cluster, node, state, reasons, last_ms in latest:
        if now_ms - last_ms > silent_after_s * 1000:
            gpus.append(GpuState(uuid, cluster, node, "unknown", (SILENT,), last_ms))
        else:
            gpus.append(GpuState(uuid, cluster, node, state, tuple(reasons), last_ms))
    by_state = dict.fromkeys(STATES, 0)
    by_reason: Counter[str] = Counter()
    by_node: dict[str, dict[str, int]] = {}
    for g in gpus:
        by_state[g.state] += 1
        by_reason.update(g.reasons)
        node = by_node.setdefault(f"{g.cluster}/{g.node}", dict.fromkeys(STATES, 0))
        node[g.state] += 1
    return HealthNow(now_ms, gpus, by_state, dict(sorted(by_reason.items())), dict(sorted(by_node.items())))


def current_health(store: Store, now_ms: int, silent_after_s: float) -> HealthNow:
    """Fleet health as of `now_ms` (at or after the newest sample), from each GPU's latest sample."""
    rows = store.rows(_LATEST)
    return classify_now(((u, c, n, s, list(r), int(t)) for u, c, n, s, r, t in rows), now_ms, silent_after_s)


def fill_history(window: Window, known_gpus: int, counts: Iterable[tuple[int, str, int]]) -> list[HealthMinute]:
    """Every minute of the window with GPUs per state; unreported known GPUs are `unknown` (pure)."""
    by_minute: dict[int, dict[str, int]] = {}
    for minute_ms, state, n in counts:
        by_minute.setdefault(minute_ms, dict.fromkeys(STATES, 0))[state] += n
    out = []
    for m in range(window.start_ms, window.end_ms, MINUTE_MS):
        c = by_minute.get(m, dict.fromkeys(STATES, 0))
        c["unknown"] += known_gpus - sum(c.values())
        out.append(HealthMinute(m, c))
    return out


def health_history(store: Store, window: Window) -> list[HealthMinute]:
    """GPUs per health state for each minute of `window`."""
    params = window.params()
    known = store.rows(_KNOWN_GPUS, params)[0][0]
    counts = store.rows(_WORST_PER_MINUTE, params)
    return fill_history(window, int(known), ((int(m), s, int(n)) for m, s, n in counts))
