"""Pure functions that turn validated `NodeReport`s into column-oriented rows for ClickHouse.

The ingester derives, per GPU sample, the health verdict (pipeline/ingest/health.py), the model's peak
FLOP/s, the hardware FLOPs estimate (tensor-pipe activity x peak x interval) and the time the
sample claims (pipeline/ingest/claims.py) and whether the sample changed the GPU's health state
(pipeline/ingest/transitions.py), so rollups and dashboards read them as plain columns. `derive`
computes health, changes and claims once per batch, in sample-time order (the growth rules and the
changes compare each GPU with its previous sample; a claim takes what earlier samples left); `derived_columns`
builds the rows, and `pipeline/ingest/staging.py` ships the same values beside the message bytes.
Inserting from tests and benchmarks goes through `insert_reports`, the same code the ingester runs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import TYPE_CHECKING

from gpufleet.config import HealthConfig
from gpufleet.gpu_facts import peak_flops
from gpufleet.pipeline.ingest import claims, transitions
from gpufleet.pipeline.ingest.claims import ClaimBook
from gpufleet.pipeline.ingest.health import Previous, State, classify, classify_all, previous_of
from gpufleet.wire import GPU_FIELDS, PORT_FIELDS, GpuSample, NodeReport, share_of_gpu

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

# Wire fields stored as-is (same name in gpu_samples), except the identity/attribution ones
# that get their own handling below.
_SPECIAL = {"index", "uuid", "model", "error", "tenant", "job"}
COPIED_FIELDS: tuple[str, ...] = tuple(f for f in GPU_FIELDS if f not in _SPECIAL)
_EMPTY_WHEN_NULL = frozenset({"parent_uuid", "mig_profile"})
"""Nullable on the wire, '' in gpu_samples (as model, tenant, job and error)."""

_gpu_fields = operator.attrgetter("index", "uuid", "model", "tenant", "job", "error",
                                  *COPIED_FIELDS)
_report_fields = operator.attrgetter("time_ms", "interval_ms", "cluster", "node", "boot_id", "seq")
_gpus_of = operator.attrgetter("gpus")
_time_of = operator.attrgetter("time_ms")
_model_of = operator.attrgetter("model")

SAMPLE_COLUMNS: tuple[str, ...] = (
    "time", "interval_ms", "claimed_ms", "claim_start", "ingest_time", "cluster", "node", "boot_id", "seq",
    "gpu_index", "gpu_uuid", "model", "tenant", "job", "error",
    *COPIED_FIELDS,
    "peak_flops", "flops_estimated", "health", "health_reasons", "health_change",
)

AGENT_COLUMNS: tuple[str, ...] = (
    "time", "ingest_time", "cluster", "node", "boot_id", "seq", "interval_ms", "gpus",
    "collect_seconds", "nvml_errors", "spool_depth", "spool_dropped_total", "send_errors_total",
    "otlp_points_accepted_total", "otlp_points_rejected_total",
    "nvml_calls", "nvml_call_budget", "nvml_deadline_misses", "xids_dropped_total", "allocation_unknown_total",
    "gpus_expected", "gpus_missing", "gpus_enumerated",
)

_PORT_VALUES: tuple[str, ...] = tuple(f for f in PORT_FIELDS if f not in {"device", "port", "link_layer"})
NETWORK_COLUMNS: tuple[str, ...] = (
    "time", "interval_ms", "ingest_time", "cluster", "node", "boot_id", "seq",
    "device", "port", "link_layer", *_PORT_VALUES,
)


@dataclass
class Deriver:
    """Per-GPU state: previous counters (health growth rules), the newest sample's time and state
    (`transitions.mark`) and claimed time; plus the peak table."""

    health: HealthConfig = field(default_factory=HealthConfig)
    peak_overrides: Mapping[str, float] = field(default_factory=dict)
    claims: ClaimBook = field(default_factory=ClaimBook)
    _prev: dict[str, Previous] = field(default_factory=dict)
    _last: transitions.Last = field(default_factory=dict)
    _peaks: dict[str | None, float | None] = field(default_factory=dict)

    def peak(self, model: str | None) -> float | None:
        if model not in self._peaks:
            self._peaks[model] = peak_flops(model, self.peak_overrides) if model else None
        return self._peaks[model]

    def verdict(self, gpu: GpuSample) -> tuple[int, list[str]]:
        prev = self._prev.get(gpu.uuid)
        self._prev[gpu.uuid] = previous_of(gpu)
        v = classify(gpu, prev, self.health)
        return int(v.state), list(v.reasons)

    def verdicts(self, gpus: Sequence[GpuSample]) -> tuple[list[int], list[list[str]]]:
        """`verdict` for each sample in order (states, reasons): the batch form the ingester uses."""
        return classify_all(gpus, self._prev, self.health)

    def changes(self, reports: Sequence[NodeReport], health: Sequence[int]) -> list[int]:
        """`health_change` of each sample of `reports`, in order (`transitions.mark`)."""
        return transitions.mark(reports, health, self._last)


@dataclass
class Derived:
    """What the ingester adds to each GPU sample of a batch, flat in `derive`'s sample order."""

    reports: list[NodeReport]
    """The batch sorted by sample time (stable): the order of every list below."""
    counts: list[int]
    """GPU samples per report."""
    health: list[int]
    reasons: list[list[str]]
    peak: Callable[[str | None], float | None]
    """Peak FLOP/s of a model name (`Deriver.peak`)."""
    claimed: list[int] = field(default_factory=list)
    """Milliseconds each sample claims (`claims.ClaimBook.claim_all`)."""
    claim_start: list[int] = field(default_factory=list)
    """Where each sample's claim starts, Unix ms."""
    changes: list[int] = field(default_factory=list)
    """`health_change` of each sample (`transitions.mark`)."""


def derive(reports: Sequence[NodeReport], deriver: Deriver) -> Derived:
    """Health, health change and claimed time of every GPU sample, reports taken in time order (growth
    rules and changes compare with the GPU's previous sample; a claim takes what earlier samples left).
    Load the claims it needs first (`claims.load`), or the book takes the GPUs it does not know as
    never claimed."""
    ordered = sorted(reports, key=_time_of)
    health, reasons = deriver.verdicts(list(chain.from_iterable(map(_gpus_of, ordered))))
    claimed, claim_start = deriver.claims.claim_all(ordered)
    changes = deriver.changes(ordered, health)
    return Derived(ordered, [len(r.gpus) for r in ordered], health, reasons, deriver.peak, claimed, claim_start,
                   changes)


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
    return derived_columns(derive(reports, deriver), ingest_ms)


def share_of_peak(peak: float | None, gpu: GpuSample) -> float | None:
    """The peak FLOP/s a sample is measured against: the model's, or a MIG instance's share of it."""
    if peak is None or gpu.slices is None:
        return peak
    num, den = share_of_gpu(gpu)
    return peak * num / den


def estimated_flops(tensor_active_ratio: float | None, peak: float | None, interval_ms: int,
                    error: str | None) -> float | None:
    """Hardware FLOPs estimate of one sample: tensor activity x peak FLOP/s x interval (None if unknown).

    `pipeline/ingest/staging.py` computes the same expression in SQL, in the same order of operations.
    """
    if peak is None or tensor_active_ratio is None or error:
        return None
    return tensor_active_ratio * peak * interval_ms / 1000.0


def derived_columns(d: Derived, ingest_ms: int, keep: Sequence[bool] | None = None) -> Columns:
    """The rows of `d` (only the reports whose `keep` flag is set, when given), in `SAMPLE_COLUMNS` order."""
    reports, counts, health, reasons = d.reports, d.counts, d.health, d.reasons
    claimed, claim_start, changes = d.claimed, d.claim_start, d.changes
    if keep is not None:
        flags = list(chain.from_iterable(map(repeat, keep, counts)))
        reports = [r for r, k in zip(reports, keep, strict=True) if k]
        counts = [c for c, k in zip(counts, keep, strict=True) if k]
        health, reasons, claimed, claim_start, changes = (
            [x for x, k in zip(col, flags, strict=True) if k]
            for col in (health, reasons, claimed, claim_start, changes))
    n = sum(counts)
    if not n:
        return Columns(SAMPLE_COLUMNS, [[] for _ in SAMPLE_COLUMNS])
    by_report = zip(*map(_report_fields, reports), strict=True)
    per_report = [list(chain.from_iterable(map(repeat, col, counts))) for col in by_report]
    gpus = list(chain.from_iterable(map(_gpus_of, reports)))
    index, uuid, model, tenant, job, error, *copied = zip(*map(_gpu_fields, gpus), strict=True)
    time, interval, cluster, node, boot, seq = per_report
    peak_of = {m: d.peak(m) for m in set(model)}
    peak = [share_of_peak(peak_of[m], g) for m, g in zip(model, gpus, strict=True)]
    estimated = list(map(estimated_flops, (g.tensor_active_ratio for g in gpus), peak, interval, error))
    data: list[list[object]] = [
        time, interval, claimed, claim_start, [ingest_ms] * n, cluster, node, boot, seq,
        list(index), list(uuid),
        [m or "" for m in model],
        [t or "" for t in tenant],
        [(j or "") if t else "" for t, j in zip(tenant, job, strict=True)],
        [e or "" for e in error],
        *(_column(name, values) for name, values in zip(COPIED_FIELDS, copied, strict=True)),
        peak, estimated, health, reasons, changes,
    ]
    return Columns(SAMPLE_COLUMNS, data)


def _column(name: str, values: Sequence[object]) -> list[object]:
    """A copied wire field as its gpu_samples column: '' for null strings, shares as (tenant, job, weight)."""
    if name in _EMPTY_WHEN_NULL:
        return [v or "" for v in values]
    if name == "shares":
        return [[(s.tenant, s.job or "", s.weight) for s in v] for v in values]  # type: ignore[attr-defined]
    return list(values)


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
        [x.nvml_calls for x in a], [x.nvml_call_budget for x in a], [x.nvml_deadline_misses for x in a],
        [x.xids_dropped_total for x in a], [x.allocation_unknown_total for x in a],
        [r.gpus_expected for r in reports], [list(r.gpus_missing) for r in reports],
        [physical_gpus(r) for r in reports],
    ]
    return Columns(AGENT_COLUMNS, data)


def physical_gpus(report: NodeReport) -> int:
    """The physical GPUs a message lists: a MIG GPU's instances count once, by their parent."""
    return len({g.parent_uuid or g.uuid for g in report.gpus})


def network_columns(reports: Sequence[NodeReport], ingest_ms: int) -> Columns:
    """One row per network port per report (`network_ports`); reports without ports add none."""
    rows = [(r, p) for r in reports for p in r.network]
    data: list[list[object]] = [
        [r.time_ms for r, _ in rows], [r.interval_ms for r, _ in rows], [ingest_ms] * len(rows),
        [r.cluster for r, _ in rows], [r.node for r, _ in rows], [r.boot_id for r, _ in rows],
        [r.seq for r, _ in rows], [p.device for _, p in rows], [p.port for _, p in rows],
        [p.link_layer or "" for _, p in rows],
        *([getattr(p, f) for _, p in rows] for f in _PORT_VALUES),
    ]
    return Columns(NETWORK_COLUMNS, data)


def insert_columns(store: Store, table: str, cols: Columns, settings: dict[str, object] | None = None) -> None:
    """Insert `cols` into the store's `table` (a bare name), as one block."""
    if cols.rows:
        store.insert(table, cols.data, cols.names, column_oriented=True, settings=settings)


def insert_reports(
    store: Store, reports: Iterable[NodeReport], ingest_ms: int, deriver: Deriver | None = None
) -> int:
    """Insert reports as the ingester does (no dedup lookup; the claims it needs read from the store first);
    returns GPU rows written. For tests and benches."""
    batch = list(reports)
    deriver = deriver or Deriver()
    claims.load(store, deriver.claims, batch, ingest_ms)
    cols = sample_columns(batch, ingest_ms, deriver)
    insert_columns(store, "agent_reports", agent_columns(batch, ingest_ms))
    insert_columns(store, "network_ports", network_columns(batch, ingest_ms))
    insert_columns(store, "gpu_samples", cols)
    return cols.rows


HEALTH_NAMES = {int(s): s.name.lower() for s in State}
