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
    ATTR_TENANT,
    ATTR_UUID,
    FRAME_FIELDS,
    GPU_BY_NAME,
    RES_BOOT_ID,
    RES_CLUSTER,
    RES_NODE,
    Frame,
    point_value,
)
from gpufleet.errors import GpufleetError
from gpufleet.wire import SCHEMA_VERSION, AgentHealth, GpuSample, NodeReport, encode

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
    values: dict[str, dict[str, Any]] = {}
    idents: dict[str, Any] = {}
    health: dict[str, Any] = {}
    for sm in rm.scope_metrics:
        for metric in sm.metrics:
            gpu_spec = GPU_BY_NAME.get(metric.name)
            agent_spec = AGENT_BY_NAME.get(metric.name) if gpu_spec is None else None
            if gpu_spec is None and agent_spec is None:
                continue
            for point in metric.data.data_points:
                attrs = point.attributes or {}
                if agent_spec is not None:
                    health[agent_spec.field] = point_value(agent_spec, point.value)
                    continue
                uuid = attrs.get(ATTR_UUID)
                if uuid is None:
                    raise ExportError(f"{metric.name} has a point without {ATTR_UUID} ({dict(attrs)}); "
                                      "the OTel cardinality limit overflowed")
                values.setdefault(str(uuid), {})[gpu_spec.field] = point_value(gpu_spec, point.value)
                idents.setdefault(str(uuid), attrs)
    gpus = []
    for gpu in frame.gpus:
        attrs = idents.get(gpu.uuid)
        if attrs is None:  # no counter at all (e.g. unreadable): identity from the roster
            index, model, tenant, job = gpu.index, gpu.model, gpu.tenant, gpu.job
        else:
            index, model = int(attrs[ATTR_INDEX]), attrs.get(ATTR_MODEL)
            tenant, job = attrs.get(ATTR_TENANT), attrs.get(ATTR_JOB)
        carried = {f: getattr(gpu, f) for f in FRAME_FIELDS}
        gpus.append(GpuSample(index=index, uuid=gpu.uuid, model=model, error=gpu.error, tenant=tenant,
                              job=job, xids=list(gpu.xids), **carried, **values.pop(gpu.uuid, {})))
    if values:
        log.error("points for GPUs not in this interval's roster were ignored: %s", sorted(values))
    return NodeReport(
        schema_version=SCHEMA_VERSION, cluster=cluster, node=node, boot_id=boot_id, seq=frame.seq,
        time_ms=frame.time_ms, interval_ms=frame.interval_ms, gpus=gpus, agent=AgentHealth(**health),
    )


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
