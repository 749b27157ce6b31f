"""Hand-built OTLP requests, a raw HTTP client, and a real OpenTelemetry SDK counter for the OTLP tests."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import Counter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric, NumberDataPoint
from opentelemetry.sdk.metrics import Counter as SdkCounter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality as SdkTemporality
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from gpufleet.agents.otlp.points import Point

GPUS = {0: "GPU-aaaa0000", 1: "GPU-bbbb1111", 2: "GPU-cccc2222", 3: "GPU-dddd3333"}
A, B, C, D = GPUS[0], GPUS[1], GPUS[2], GPUS[3]
FLOPS = "gpufleet.job.flops"
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA


def point(
    value: float, *, time_s: float, start_s: float = 0.0, gpus: Sequence[str] = (A,), arrival_ms: int = 0,
    series: str = "s1", delta: bool = False, metric: str = FLOPS,
) -> Point:
    """A validated point as the receiver would queue it (job times in seconds for readability)."""
    return Point(
        metric=metric, series=(series, delta), gpus=tuple(gpus), job="j1", delta=delta,
        start_ns=ns(start_s), time_ns=ns(time_s), value=value, arrival_ms=arrival_ms,
    )


def ns(seconds: float) -> int:
    """Seconds (ms resolution) -> integer ns, exactly (no float product at 1e18 magnitude)."""
    return round(seconds * 1000) * 1_000_000


def kv(key: str, value: str | int | Sequence[str]) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=v) for v in value])))


@dataclass
class Dp:
    """One data point for `request`: value, job times in seconds, point attributes."""

    value: float | int
    time_s: float
    start_s: float = 0.0
    attrs: dict[str, str | int | Sequence[str]] | None = None


def request(
    dps: Sequence[Dp], *, resource: dict[str, str | int | Sequence[str]] | None = None, name: str = FLOPS,
    unit: str = "{flop}", temporality: int = CUMULATIVE, monotonic: bool = True, kind: str = "sum",
) -> ExportMetricsServiceRequest:
    """An ExportMetricsServiceRequest with one metric, built field by field."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(k, v) for k, v in (resource or {}).items())
    sm = rm.scope_metrics.add()
    sm.scope.name = "test"
    metric: Metric = sm.metrics.add(name=name, unit=unit)
    data_points = metric.gauge.data_points if kind == "gauge" else metric.sum.data_points
    if kind == "sum":
        metric.sum.aggregation_temporality = temporality
        metric.sum.is_monotonic = monotonic
    for d in dps:
        dp: NumberDataPoint = data_points.add(start_time_unix_nano=ns(d.start_s), time_unix_nano=ns(d.time_s))
        if isinstance(d.value, int):
            dp.as_int = d.value
        else:
            dp.as_double = d.value
        dp.attributes.extend(kv(k, v) for k, v in (d.attrs or {}).items())
    return req


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


def post(
    address: tuple[str, int], body: bytes, content_type: str = "application/x-protobuf",
    path: str = "/v1/metrics", extra: dict[str, str] | None = None, method: str = "POST",
) -> Response:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        headers = {"Content-Type": content_type, **(extra or {})}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return Response(r.status, r.reason, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


@contextmanager
def sdk_counter(
    endpoint: str, resource: dict[str, str | Sequence[str]], *, delta: bool = False,
    compression: Compression = Compression.NoCompression,
) -> Iterator[tuple[Counter, MeterProvider]]:
    """A real SDK Counter named gpufleet.job.flops exporting through OTLPMetricExporter; flush to send."""
    exporter = OTLPMetricExporter(
        endpoint=f"{endpoint}/v1/metrics", compression=compression,
        preferred_temporality={SdkCounter: SdkTemporality.DELTA} if delta else None,
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create(resource), shutdown_on_exit=False)
    try:
        yield provider.get_meter("test").create_counter(FLOPS, unit="{flop}"), provider
    finally:
        provider.shutdown(timeout_millis=5_000)
