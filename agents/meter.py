"""OpenTelemetry instruments of one node agent, and the one table that maps wire fields to metrics.

Design notes: docs/design-notes.md#agents-meter-py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, MetricsData
from opentelemetry.sdk.resources import Resource

from gpufleet.version import __version__
from gpufleet.wire import GPU_FIELDS, PORT_FIELDS, AgentHealth, GpuSample, NetworkPort

log = logging.getLogger(__name__)

Kind = Literal["gauge", "counter", "updown"]
ValueType = Literal["float", "int", "bool"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One row of the mapping table: a wire field and the OTel metric that carries it."""

    field: str
    name: str
    unit: str
    kind: Kind
    value: ValueType
    description: str


_g = MetricSpec

GPU_METRICS: Final[tuple[MetricSpec, ...]] = (
    _g("util_gpu_ratio", "hw.gpu.utilization", "1", "gauge", "float", "Fraction of time a kernel ran"),
    _g("util_mem_ratio", "gpufleet.gpu.memory.busy", "1", "gauge", "float",
       "Fraction of time device memory was read or written (NVML memory utilization)"),
    _g("mem_used_bytes", "hw.gpu.memory.usage", "By", "updown", "int", "Device memory in use"),
    _g("mem_total_bytes", "hw.gpu.memory.limit", "By", "updown", "int", "Device memory size"),
    _g("power_w", "hw.power", "W", "gauge", "float", "Board power draw"),
    _g("energy_j", "hw.energy", "J", "counter", "float", "Energy since the driver loaded"),
    _g("energy_interval_j", "gpufleet.gpu.energy.interval", "J", "gauge", "float",
       "Energy used during the interval (growth of the energy counter)"),
    _g("temp_gpu_c", "gpufleet.gpu.temperature", "Cel", "gauge", "float", "GPU die temperature"),
    _g("temp_mem_c", "gpufleet.gpu.memory.temperature", "Cel", "gauge", "float", "HBM temperature"),
    _g("clock_sm_mhz", "gpufleet.gpu.clock.sm", "MHz", "gauge", "int", "SM clock"),
    _g("clock_mem_mhz", "gpufleet.gpu.clock.memory", "MHz", "gauge", "int", "Memory clock"),
    _g("clock_event_reasons", "gpufleet.gpu.clock.event_reasons", "1", "gauge", "int",
       "NVML clocks-event (throttle) reason bitmask"),
    _g("throttle_power_ratio", "gpufleet.gpu.throttle.power", "1", "gauge", "float",
       "Share of the interval the clocks were held down by the power limit"),
    _g("throttle_thermal_ratio", "gpufleet.gpu.throttle.thermal", "1", "gauge", "float",
       "Share of the interval the clocks were held down for temperature"),
    _g("ecc_corrected_volatile", "gpufleet.gpu.ecc.corrected.volatile", "{error}", "counter", "int",
       "Corrected ECC errors since the driver loaded"),
    _g("ecc_uncorrected_volatile", "gpufleet.gpu.ecc.uncorrected.volatile", "{error}", "counter", "int",
       "Uncorrected ECC errors since the driver loaded"),
    _g("ecc_corrected_aggregate", "gpufleet.gpu.ecc.corrected.aggregate", "{error}", "counter", "int",
       "Corrected ECC errors over the GPU's life"),
    _g("ecc_uncorrected_aggregate", "gpufleet.gpu.ecc.uncorrected.aggregate", "{error}", "counter", "int",
       "Uncorrected ECC errors over the GPU's life"),
    _g("remapped_rows_correctable", "gpufleet.gpu.memory.remapped_rows.correctable", "{row}", "gauge", "int",
       "Rows remapped for correctable errors"),
    _g("remapped_rows_uncorrectable", "gpufleet.gpu.memory.remapped_rows.uncorrectable", "{row}", "gauge",
       "int", "Rows remapped for uncorrectable errors"),
    _g("remap_pending", "gpufleet.gpu.memory.remap.pending", "1", "gauge", "bool",
       "1 when a row remap waits for a GPU reset"),
    _g("remap_failure", "gpufleet.gpu.memory.remap.failure", "1", "gauge", "bool",
       "1 when a row remap has failed"),
    _g("retired_pages", "gpufleet.gpu.memory.retired_pages", "{page}", "gauge", "int", "Retired pages"),
    _g("retired_pages_pending", "gpufleet.gpu.memory.retired_pages.pending", "1", "gauge", "bool",
       "1 when a page retirement waits for a reboot"),
    _g("pcie_replay_count", "gpufleet.gpu.pcie.replays", "{replay}", "counter", "int", "PCIe replays"),
    _g("nvlink_crc_errors", "gpufleet.gpu.nvlink.errors.crc", "{error}", "counter", "int",
       "NVLink CRC errors, all links"),
    _g("nvlink_replay_errors", "gpufleet.gpu.nvlink.errors.replay", "{error}", "counter", "int",
       "NVLink replay errors, all links"),
    _g("nvlink_recovery_errors", "gpufleet.gpu.nvlink.errors.recovery", "{error}", "counter", "int",
       "NVLink recovery errors, all links"),
    _g("nvlink_links_down", "gpufleet.gpu.nvlink.links_down", "{link}", "gauge", "int",
       "NVLink links that are down"),
    _g("nvlink_symbol_errors", "gpufleet.gpu.nvlink.errors.symbol", "{error}", "counter", "int",
       "NVLink5 received-symbol errors, all links"),
    _g("nvlink_effective_errors", "gpufleet.gpu.nvlink.errors.effective", "{error}", "counter", "int",
       "NVLink5 effective errors, all links"),
    _g("compute_processes", "gpufleet.gpu.processes", "{process}", "gauge", "int", "Compute processes"),
    _g("sm_active_ratio", "gpufleet.gpu.sm.active", "1", "gauge", "float", "GPM SM activity"),
    _g("tensor_active_ratio", "gpufleet.gpu.tensor.active", "1", "gauge", "float",
       "GPM any-tensor-pipe activity"),
    _g("dram_active_ratio", "gpufleet.gpu.dram.active", "1", "gauge", "float", "GPM DRAM activity"),
    _g("flops_measured", "gpufleet.gpu.flops.measured", "{flop}", "gauge", "float",
       "Model FLOPs the job reported executing during the interval (OTLP)"),
    _g("tokens_measured", "gpufleet.gpu.tokens.measured", "{token}", "gauge", "float",
       "Tokens the job reported processing during the interval (OTLP)"),
    _g("samples_measured", "gpufleet.gpu.samples.measured", "{sample}", "gauge", "float",
       "Samples the job reported processing during the interval (OTLP)"),
    _g("recovery_action", "gpufleet.gpu.recovery_action", "1", "gauge", "int",
       "NVML recovery action the GPU needs (0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, ...)"),
    _g("temp_slowdown_c", "gpufleet.gpu.temperature.slowdown", "Cel", "gauge", "float",
       "Temperature at which the GPU begins HW slowdown"),
    _g("temp_shutdown_c", "gpufleet.gpu.temperature.shutdown", "Cel", "gauge", "float",
       "Temperature at which the GPU shuts down"),
    _g("temp_mem_max_c", "gpufleet.gpu.memory.temperature.max", "Cel", "gauge", "float",
       "Maximum operating temperature of the HBM"),
    _g("power_limit_w", "hw.power.limit", "W", "gauge", "float", "Power limit enforced now"),
    _g("power_limit_default_w", "gpufleet.gpu.power.limit.default", "W", "gauge", "float",
       "Power limit the GPU boots with"),
    _g("fabric_state", "gpufleet.gpu.fabric.state", "1", "gauge", "int",
       "NVSwitch fabric registration: 1 not started, 2 in progress, 3 completed"),
    _g("fabric_status", "gpufleet.gpu.fabric.status", "1", "gauge", "int",
       "NVML return code of the fabric registration"),
    _g("fabric_clique_id", "gpufleet.gpu.fabric.clique", "1", "gauge", "int", "NVLink fabric clique id"),
    _g("fabric_health_mask", "gpufleet.gpu.fabric.health_mask", "1", "gauge", "int",
       "NVML fabric health bitmask"),
    _g("persistence_mode", "gpufleet.gpu.persistence_mode", "1", "gauge", "bool", "1 when persistence mode is on"),
    _g("ecc_mode", "gpufleet.gpu.ecc_mode", "1", "gauge", "bool", "1 when ECC is enabled"),
)

PORT_METRICS: Final[tuple[MetricSpec, ...]] = (
    _g("state", "gpufleet.network.port.state", "1", "gauge", "int",
       "Logical port state (1 DOWN, 2 INIT, 3 ARMED, 4 ACTIVE, 5 ACTIVE_DEFER)"),
    _g("phys_state", "gpufleet.network.port.phys_state", "1", "gauge", "int",
       "Physical port state (5 LinkUp, 2 Polling, 3 Disabled, ...)"),
    _g("rate_gbps", "gpufleet.network.port.rate", "Gbit/s", "gauge", "float", "Link rate"),
    _g("link_downed", "gpufleet.network.port.link_downed", "{event}", "counter", "int",
       "Times the link went down (error recovery failed)"),
    _g("link_error_recovery", "gpufleet.network.port.link_error_recovery", "{event}", "counter", "int",
       "Link error recoveries that succeeded"),
    _g("symbol_error", "gpufleet.network.port.symbol_errors", "{error}", "counter", "int",
       "Minor link errors (symbol errors)"),
    _g("port_rcv_errors", "gpufleet.network.port.rcv_errors", "{packet}", "counter", "int",
       "Received packets with errors"),
    _g("port_xmit_discards", "gpufleet.network.port.xmit_discards", "{packet}", "counter", "int",
       "Outbound packets discarded (port down or congested)"),
)
"""Counters of `NetworkPort`, one point per port (attributes `hw.id` = `<device>/<port>`, `rdma.device`,
`rdma.port`, `rdma.link_layer`)."""

NODE_METRICS: Final[tuple[MetricSpec, ...]] = (
    _g("gpus_expected", "gpufleet.node.gpus.expected", "{gpu}", "gauge", "int",
       "GPUs the node should have (config, or its first complete enumeration)"),
)

AGENT_METRICS: Final[tuple[MetricSpec, ...]] = (
    _g("collect_seconds", "gpufleet.agent.collect.duration", "s", "gauge", "float",
       "Wall time of this interval's collection"),
    _g("nvml_errors", "gpufleet.agent.nvml.errors", "{error}", "gauge", "int",
       "NVML calls that failed this interval"),
    _g("nvml_calls", "gpufleet.agent.nvml.calls", "{call}", "gauge", "int",
       "NVML queries made this interval (event waits excluded)"),
    _g("nvml_call_budget", "gpufleet.agent.nvml.call_budget", "{call}", "gauge", "int",
       "NVML queries the agent expects to need per interval"),
    _g("nvml_deadline_misses", "gpufleet.agent.nvml.deadline_misses", "{gpu}", "gauge", "int",
       "GPUs whose NVML read missed this interval's deadline"),
    _g("xids_dropped_total", "gpufleet.agent.xids.dropped", "{xid}", "counter", "int",
       "XIDs dropped over the per-GPU queue bound"),
    _g("spool_depth", "gpufleet.agent.spool.depth", "{message}", "updown", "int", "Messages waiting to send"),
    _g("spool_dropped_total", "gpufleet.agent.spool.dropped", "{message}", "counter", "int",
       "Messages dropped unsent because the spool was full"),
    _g("send_errors_total", "gpufleet.agent.send.errors", "{error}", "counter", "int", "Failed sends"),
    _g("otlp_points_accepted_total", "gpufleet.agent.otlp.points.accepted", "{point}", "counter", "int",
       "FLOPs points accepted by the OTLP receiver"),
    _g("otlp_points_rejected_total", "gpufleet.agent.otlp.points.rejected", "{point}", "counter", "int",
       "FLOPs points rejected by the OTLP receiver"),
    _g("flops_clamped_total", "gpufleet.agent.flops.clamped", "{interval}", "counter", "int",
       "GPU-intervals whose measured FLOPs were clamped at the GPU's peak x interval"),
    _g("allocation_unknown_total", "gpufleet.agent.allocation.unknown", "{interval}", "counter", "int",
       "GPU-intervals the allocation source could not attribute"),
)

GPU_BY_NAME: Final = {s.name: s for s in GPU_METRICS}
AGENT_BY_NAME: Final = {s.name: s for s in AGENT_METRICS}
PORT_BY_NAME: Final = {s.name: s for s in PORT_METRICS}
NODE_BY_NAME: Final = {s.name: s for s in NODE_METRICS}

ATTR_UUID, ATTR_INDEX, ATTR_MODEL, ATTR_TENANT, ATTR_JOB = "hw.id", "gpu.index", "hw.model", "tenant", "job"
IDENTITY_FIELDS: Final = ("index", "uuid", "model", "tenant", "job")
EVENT_FIELDS: Final = ("error", "xids")
"""Carried beside the metrics in the `Frame` (events, not measurements)."""
FRAME_FIELDS: Final = ("allocation_unknown", "shares", "parent_uuid", "gpu_instance_id", "compute_instance_id",
                       "mig_profile", "slices", "slices_total")
"""Attribution carried beside the metrics in the `Frame` (who holds the GPU, what part of a GPU it is)."""
ATTR_MIG_PROFILE, ATTR_PARENT = "gpu.mig.profile", "hw.parent_id"
INFO_FIELDS: Final = ("fabric_cluster_uuid", "serial", "vbios_version", "driver_version")
"""Text about the GPU, carried beside the metrics in the `Frame` as the events are (not measurements)."""
ATTR_PORT_ID, ATTR_PORT_DEVICE, ATTR_PORT, ATTR_LINK_LAYER = "hw.id", "rdma.device", "rdma.port", "rdma.link_layer"
PORT_IDENTITY: Final = ("device", "port", "link_layer")

RES_CLUSTER, RES_NODE, RES_BOOT_ID = "gpufleet.cluster", "host.name", "service.instance.id"
SCOPE = "gpufleet.agent"


def _check_table() -> None:
    mapped = {s.field for s in GPU_METRICS}
    expected = set(GPU_FIELDS) - set(IDENTITY_FIELDS) - set(EVENT_FIELDS) - set(FRAME_FIELDS) - set(INFO_FIELDS)
    if mapped != expected:
        raise RuntimeError(f"gpufleet.agents.meter.GPU_METRICS is out of step with GpuSample: "
                           f"unmapped {sorted(expected - mapped)}, unknown {sorted(mapped - expected)}")
    if {s.field for s in AGENT_METRICS} != set(AgentHealth.__struct_fields__):
        raise RuntimeError("gpufleet.agents.meter.AGENT_METRICS is out of step with AgentHealth")
    if {s.field for s in PORT_METRICS} != set(PORT_FIELDS) - set(PORT_IDENTITY):
        raise RuntimeError("gpufleet.agents.meter.PORT_METRICS is out of step with NetworkPort")


_check_table()


def point_value(spec: MetricSpec, value: float) -> float | int | bool:
    """A collected point's value as the wire field's type (the inverse of what the callbacks observe)."""
    if spec.value == "bool":
        return bool(value)
    if spec.value == "int":
        return int(value)
    return float(value)


def gpu_attributes(gpu: GpuSample) -> dict[str, str | int]:
    """The OTel attributes of one GPU's points; None-valued identity fields are left out."""
    attrs: dict[str, str | int] = {ATTR_UUID: gpu.uuid, "hw.type": "gpu", ATTR_INDEX: gpu.index}
    if gpu.model is not None:
        attrs[ATTR_MODEL] = gpu.model
    if gpu.tenant is not None:
        attrs[ATTR_TENANT] = gpu.tenant
    if gpu.job is not None:
        attrs[ATTR_JOB] = gpu.job
    if gpu.parent_uuid is not None:
        attrs[ATTR_PARENT] = gpu.parent_uuid
    if gpu.mig_profile is not None:
        attrs[ATTR_MIG_PROFILE] = gpu.mig_profile
    return attrs


def port_attributes(port: NetworkPort) -> dict[str, str | int]:
    """The OTel attributes of one network port's points."""
    attrs: dict[str, str | int] = {ATTR_PORT_ID: f"{port.device}/{port.port}", "hw.type": "network",
                                   ATTR_PORT_DEVICE: port.device, ATTR_PORT: port.port}
    if port.link_layer is not None:
        attrs[ATTR_LINK_LAYER] = port.link_layer
    return attrs


@dataclass(frozen=True, slots=True)
class NodeExtras:
    """What one interval says about the node rather than a GPU: its GPU enumeration and network ports."""

    gpus_expected: int | None = None
    gpus_missing: tuple[str, ...] = ()
    network: tuple[NetworkPort, ...] = ()


def node_resource(cluster: str, node: str, boot_id: str, host_id: str | None = None) -> Resource:
    """The Resource of one node agent: semantic-convention host/service keys plus the cluster.

    `service.instance.id` is the spool's boot_id (the identity epoch of this agent's messages);
    `host.id` is the machine id when the caller knows it.
    """
    attrs: dict[str, str] = {
        "service.name": "gpufleet-agent",
        "service.version": __version__,
        RES_NODE: node,
        RES_BOOT_ID: boot_id,
        RES_CLUSTER: cluster,
    }
    if host_id:
        attrs["host.id"] = host_id
    return Resource.create(attrs)


@dataclass(frozen=True, slots=True)
class Frame:
    """One interval's snapshot: what every callback of one collection reads."""

    seq: int
    time_ms: int
    interval_ms: int
    gpus: tuple[GpuSample, ...]
    """Stamped samples (tenant, job, flops) in the collector's order: the roster of the message."""
    health: AgentHealth
    attrs: tuple[dict[str, str | int], ...] = field(default=(), compare=False)
    """`gpu_attributes` of each GPU, built once per frame by `AgentMeter.observe`."""
    node: NodeExtras = NodeExtras()
    """Node-level parts of the message: the network ports are observed as points, the rest carried."""


class IntervalReader(MetricReader):
    """A reader that collects only when asked (once per interval) and pushes the data to an exporter.

    Reading (when) stays with the runner's aligned timer; exporting (where) with the exporter.
    Shutting the reader down leaves the exporter open: the agent owns it across provider rebuilds.
    Temporality stays the SDK default, cumulative for every instrument: asynchronous counters then
    report the observed absolute value itself (a delta would be a float subtraction, not exact).
    """

    def __init__(self, exporter: MetricExporter) -> None:
        super().__init__()
        self._exporter = exporter

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        self._exporter.export(metrics_data, timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Nothing to release: the exporter outlives the reader."""


def otlp_reader(endpoint: str, interval_ms: int) -> MetricReader:
    """An OTLP/HTTP exporting reader on its own thread (so a slow collector never delays collection)."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    url = endpoint.rstrip("/")
    if not url.endswith("/v1/metrics"):
        url += "/v1/metrics"
    return PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=url, timeout=5),
        export_interval_millis=max(interval_ms, 1000),
        export_timeout_millis=5000,
    )


class AgentMeter:
    """One agent's MeterProvider, its observable instruments and its interval reader."""

    def __init__(
        self,
        resource: Resource,
        exporter: MetricExporter,
        *,
        extra_readers: Callable[[], Iterable[MetricReader]] = tuple,
        recycle_after: int = 1000,
    ) -> None:
        """`extra_readers` makes further readers (e.g. `otlp_reader`) each time the provider is built."""
        self.resource = resource
        self._exporter = exporter
        self._extra_readers = extra_readers
        self._recycle_after = recycle_after
        self._frame: Frame | None = None
        self._attr_sets: set[tuple[object, ...]] = set()
        self.rebuilds = 0
        self._provider, self._reader = self._build()

    @property
    def frame(self) -> Frame | None:
        """The snapshot the last `observe` installed (what callbacks and the exporter read)."""
        return self._frame

    def observe(self, frame: Frame) -> Frame:
        """Install this interval's snapshot; returns it with the per-GPU attributes filled in."""
        attrs = tuple(gpu_attributes(g) for g in frame.gpus)
        frame = Frame(frame.seq, frame.time_ms, frame.interval_ms, frame.gpus, frame.health, attrs, frame.node)
        for a in attrs:
            self._attr_sets.add(tuple(a.values()))
        if len(self._attr_sets) > self._recycle_after:
            self._rebuild()
            self._attr_sets = {tuple(a.values()) for a in attrs}
        self._frame = frame
        return frame

    def collect(self) -> None:
        """Run every callback on the installed frame and push the result to the exporter."""
        self._reader.collect()

    def shutdown(self) -> None:
        """Shut the provider (and extra readers) and the exporter down; idempotent."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None  # type: ignore[assignment]
            self._exporter.shutdown()

    def _rebuild(self) -> None:
        log.info("rebuilding the OTel meter provider after %d distinct GPU attribute sets (tenant/job churn)",
                 len(self._attr_sets))
        self._provider.shutdown()
        self._provider, self._reader = self._build()
        self.rebuilds += 1

    def _build(self) -> tuple[MeterProvider, IntervalReader]:
        reader = IntervalReader(self._exporter)
        provider = MeterProvider(
            resource=self.resource,
            metric_readers=[reader, *self._extra_readers()],
            exemplar_filter=AlwaysOffExemplarFilter(),  # observations carry no trace context
            shutdown_on_exit=False,
        )
        meter = provider.get_meter(SCOPE, __version__)
        for spec in GPU_METRICS:
            _create(meter, spec, self._gpu_callback(spec))
        for spec in AGENT_METRICS:
            _create(meter, spec, self._agent_callback(spec))
        for spec in PORT_METRICS:
            _create(meter, spec, self._port_callback(spec))
        for spec in NODE_METRICS:
            _create(meter, spec, self._node_callback(spec))
        return provider, reader

    def _gpu_callback(self, spec: MetricSpec) -> Callable[[CallbackOptions], list[Observation]]:
        name = spec.field
        as_int = spec.value == "bool"

        def observe(_options: CallbackOptions) -> list[Observation]:
            frame = self._frame
            if frame is None:
                return []
            out = []
            for gpu, attrs in zip(frame.gpus, frame.attrs, strict=True):
                value = getattr(gpu, name)
                if value is not None:
                    out.append(Observation(int(value) if as_int else value, attrs))
            return out

        return observe

    def _agent_callback(self, spec: MetricSpec) -> Callable[[CallbackOptions], list[Observation]]:
        name = spec.field

        def observe(_options: CallbackOptions) -> list[Observation]:
            frame = self._frame
            return [] if frame is None else [Observation(getattr(frame.health, name))]

        return observe


    def _port_callback(self, spec: MetricSpec) -> Callable[[CallbackOptions], list[Observation]]:
        name = spec.field

        def observe(_options: CallbackOptions) -> list[Observation]:
            frame = self._frame
            if frame is None:
                return []
            return [Observation(getattr(p, name), port_attributes(p)) for p in frame.node.network
                    if getattr(p, name) is not None]

        return observe

    def _node_callback(self, spec: MetricSpec) -> Callable[[CallbackOptions], list[Observation]]:
        name = spec.field

        def observe(_options: CallbackOptions) -> list[Observation]:
            frame = self._frame
            value = None if frame is None else getattr(frame.node, name)
            return [] if value is None else [Observation(value)]

        return observe


def _create(meter: Any, spec: MetricSpec, callback: Callable[[CallbackOptions], list[Observation]]) -> None:
    make = {
        "gauge": meter.create_observable_gauge,
        "counter": meter.create_observable_counter,
        "updown": meter.create_observable_up_down_counter,
    }[spec.kind]
    make(spec.name, callbacks=[callback], unit=spec.unit, description=spec.description)
