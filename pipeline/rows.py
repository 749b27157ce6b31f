"""Pure functions that turn validated `NodeReport`s into column-oriented rows for ClickHouse.

The ingester derives, per GPU sample, the health verdict (pipeline/health.py), the model's peak
FLOP/s and the hardware FLOPs estimate (tensor-pipe activity x peak x interval), so rollups and
dashboards read them as plain columns. Inserting from tests and benchmarks goes through
`insert_reports`, the same code the ingester runs.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpufleet.config import HealthConfig
from gpufleet.gpu_facts import peak_flops
from gpufleet.wire import GPU_FIELDS, GpuSample, NodeReport
from pipeline.health import Previous, State, classify, previous_of

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

# Wire fields stored as-is (same name in gpu_samples), except the identity/attribution ones
# that get their own handling below.
_SPECIAL = {"index", "uuid", "model", "error", "tenant", "job"}
COPIED_FIELDS: tuple[str, ...] = tuple(f for f in GPU_FIELDS if f not in _SPECIAL)

_copied = operator.attrgetter(*COPIED_FIELDS)

SAMPLE_COLUMNS: tuple[str, ...] = (
    "time", "interval_ms", "ingest_time", "cluster", "node", "boot_id", "seq",
    "gpu_index", "gpu_uuid", "model", "tenant", "job", "error",
    *COPIED_FIELDS,
    "peak_flops", "flops_estimated", "health", "health_reasons",
)

AGENT_COLUMNS: tuple[str, ...] = (
    "time", "ingest_time", "cluster", "node", "boot_id", "seq", "interval_ms", "gpus",
    "collect_seconds", "nvml_errors", "spool_depth", "spool_dropped_total", "send_errors_total",
    "otlp_points_accepted_total", "otlp_points_rejected_total",
)


@dataclass
class Deriver:
    """Per-GPU state the health growth rules need (previous counters), plus the peak table."""

    health: HealthConfig = field(default_factory=HealthConfig)
    peak_overrides: Mapping[str, float] = field(default_factory=dict)
    _prev: dict[str, Previous] = field(default_factory=dict)
    _peaks: dict[str, float | None] = field(default_factory=dict)

    def peak(self, model: str | None) -> float | None:
        if not model:
            return None
        if model not in self._peaks:
            self._peaks[model] = peak_flops(model, self.peak_overrides)
        return self._peaks[model]

    def verdict(self, gpu: GpuSample) -> tuple[int, list[str]]:
        prev = self._prev.get(gpu.uuid)
        self._prev[gpu.uuid] = previous_of(gpu)
        v = classify(gpu, prev, self.health)
        return int(v.state), list(v.reasons)


@dataclass
class Columns:
    """Column-oriented data for one insert: names and one list per column."""

    names: tuple[str, ...]
    data: list[list[object]]

    @property
    def rows(self) -> int:
        return len(self.data[0]) if self.data else 0


def sample_columns(reports: Sequence[NodeReport], ingest_ms: int, deriver: Deriver) -> Columns:
    """One row per GPU per report, in `SAMPLE_COLUMNS` order."""
    pairs = [(r, g) for r in sorted(reports, key=lambda r: r.time_ms) for g in r.gpus]
    gpus = [g for _, g in pairs]
    peaks = [deriver.peak(g.model) for g in gpus]
    verdicts = [deriver.verdict(g) for g in gpus]
    estimated = [
        (g.tensor_active_ratio * p * r.interval_ms / 1000.0)
        if (p is not None and g.tensor_active_ratio is not None and not g.error) else None
        for (r, g), p in zip(pairs, peaks, strict=True)
    ]
    data: list[list[object]] = [
        [r.time_ms for r, _ in pairs],
        [r.interval_ms for r, _ in pairs],
        [ingest_ms] * len(pairs),
        [r.cluster for r, _ in pairs],
        [r.node for r, _ in pairs],
        [r.boot_id for r, _ in pairs],
        [r.seq for r, _ in pairs],
        [g.index for g in gpus],
        [g.uuid for g in gpus],
        [g.model or "" for g in gpus],
        [g.tenant or "" for g in gpus],
        [(g.job or "") if g.tenant else "" for g in gpus],
        [g.error or "" for g in gpus],
    ]
    if gpus:
        data.extend(list(col) for col in zip(*map(_copied, gpus), strict=True))
    else:
        data.extend([] for _ in COPIED_FIELDS)
    data.extend([peaks, estimated, [v[0] for v in verdicts], [v[1] for v in verdicts]])
    return Columns(SAMPLE_COLUMNS, data)


def agent_columns(reports: Sequence[NodeReport], ingest_ms: int) -> Columns:
    """One row per report: the agent's own health."""
    a = [r.agent for r in reports]
    data: list[list[object]] = [
        [r.time_ms for r in reports], [ingest_ms] * len(reports), [r.cluster for r in reports],
        [r.node for r in reports], [r.boot_id for r in reports], [r.seq for r in reports],
        [r.interval_ms for r in reports], [len(r.gpus) for r in reports],
        [x.collect_seconds for x in a], [x.nvml_errors for x in a], [x.spool_depth for x in a],
        [x.spool_dropped_total for x in a], [x.send_errors_total for x in a],
        [x.otlp_points_accepted_total for x in a], [x.otlp_points_rejected_total for x in a],
    ]
    return Columns(AGENT_COLUMNS, data)


def insert_columns(client: Client, table: str, cols: Columns, settings: dict[str, object] | None = None) -> None:
    if cols.rows:
        client.insert(table, cols.data, column_names=list(cols.names), column_oriented=True, settings=settings)


def insert_reports(
    client: Client, database: str, reports: Iterable[NodeReport], ingest_ms: int, deriver: Deriver | None = None
) -> int:
    """Insert reports as the ingester does (no dedup lookup); returns GPU rows written. For tests and benches."""
    batch = list(reports)
    deriver = deriver or Deriver()
    cols = sample_columns(batch, ingest_ms, deriver)
    insert_columns(client, f"{database}.gpu_samples", cols)
    insert_columns(client, f"{database}.agent_reports", agent_columns(batch, ingest_ms))
    return cols.rows


HEALTH_NAMES = {int(s): s.name.lower() for s in State}
