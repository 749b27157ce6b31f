"""The demo's live terminal view: fleet, ingest and per-tenant figures, refreshed every second."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

from rich.console import Group
from rich.table import Table

if TYPE_CHECKING:
    from gpufleet.pipeline.ingest.ingester import IngestStats
    from gpufleet.pipeline.store import Store

_TENANTS: Final = """
SELECT if(tenant = '', '(unallocated)', tenant) AS t, uniqExact(gpu_uuid),
       avg(util_gpu_ratio),
       sum(coalesce(flops_measured, flops_estimated)) / sum(peak_flops * interval_ms / 1000),
       countIf(flops_measured IS NOT NULL) / count(),
       countIf(health = 'failing')
FROM {db:Identifier}.gpu_samples
WHERE time > (SELECT max(time) FROM {db:Identifier}.gpu_samples) - toIntervalSecond({w:UInt32})
GROUP BY t ORDER BY t
"""


def tenant_rows(store: Store, window_s: int = 10) -> list[Any]:
    """Per tenant over the last `window_s` of data: GPUs, mean utilization, estimated/measured MFU."""
    return store.rows(_TENANTS, {"w": window_s})


def _pct(x: Any) -> str:
    try:
        return f"{100 * float(x):5.1f}%"
    except (TypeError, ValueError):
        return "   - "


class LiveView:
    """Builds a rich renderable from the store and the ingester's counters."""

    def __init__(self, store: Store, stats: IngestStats, expected_gpus: int) -> None:
        self.store, self.stats, self.expected = store, stats, expected_gpus
        self._last = (time.monotonic(), 0)
        self.rate = 0.0

    def render(self, status: dict[str, Any], elapsed_s: float) -> Group:
        now, rows = time.monotonic(), self.stats.rows
        dt = now - self._last[0]
        if dt >= 0.5:
            self.rate = (rows - self._last[1]) / dt
            self._last = (now, rows)
        lag = (status.get("ingest_lag_ms") or {}).get("p50")
        head = Table.grid(padding=(0, 2))
        head.add_row(
            f"[b]gpufleet demo[/b]  t+{elapsed_s:4.0f}s",
            f"GPUs reporting [b]{status.get('gpus_reporting', 0)}[/b]/{self.expected}",
            f"nodes {status.get('nodes_reporting', 0)}",
            f"samples {status.get('samples_total', 0):,}",
            f"{self.rate:,.0f} samples/s",
            f"lag p50 {lag if lag is not None else '-'} ms",
            f"DLQ {status.get('dlq_total', 0)}",
            f"dups {self.stats.duplicates}",
        )
        tenants = Table(title="last 10 s by tenant", expand=False)
        for col in ("tenant", "GPUs", "util", "MFU", "measured", "failing"):
            tenants.add_column(col, justify="right" if col != "tenant" else "left")
        for t, gpus, util, mfu, cov, failing in tenant_rows(self.store):
            tenants.add_row(str(t), str(gpus), _pct(util), _pct(mfu), _pct(cov), str(failing))
        parts: list[Any] = [head, tenants]
        firing = status.get("alerts_firing")
        if isinstance(firing, list) and firing:
            alerts = Table(title=f"alerts firing ({len(firing)})")
            for col in ("alert", "severity", "node", "gpu", "tenant", "since"):
                alerts.add_column(col)
            for a in firing[:12]:
                lab = a.get("labels", {})
                alerts.add_row(a.get("alertname", ""), a.get("severity", ""), lab.get("node", ""),
                               lab.get("gpu_index", lab.get("gpu", ""))[:12], lab.get("tenant", ""),
                               str(a.get("starts_at", ""))[11:19])
            parts.append(alerts)
        if self.stats.last_error:
            parts.append(f"[red]ingest error:[/red] {self.stats.last_error}")
        return Group(*parts)
