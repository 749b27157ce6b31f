"""Turn a decoded OTLP metrics request into validated contract points (pure).

Each data point of a contract metric (gpufleet.flops_contract) either becomes a `Point` tied to
this node's GPUs, or is rejected with a reason (wrong instrument kind, unknown GPU, negative or
non-finite value, ...). Points of other metrics are ignored: a job may send all its metrics
here. A point's series is its OTel stream identity (resource, scope, metric name, temporality,
point attributes), which is what counter state is kept by; it is kept as a 16-byte digest, so a
series costs the same whatever its attributes weigh. A point must also come from the job that
holds its GPUs where the allocation source knows it (`gpus.check_job`).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, DataPointFlags, Metric

from gpufleet.agents.otlp.gpus import Attrs, AttrValue, GpuError, GpuRoster, check_job, job_id, resolve_gpus
from gpufleet.flops_contract import CONTRACT, UNITLESS, MetricContract

_DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
_CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
_NO_VALUE = DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK


@dataclass(frozen=True, slots=True)
class Point:
    """One accepted counter point: `value` over (`start_ns`, `time_ns`] (delta) or since `start_ns` (cumulative)."""

    metric: str
    series: Hashable
    gpus: tuple[str, ...]
    job: str | None
    delta: bool
    start_ns: int
    """0 when the sender did not set it."""
    time_ns: int
    value: int | float
    arrival_ms: int
    """When the agent received it (agent clock): attribution releases FLOPs from here on."""


@dataclass
class Extraction:
    """What one request yielded: accepted points, rejections by reason (with an example), ignored points."""

    points: list[Point] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    ignored: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, detail: str, n: int = 1) -> None:
        self.rejected[reason] += n
        self.examples.setdefault(reason, detail)

    def message(self, limit: int = 5) -> str:
        """The partial-success text: counts by reason with the first example of each."""
        parts = [f"{n} x {self.examples[r]}" for r, n in self.rejected.most_common(limit)]
        more = len(self.rejected) - limit
        tail = f"; and {more} more reasons" if more > 0 else ""
        return f"rejected {self.rejected_total} data points: " + "; ".join(parts) + tail


def extract(request: ExportMetricsServiceRequest, roster: GpuRoster, arrival_ms: int) -> Extraction:
    """Validate every data point of `request`; never raises for one bad point."""
    out = Extraction()
    for rm in request.resource_metrics:
        resource = attributes(rm.resource.attributes)
        resource_key = _frozen(resource)
        for sm in rm.scope_metrics:
            stream = (_digest((resource_key, sm.scope.name, sm.scope.version)),)
            for metric in sm.metrics:
                contract = CONTRACT.get(metric.name)
                if contract is None:
                    out.ignored += _count(metric)
                    continue
                _extract_metric(metric, contract, resource, stream, roster, arrival_ms, out)
    return out


def _extract_metric(
    metric: Metric,
    contract: MetricContract,
    resource: Attrs,
    stream: tuple[object, ...],
    roster: GpuRoster,
    arrival_ms: int,
    out: Extraction,
) -> None:
    name = metric.name
    kind = metric.WhichOneof("data")
    n = _count(metric)
    if kind != "sum":
        out.reject("kind", f"{name} must be a monotonic Sum (an OTel Counter), got {kind or 'no data'}", n)
        return
    if not metric.sum.is_monotonic:
        out.reject("monotonic", f"{name} must be monotonic (a Counter, not an UpDownCounter)", n)
        return
    temporality = metric.sum.aggregation_temporality
    if temporality not in (_DELTA, _CUMULATIVE):
        out.reject("temporality", f"{name} has unspecified aggregation temporality", n)
        return
    if metric.unit not in UNITLESS and metric.unit != contract.unit:
        out.reject("unit", f"{name} has unit {metric.unit!r}; report plain counts with unit {contract.unit!r}", n)
        return
    delta = temporality == _DELTA
    for dp in metric.sum.data_points:
        if dp.flags & _NO_VALUE:
            out.ignored += 1
            continue
        which = dp.WhichOneof("value")
        value: int | float = dp.as_int if which == "as_int" else dp.as_double
        if which is None or not math.isfinite(value) or value < 0:
            shown = "no value" if which is None else repr(value)
            out.reject("value", f"{name} value must be a finite number >= 0, got {shown}")
            continue
        if dp.time_unix_nano == 0:
            out.reject("time", f"{name} point has no time_unix_nano")
            continue
        point_attrs = attributes(dp.attributes)
        job = job_id(point_attrs, resource)
        try:
            gpus = resolve_gpus(point_attrs, resource, roster)
            check_job(gpus, job, roster)
        except GpuError as exc:
            out.reject(f"gpu:{exc}", str(exc))
            continue
        series = _digest((*stream, name, delta, _frozen(point_attrs)))
        out.points.append(
            Point(
                metric=name, series=series, gpus=gpus, job=job, delta=delta,
                start_ns=dp.start_time_unix_nano, time_ns=dp.time_unix_nano, value=value, arrival_ms=arrival_ms,
            )
        )


def _count(metric: Metric) -> int:
    kind = metric.WhichOneof("data")
    return len(getattr(metric, kind).data_points) if kind else 0


def attributes(kvs: Iterable[KeyValue]) -> dict[str, AttrValue]:
    """OTLP attributes as plain Python values (arrays -> tuples, kvlists -> sorted pair tuples)."""
    return {kv.key: any_value(kv.value) for kv in kvs}


def any_value(v: AnyValue) -> AttrValue:
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(any_value(x) for x in v.array_value.values)
    if which == "kvlist_value":
        return tuple(sorted((kv.key, repr(any_value(kv.value))) for kv in v.kvlist_value.values))
    return None if which is None else getattr(v, which)


def _digest(identity: tuple[object, ...]) -> bytes:
    """A series identity as 16 bytes (attribute values are str/bool/int/float/bytes/tuples: `repr` is exact)."""
    return hashlib.blake2b(repr(identity).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _frozen(attrs: Attrs) -> tuple[tuple[str, AttrValue], ...]:
    return tuple(sorted(attrs.items()))
