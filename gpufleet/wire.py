"""The wire contract between node agents and the pipeline: one Kafka message per node per interval.

This module is the single definition of the message. The agent encodes with it, the ingester
decodes and validates with it, `docs/wire-format.md` documents it and `docs/wire-format.schema.json`
is exported from it (`gpufleet schema`). Every numeric field is in a base unit named in its
suffix (`_bytes`, `_w`, `_j`, `_c`, `_mhz`, `_ratio` for 0..1 fractions); `None` always means
"not supported by this GPU or not readable this interval", never zero.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

SCHEMA_VERSION: Final = 1
"""Bumped on any incompatible change; the ingester dead-letters versions it does not know."""

MAX_MESSAGE_BYTES: Final = 1_000_000
"""Largest message the ingester accepts: Kafka's default `message.max.bytes` (an 8-GPU node is ~5 KB)."""

# Bounds match the ClickHouse columns the values land in (pipeline/store/migrations/0001_raw_samples.sql),
# so a message that passes validation can always be inserted: a value that would overflow its
# column is refused here and dead-lettered, instead of failing (and stalling) its whole batch.
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0.0)]
Watts = Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]
Celsius = Annotated[float, msgspec.Meta(ge=-273.15, le=1e4)]
Count = Annotated[int, msgspec.Meta(ge=0, le=0x7FFF_FFFF_FFFF_FFFF)]
"""Counters land in UInt64 columns; bounded at the int64 maximum (msgspec checks bounds in int64)."""
U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
UnixMs = Annotated[int, msgspec.Meta(ge=0, le=10_413_792_000_000)]
"""Unix milliseconds up to 2300-01-01, the end of ClickHouse's DateTime64 range."""
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Label = Annotated[str, msgspec.Meta(max_length=1024)]

MAX_FLOP_RATE: Final = 10**17
"""FLOP/s one GPU may claim at most: a generous bound, 40x the fastest GPU in `gpu_facts` (GB200,
2.5e15 dense BF16). A sample's `flops_measured` is refused above `MAX_FLOP_RATE x interval`;
the agent clamps at the GPU's own peak x interval, which is below it."""
MAX_INTERVAL_MS: Final = 3_600_000
Flops = Annotated[float, msgspec.Meta(ge=0.0, le=float(MAX_FLOP_RATE * MAX_INTERVAL_MS // 1000))]
"""Measured FLOPs of one sample: at most `MAX_FLOP_RATE` x the longest interval (3.6e20)."""
MAX_COUNT_RATE: Final = 10**10
"""Tokens (or samples) per second one GPU may claim at most: a generous bound, ~8x what the fastest GPU in
`gpu_facts` could push through a 1M-parameter model at peak (2 FLOPs per parameter per token). A sample's
`tokens_measured` / `samples_measured` is refused above `MAX_COUNT_RATE x interval`."""
Counts = Annotated[float, msgspec.Meta(ge=0.0, le=float(MAX_COUNT_RATE * MAX_INTERVAL_MS // 1000))]
"""Tokens or samples of one GPU sample: at most `MAX_COUNT_RATE` x the longest interval (3.6e13)."""
MAX_SHARES: Final = 64
"""Most holders one shared GPU may list (time-slicing replicas, MPS clients)."""
MAX_SHARE_WEIGHT: Final = 1_000_000


class Share(msgspec.Struct, forbid_unknown_fields=True):
    """One of several jobs holding one GPU (time-slicing, MPS): who, and its weight in the split. Every field
    is sent, the default weight too (a reader that fills a missing weight with 0 would bill the holder nothing)."""

    tenant: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    job: Label | None = None
    weight: Annotated[int, msgspec.Meta(ge=1, le=MAX_SHARE_WEIGHT)] = 1
    """The holder's part of the GPU's time is weight / sum of the weights (docs/allocation.md, "Shared GPUs")."""


class GpuSample(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One GPU's counters for one interval. Only `index` and `uuid` are always present."""

    index: U16
    uuid: Name
    model: Label | None = None
    error: Label | None = None
    """Set when the GPU could not be read at all (e.g. fallen off the bus); the counters are then null."""
    tenant: Label | None = None
    """Tenant the GPU is allocated to this interval; null means unallocated."""
    job: Label | None = None
    allocation_unknown: bool = False
    """The allocation source could not say who holds this GPU (e.g. the kubelet did not answer): `tenant`
    and `job` are then null, and the time is billed to nobody. False (omitted) when the source answered."""
    shares: Annotated[list[Share], msgspec.Meta(max_length=MAX_SHARES)] = []
    """Several jobs hold this GPU (or MIG instance): each holder and its weight. Empty for a GPU held by
    one job or none. With shares, `tenant`/`job` name the holder of the largest weight (the first of equals)."""
    parent_uuid: Name | None = None
    """MIG instance: the UUID of the physical GPU it is carved from (then `uuid` is the MIG device's UUID)."""
    gpu_instance_id: U32 | None = None
    """MIG instance: its GPU instance id on the parent."""
    compute_instance_id: U32 | None = None
    """MIG instance: its compute instance id within the GPU instance."""
    mig_profile: Label | None = None
    """MIG instance: the profile, e.g. `1g.10gb`."""
    slices: U8 | None = None
    """MIG instance: compute slices it holds; its share of the GPU is `slices / slices_total`."""
    slices_total: U8 | None = None
    """MIG instance: compute slices of the whole GPU (7 on A100, H100, H200, B200; 4 on A30)."""
    util_gpu_ratio: Ratio | None = None
    util_mem_ratio: Ratio | None = None
    mem_used_bytes: Count | None = None
    mem_total_bytes: Count | None = None
    power_w: Watts | None = None
    energy_j: NonNeg | None = None
    """Cumulative energy since the driver loaded (NVML's counter, converted from mJ)."""
    energy_interval_j: NonNeg | None = None
    """Energy used during the interval: growth of NVML's energy counter since the previous reading (exact
    to the mJ; a driver reload's restart of the counter handled). Null on the first reading after NVML
    (re)starts, or without an energy counter; the rollups then use power_w x interval instead."""
    temp_gpu_c: Celsius | None = None
    temp_mem_c: Celsius | None = None
    clock_sm_mhz: U32 | None = None
    clock_mem_mhz: U32 | None = None
    clock_event_reasons: Count | None = None
    """NVML clocks-event (throttle) bitmask: 0x4 SW power cap, 0x8 HW slowdown, 0x20 SW thermal,
    0x40 HW thermal, 0x80 HW power brake (see `gpufleet.units.THROTTLE_*`)."""
    throttle_power_ratio: Ratio | None = None
    """Share of the interval the clocks were held down by the power limit (cumulative NVML counter)."""
    throttle_thermal_ratio: Ratio | None = None
    """Share of the interval the clocks were held down for temperature (cumulative NVML counter)."""
    ecc_corrected_volatile: Count | None = None
    ecc_uncorrected_volatile: Count | None = None
    ecc_corrected_aggregate: Count | None = None
    ecc_uncorrected_aggregate: Count | None = None
    remapped_rows_correctable: U32 | None = None
    remapped_rows_uncorrectable: U32 | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    retired_pages: U32 | None = None
    retired_pages_pending: bool | None = None
    pcie_replay_count: Count | None = None
    nvlink_crc_errors: Count | None = None
    nvlink_replay_errors: Count | None = None
    nvlink_recovery_errors: Count | None = None
    nvlink_links_down: U8 | None = None
    nvlink_symbol_errors: Count | None = None
    """NVLink5 (Blackwell) received-symbol errors summed over links; null before NVLink5."""
    nvlink_effective_errors: Count | None = None
    """NVLink5 (Blackwell) effective errors summed over links; null before NVLink5."""
    xids: list[Annotated[int, msgspec.Meta(ge=0, le=65535)]] = []
    """XID codes raised during this interval, in order (event-driven, each reported once)."""
    compute_processes: U32 | None = None
    sm_active_ratio: Ratio | None = None
    """GPM (Hopper+) SM activity; null on older GPUs."""
    tensor_active_ratio: Ratio | None = None
    """GPM (Hopper+) any-tensor-pipe activity; the simulator also fills it."""
    dram_active_ratio: Ratio | None = None
    flops_measured: Flops | None = None
    """Model FLOPs the job on this GPU reported executing during the interval (OTLP), or null; at most
    `MAX_FLOP_RATE` x `interval_ms` (checked by `decode`)."""
    tokens_measured: Counts | None = None
    """Tokens the job(s) on this GPU reported processing during the interval (OTLP `gpufleet.job.tokens`,
    attributed as FLOPs are), or null; at most `MAX_COUNT_RATE` x `interval_ms` (checked by `decode`)."""
    samples_measured: Counts | None = None
    """Samples (sequences, images...) the job(s) reported during the interval (`gpufleet.job.samples`), as above."""
    recovery_action: U8 | None = None
    """NVML's recovery action for the GPU (`NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`): 0 none, 1 GPU reset,
    2 node reboot, 3 drain P2P, 4 drain and reset, 5 recover IMEX domain, 6 bus reset, 7 system reboot
    (`gpufleet.node_facts`). It stays set until the remedy, so one sample says what the GPU needs."""
    temp_slowdown_c: Celsius | None = None
    """The GPU's own HW-slowdown temperature (NVML threshold); the health rules' limit where known."""
    temp_shutdown_c: Celsius | None = None
    """The GPU's own shutdown temperature (NVML threshold)."""
    temp_mem_max_c: Celsius | None = None
    """The HBM's maximum operating temperature (NVML threshold), where memory SW slowdown begins."""
    power_limit_w: Watts | None = None
    """The power limit NVML enforces now (all limits combined, in-band and out-of-band)."""
    power_limit_default_w: Watts | None = None
    """The power limit the GPU boots with."""
    fabric_state: U8 | None = None
    """NVSwitch fabric registration (`nvmlDeviceGetGpuFabricInfoV`): 1 not started, 2 in progress,
    3 completed; null where the GPU is on no NVSwitch fabric."""
    fabric_status: U32 | None = None
    """The NVML return code of the fabric registration (0 = success)."""
    fabric_clique_id: U32 | None = None
    fabric_cluster_uuid: Label | None = None
    fabric_health_mask: U32 | None = None
    """NVML's fabric health bitmask (`NVML_GPU_FABRIC_HEALTH_MASK_*`: degraded bandwidth, route recovery,
    route unhealthy, access-timeout recovery, incorrect configuration)."""
    serial: Label | None = None
    """Board serial number. Inventory (`serial` .. `ecc_mode`): sent when read (at attach, then every
    `agent.nvml_inventory_every_s`), null in the messages between."""
    vbios_version: Label | None = None
    driver_version: Label | None = None
    persistence_mode: bool | None = None
    ecc_mode: bool | None = None
    """ECC enabled (the current mode, not a pending change)."""


class AgentHealth(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The agent's own health for the interval, so the pipeline sees sick agents."""

    collect_seconds: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    nvml_errors: U32 = 0
    nvml_calls: U32 = 0
    """NVML queries this interval (reads, attaches, event-set management; event waits excluded)."""
    nvml_call_budget: U32 = 0
    """The queries the agent expects to need this interval (per-GPU budget x GPUs); 0 = no budget."""
    nvml_deadline_misses: U32 = 0
    """GPUs reported in error this interval because NVML had not answered by the deadline."""
    xids_dropped_total: Count = 0
    """XIDs dropped because more than the per-GPU queue bound arrived in one interval (since start)."""
    spool_depth: Count = 0
    spool_dropped_total: Count = 0
    send_errors_total: Count = 0
    otlp_points_accepted_total: Count = 0
    otlp_points_rejected_total: Count = 0
    flops_clamped_total: Count = 0
    """GPU-intervals whose measured FLOPs the agent clamped at the GPU's peak x interval."""
    allocation_unknown_total: Count = 0
    """GPU-intervals the allocation source could not attribute (sent with `allocation_unknown`), since start."""


class NetworkPort(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One InfiniBand or RoCE port of the node, from sysfs (`/sys/class/infiniband/<device>/ports/<port>/`).

    The counters are cumulative (since the HCA came up or they were last cleared) and, per the IB
    spec, stop at their maximum rather than wrap; growth is the signal.
    """

    device: Name
    """RDMA device, e.g. `mlx5_0`."""
    port: U16
    link_layer: Label | None = None
    """`InfiniBand` or `Ethernet` (RoCE)."""
    state: U8 | None = None
    """Logical state: 1 DOWN, 2 INIT, 3 ARMED, 4 ACTIVE, 5 ACTIVE_DEFER."""
    phys_state: U8 | None = None
    """Physical state: 1 Sleep, 2 Polling, 3 Disabled, 4 training, 5 LinkUp, 6 LinkErrorRecovery, 7 PhyTest."""
    rate_gbps: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] | None = None
    link_downed: Count | None = None
    link_error_recovery: Count | None = None
    symbol_error: Count | None = None
    port_rcv_errors: Count | None = None
    port_xmit_discards: Count | None = None


class NodeReport(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One node's message for one interval: the unit of delivery, dedup and replay.

    `(node, boot_id, seq)` identifies a message uniquely: the ingester drops any message it has
    already stored under that identity, which makes redelivery and spool replay harmless.
    """

    schema_version: int
    cluster: Name
    node: Name
    boot_id: Name
    """Changes when the agent's sequence restarts (new spool); with `seq` it names the message."""
    seq: Count
    time_ms: UnixMs
    """End of the interval, Unix milliseconds UTC, read from the agent's clock."""
    interval_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_INTERVAL_MS)]
    gpus: Annotated[list[GpuSample], msgspec.Meta(max_length=0xFFFF)]
    agent: AgentHealth = msgspec.field(default_factory=AgentHealth)
    gpus_expected: U16 | None = None
    """GPUs the node should have (`agent.gpus_expected`, else its first complete enumeration); null: unknown."""
    gpus_missing: Annotated[list[Name], msgspec.Meta(max_length=0xFFFF)] = []
    """UUIDs of GPUs the node enumerated before and does not now."""
    network: Annotated[list[NetworkPort], msgspec.Meta(max_length=1024)] = []
    """The node's InfiniBand/RoCE ports (empty: none, or not read)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(NodeReport)


def encode(report: NodeReport) -> bytes:
    """Serialize a report to the JSON bytes that go on the wire."""
    return _encoder.encode(report)


def decode(data: bytes) -> NodeReport:
    """Parse and validate wire bytes; raises `WireError` naming what is wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        report = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise WireError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise WireError(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise WireError(f"a string is not valid UTF-8: {exc}") from None
    if report.schema_version != SCHEMA_VERSION:
        raise WireError(
            f"unknown schema_version {report.schema_version} (this ingester reads {SCHEMA_VERSION}); "
            "upgrade the ingester before the agents"
        )
    seen: set[str] = set()
    for gpu in report.gpus:
        if gpu.uuid in seen:
            raise WireError(f"GPU uuid {gpu.uuid!r} appears twice in one message")
        seen.add(gpu.uuid)
        problem = attribution_problem(gpu)
        if problem:
            raise WireError(f"GPU uuid {gpu.uuid!r}: {problem}")
    ports = {(p.device, p.port) for p in report.network}
    if len(ports) != len(report.network):
        raise WireError("a network port appears twice in one message")
    _check_flops(report)
    return report


def attribution_problem(gpu: GpuSample) -> str | None:
    """What is inconsistent in a sample's allocation and MIG fields, or None (checked by `decode`)."""
    if gpu.allocation_unknown and (gpu.tenant is not None or gpu.shares):
        return "allocation_unknown with a tenant or shares; an unknown allocation names nobody"
    if gpu.shares:
        if len(gpu.shares) < 2:
            return "shares lists one holder; a GPU held by one job carries tenant/job only"
        top = max(gpu.shares, key=lambda s: s.weight)
        if (gpu.tenant, gpu.job) != (top.tenant, top.job):
            return "tenant/job must name the share of the largest weight (the first of equals)"
    mig = (gpu.slices, gpu.slices_total, gpu.parent_uuid)
    if any(v is not None for v in mig):
        if any(v is None for v in mig):
            return "a MIG instance carries parent_uuid, slices and slices_total together"
        if not 1 <= (gpu.slices or 0) <= (gpu.slices_total or 0):
            return f"slices {gpu.slices} must be 1..slices_total ({gpu.slices_total})"
    return None


def share_of_gpu(gpu: GpuSample) -> tuple[int, int]:
    """The part of a physical GPU the sample stands for, as (numerator, denominator): 1/1, or a MIG
    instance's `slices / slices_total`."""
    if gpu.slices is not None and gpu.slices_total:
        return gpu.slices, gpu.slices_total
    return 1, 1


def max_flops(interval_ms: int) -> int:
    """The most FLOPs one GPU sample of `interval_ms` may carry (`MAX_FLOP_RATE` x interval, exact)."""
    return MAX_FLOP_RATE // 1000 * interval_ms


def max_counts(interval_ms: int) -> int:
    """The most tokens (or samples) one GPU sample of `interval_ms` may carry (`MAX_COUNT_RATE` x interval)."""
    return MAX_COUNT_RATE // 1000 * interval_ms


def _check_flops(report: NodeReport) -> None:
    limit = max_flops(report.interval_ms)
    counts = max_counts(report.interval_ms)
    for gpu in report.gpus:
        if gpu.flops_measured is not None and gpu.flops_measured > limit:  # float vs int: compared exactly
            raise WireError(
                f"GPU uuid {gpu.uuid!r}: flops_measured {gpu.flops_measured:.4g} is more than any GPU can execute in "
                f"{report.interval_ms} ms (at most {limit:.4g}, {MAX_FLOP_RATE:.0e} FLOP/s); a broken or hostile "
                "agent: upgrade it (agents clamp at the GPU's peak)"
            )
        for name in ("tokens_measured", "samples_measured"):
            value = getattr(gpu, name)
            if value is not None and value > counts:
                raise WireError(
                    f"GPU uuid {gpu.uuid!r}: {name} {value:.4g} is more than any GPU can process in "
                    f"{report.interval_ms} ms (at most {counts:.4g}, {MAX_COUNT_RATE:.0e} a second); a broken or "
                    "hostile agent: upgrade it"
                )


class WireError(ValueError):
    """A message that does not follow the wire contract; the text says what is wrong."""


def json_schema() -> dict[str, object]:
    """The machine-readable JSON Schema of `NodeReport`, exported to `docs/wire-format.schema.json`."""
    return msgspec.json.schema(NodeReport)


GPU_FIELDS: Final = tuple(GpuSample.__struct_fields__)
PORT_FIELDS: Final = tuple(NetworkPort.__struct_fields__)
