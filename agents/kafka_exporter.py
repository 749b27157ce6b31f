"""The OTel MetricExporter that turns one collection into one wire `NodeReport` and spools its bytes.

`report_from_metrics` is the pure half: it reads every GPU counter, the GPU identity attributes
and the agent's health back from the collected `MetricsData` through the mapping table in
`agents.meter`, and takes from the `Frame` the callbacks observed only what is not a measurement:
the message identity (seq, time, interval), the roster of GPUs (so an unreadable GPU with no
points still appears), the per-GPU events (`xids` in order, `error`) and the attribution that is no
measurement (`meter.FRAME_FIELDS`: unknown allocation, shares, MIG identity). A field with no point is
None in the message. `KafkaMetricExporter` is the thin I/O half: encode and hand the bytes to the
sink (the spool), which owns delivery; the name says where the bytes end up, not that it talks
to a broker itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from gpufleet.agents.meter import (
    AGENT_BY_NAME,
    ATTR_INDEX,
    ATTR_JOB,
    ATTR_MODEL,
    ATTR_PORT_ID,
    ATTR_TENANT,
    ATTR_UUID,
    FRAME_FIELDS,
    GPU_BY_NAME,
    INFO_FIELDS,
    NODE_BY_NAME,
    PORT_BY_NAME,
    RES_BOOT_ID,
    RES_CLUSTER,
    RES_NODE,
    Frame,
    MetricSpec,
    point_value,
)
from gpufleet.errors import GpufleetError
from gpufleet.wire import SCHEMA_VERSION, AgentHealth, GpuSample, NetworkPort, NodeReport, encode

log = logging.getLogger(__name__)


class ExportError(GpufleetError, ValueError):
    """The collected data cannot form a message (wrong resource, overflowed attributes)."""


def report_from_metrics(data: MetricsData, frame: Frame) -> NodeReport:
    """Build the node's message for `frame` from one collection of its MeterProvider."""
    if len(data.resource_metrics) != 1:
        raise ExportError(f"expected one node's metrics, got {len(data.resource_metrics)} resources")
    rm = data.resource_metrics[0]
    res = rm.resource.attributes
    try:
        cluster, node, boot_id = str(res[RES_CLUSTER]), str(res[RES_NODE]), str(res[RES_BOOT_ID])
    except KeyError as exc:
        raise ExportError(f"resource lacks {exc.args[0]!r}; build it with meter.node_resource") from None
    points = _Points()
    for sm in rm.scope_metrics:
        for metric in sm.metrics:
            points.add(metric)
    values, idents = points.gpu, points.gpu_attrs
    gpus = []
    for gpu in frame.gpus:
        attrs = idents.get(gpu.uuid)
        if attrs is None:  # no counter at all (e.g. unreadable): identity from the roster
            index, model, tenant, job = gpu.index, gpu.model, gpu.tenant, gpu.job
        else:
            index, model = int(attrs[ATTR_INDEX]), attrs.get(ATTR_MODEL)
            tenant, job = attrs.get(ATTR_TENANT), attrs.get(ATTR_JOB)
        carried = {f: getattr(gpu, f) for f in (*FRAME_FIELDS, *INFO_FIELDS)}
        gpus.append(GpuSample(index=index, uuid=gpu.uuid, model=model, error=gpu.error, tenant=tenant,
                              job=job, xids=list(gpu.xids), **carried, **values.pop(gpu.uuid, {})))
    if values:
        log.error("points for GPUs not in this interval's roster were ignored: %s", sorted(values))
    network = [NetworkPort(device=p.device, port=p.port, link_layer=p.link_layer,
                           **points.port.pop(f"{p.device}/{p.port}", {})) for p in frame.node.network]
    return NodeReport(
        schema_version=SCHEMA_VERSION, cluster=cluster, node=node, boot_id=boot_id, seq=frame.seq,
        time_ms=frame.time_ms, interval_ms=frame.interval_ms, gpus=gpus, agent=AgentHealth(**points.health),
        gpus_expected=points.node.get("gpus_expected"), gpus_missing=list(frame.node.gpus_missing),
        network=network,
    )


class _Points:
    """One collection's points, sorted by what they describe: GPUs (by uuid), ports (by `hw.id`), the
    agent's health and the node."""

    def __init__(self) -> None:
        self.gpu: dict[str, dict[str, Any]] = {}
        self.gpu_attrs: dict[str, Any] = {}
        self.port: dict[str, dict[str, Any]] = {}
        self.health: dict[str, Any] = {}
        self.node: dict[str, Any] = {}

    def add(self, metric: Any) -> None:
        for table, sink in ((GPU_BY_NAME, self._gpu), (AGENT_BY_NAME, self._flat(self.health)),
                            (PORT_BY_NAME, self._port), (NODE_BY_NAME, self._flat(self.node))):
            spec = table.get(metric.name)
            if spec is not None:
                for point in metric.data.data_points:
                    sink(metric.name, spec, point)
                return

    @staticmethod
    def _flat(into: dict[str, Any]) -> Any:
        def sink(_name: str, spec: MetricSpec, point: Any) -> None:
            into[spec.field] = point_value(spec, point.value)
        return sink

    def _gpu(self, name: str, spec: MetricSpec, point: Any) -> None:
        attrs = point.attributes or {}
        uuid = attrs.get(ATTR_UUID)
        if uuid is None:
            raise ExportError(f"{name} has a point without {ATTR_UUID} ({dict(attrs)}); "
                              "the OTel cardinality limit overflowed")
        self.gpu.setdefault(str(uuid), {})[spec.field] = point_value(spec, point.value)
        self.gpu_attrs.setdefault(str(uuid), attrs)

    def _port(self, name: str, spec: MetricSpec, point: Any) -> None:
        port = (point.attributes or {}).get(ATTR_PORT_ID)
        if port is None:
            raise ExportError(f"{name} has a point without {ATTR_PORT_ID}; the OTel cardinality limit overflowed")
        self.port.setdefault(str(port), {})[spec.field] = point_value(spec, point.value)


class KafkaMetricExporter(MetricExporter):
    """Encode each collection as the node's `NodeReport` and hand `(seq, bytes)` to `sink` (the spool)."""

    def __init__(self, frame_source: Callable[[], Frame | None], sink: Callable[[int, bytes], object]) -> None:
        super().__init__()
        self._frame_source = frame_source
        self._sink = sink
        self.last_report: NodeReport | None = None
        """The last message handed to the sink (for the runner's return value and tests)."""
        self.failures = 0

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.last_report = None
        frame = self._frame_source()
        if frame is None:
            return MetricExportResult.SUCCESS
        try:
            report = report_from_metrics(metrics_data, frame)
            self._sink(report.seq, encode(report))
        except Exception:
            self.failures += 1
            log.exception("could not build or spool the message for seq %d", frame.seq)
            return MetricExportResult.FAILURE
        self.last_report = report
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Nothing to release: the spool and sender are closed by their owner."""
