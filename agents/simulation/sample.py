"""Pure functions that turn a GPU's activity, energy and faults at one instant into a `GpuSample`.

Noise is a hash of (GPU, time), so a value never depends on what was sampled before. Units follow
the wire contract; values are rounded the way NVML reports them (integer percent utilization,
integer degrees, mW power and mJ energy, MHz clocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gpufleet.agents.simulation import faults as fk
from gpufleet.agents.simulation.faults import Fault
from gpufleet.agents.simulation.rng import lanes, mix
from gpufleet.agents.simulation.timeline import (
    BUSY,
    IDLE,
    LOST,
    MAX_POWER_W,
    THROTTLE_HW_POWER_BRAKE,
    THROTTLE_HW_THERMAL,
    ZOMBIE,
    Activity,
)
from gpufleet.node_facts import FABRIC_COMPLETED, RECOVERY_DRAIN_P2P, RECOVERY_GPU_RESET, RECOVERY_NODE_REBOOT
from gpufleet.wire import GpuSample

GPU_LOST_ERROR: Final = "GPU is lost"
SM_CLOCK_MAX_MHZ: Final = 1980
SM_CLOCK_IDLE_MHZ: Final = 345
SM_CLOCK_THERMAL_MHZ: Final = 1260
SM_CLOCK_POWER_BRAKE_MHZ: Final = 990
MEM_CLOCK_MHZ: Final = 2619
THERMAL_TEMP_C: Final = 90.0
"""In HW thermal slowdown (the H100 slows from 89 °C), below its 92 °C shutdown: degraded, not failing."""
THERMAL_MEM_TEMP_C: Final = 90.0
THROTTLE_GPU_IDLE: Final = 0x1
PCIE_REPLAYS_PER_S: Final = 5
NVLINK_REPLAYS_PER_S: Final = 2
NVLINK_RECOVERY_EVERY_MS: Final = 10_000
TEMP_SHUTDOWN_C: Final = 92.0
TEMP_SLOWDOWN_C: Final = 89.0
TEMP_MEM_MAX_C: Final = 95.0
"""The H100 SXM's own thresholds, as `nvidia-smi -q` reports them."""
POWER_LIMIT_W: Final = 700.0
FABRIC_HEALTHY_MASK: Final = 0b0001_1010_1010
"""Every yes/no field of the fabric health mask "false" (2), incorrect configuration "none" (1)."""
FABRIC_DEGRADED_MASK: Final = 0b0001_1010_1001
"""The same with degraded bandwidth "true" (1)."""
DRIVER_VERSION: Final = "580.95.05"
DRIFTED_DRIVER_VERSION: Final = "570.172.08"
VBIOS_VERSION: Final = "96.00.89.00.01"


@dataclass(frozen=True, slots=True)
class GpuConst:
    """What never changes about one simulated GPU."""

    index: int
    uuid: str
    model: str
    mem_total_bytes: int
    noise_key: int
    temp_offset_c: float
    mem_temp_offset_c: int
    serial: str = ""
    fabric_clique_id: int = 0
    fabric_cluster_uuid: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Error counters and flags at one instant (all zero on a healthy GPU)."""

    ecc_uncorrected_volatile: int = 0
    ecc_uncorrected_aggregate: int = 0
    remapped_rows_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failure: bool = False
    retired_pages: int = 0
    retired_pages_pending: bool = False
    pcie_replay_count: int = 0
    nvlink_replay_errors: int = 0
    nvlink_recovery_errors: int = 0
    nvlink_links_down: int = 0
    recovery_action: int = 0
    fabric_health_mask: int = FABRIC_HEALTHY_MASK


HEALTHY: Final = Health()


@dataclass(frozen=True, slots=True)
class Inventory:
    """What the agent reads on its inventory cadence; sent only in the samples that carry it."""

    driver_version: str = DRIVER_VERSION


def health_at(faults: Sequence[Fault], t_ms: int) -> Health:
    """Counters under `faults` at `t_ms`. Cumulative counters keep their value after a fault ends;
    volatile ECC, pending flags, remap failure and links down clear at its end."""
    if not faults:
        return HEALTHY
    h = dict.fromkeys(("ecc_v", "ecc_a", "remapped", "retired", "pcie", "nv_replay", "nv_recovery", "nv_down",
                       "action"), 0)
    pending = failure = fabric_degraded = False
    for f in faults:
        if t_ms < f.start_ms:
            continue
        active = t_ms < f.end_ms
        if f.kind in _ACTIONS and active:
            h["action"] = max(h["action"], _ACTIONS[f.kind])
        fabric_degraded = fabric_degraded or (f.kind == fk.FABRIC_DEGRADED and active)
        elapsed = min(t_ms, f.end_ms) - f.start_ms
        if f.kind == fk.ECC_DBE:
            h["ecc_a"] += 1
            h["ecc_v"] += active
        elif f.kind == fk.PAGE_RETIREMENT_PENDING:
            h["retired"] += 1
            h["remapped"] += 1
            pending = pending or active
        elif f.kind == fk.ROW_REMAP_FAILURE:
            failure = failure or active
        elif f.kind == fk.PCIE_REPLAY:
            h["pcie"] += 1 + elapsed * PCIE_REPLAYS_PER_S // 1000
        elif f.kind == fk.NVLINK_ERRORS:
            h["nv_replay"] += 1 + elapsed * NVLINK_REPLAYS_PER_S // 1000
            h["nv_recovery"] += 1 + elapsed // NVLINK_RECOVERY_EVERY_MS
            h["nv_down"] = max(h["nv_down"], int(active))
    return Health(
        ecc_uncorrected_volatile=h["ecc_v"],
        ecc_uncorrected_aggregate=h["ecc_a"],
        remapped_rows_uncorrectable=h["remapped"],
        remap_pending=pending,
        remap_failure=failure,
        retired_pages=h["retired"],
        retired_pages_pending=pending,
        pcie_replay_count=h["pcie"],
        nvlink_replay_errors=h["nv_replay"],
        nvlink_recovery_errors=h["nv_recovery"],
        nvlink_links_down=h["nv_down"],
        recovery_action=h["action"],
        fabric_health_mask=FABRIC_DEGRADED_MASK if fabric_degraded else FABRIC_HEALTHY_MASK,
    )


_ACTIONS: Final = {fk.NEEDS_RESET: RECOVERY_GPU_RESET, fk.NEEDS_REBOOT: RECOVERY_NODE_REBOOT,
                   fk.NEEDS_DRAIN: RECOVERY_DRAIN_P2P}
"""Faults that set NVML's recovery action while they last (the remedy clears it at the fault's end)."""


def _clamp(x: float) -> float:
    return 0.0 if x < 0.0 else min(x, 1.0)


def build_sample(
    gpu: GpuConst, act: Activity, energy_j: float, t_ms: int, health: Health, xids: list[int],
    inventory: Inventory | None = None,
) -> GpuSample:
    """The GPU's sample at `t_ms` (tenant, job and flops_measured left unset for the agent); `inventory` when
    this interval read it."""
    if act.kind == LOST:
        return GpuSample(index=gpu.index, uuid=gpu.uuid, model=gpu.model, error=GPU_LOST_ERROR, xids=xids)
    sample = _activity_sample(gpu, act, energy_j, t_ms, health, xids)
    sample.recovery_action = health.recovery_action
    sample.temp_slowdown_c, sample.temp_shutdown_c, sample.temp_mem_max_c = (
        TEMP_SLOWDOWN_C, TEMP_SHUTDOWN_C, TEMP_MEM_MAX_C)
    sample.power_limit_w = sample.power_limit_default_w = POWER_LIMIT_W
    sample.fabric_state, sample.fabric_status = FABRIC_COMPLETED, 0
    sample.fabric_clique_id, sample.fabric_cluster_uuid = gpu.fabric_clique_id, gpu.fabric_cluster_uuid
    sample.fabric_health_mask = health.fabric_health_mask
    if inventory is not None:
        sample.serial, sample.vbios_version, sample.driver_version = gpu.serial, VBIOS_VERSION, inventory.driver_version
        sample.persistence_mode = sample.ecc_mode = True
    return sample


def _activity_sample(
    gpu: GpuConst, act: Activity, energy_j: float, t_ms: int, health: Health, xids: list[int]
) -> GpuSample:
    h1 = mix(gpu.noise_key ^ t_ms)
    n0, n1, n2, n3 = lanes(h1)
    n4, n5, n6, _ = lanes(mix(h1))
    kind = act.kind
    procs = 1
    mem = act.mem_bytes
    clock = SM_CLOCK_MAX_MHZ
    if kind == BUSY:
        util_pct = max(0, min(100, round((act.util + (n0 - 0.5) * 0.08) * 100)))
        tensor = round(_clamp(act.tensor + (n1 - 0.5) * 0.04), 4)
        sm = round(_clamp(max(tensor, util_pct / 100 * 0.9 + (n2 - 0.5) * 0.04)), 4)
        dram = round(_clamp(act.dram + (n3 - 0.5) * 0.04), 4)
        mem_util_pct = round(dram * 90)
        clock -= 15 * int(n4 * 6)
    elif kind == IDLE:
        util_pct = int(n0 * (round(act.util * 100) + 1))
        tensor = round(n1 * 0.005, 4) if util_pct else 0.0
        sm = round(util_pct / 100 * 0.8, 4)
        dram = round(n3 * 0.01, 4)
        mem_util_pct = 0
    elif kind == ZOMBIE:
        util_pct = max(0, min(100, round((act.util + (n0 - 0.5) * 0.1) * 100)))
        tensor = 0.0
        sm = round(util_pct / 100 * 0.9, 4)
        dram = round(act.dram, 4)
        mem_util_pct = 2
    else:  # FREE, NOPROC
        util_pct = mem_util_pct = procs = mem = 0
        tensor = sm = dram = 0.0
        clock = SM_CLOCK_IDLE_MHZ
    power = round(min(MAX_POWER_W, act.power_w * (1 + (n5 - 0.5) * 0.04)), 3)
    temp = float(max(30, min(85, round(30 + (power - 60) * 0.078 + gpu.temp_offset_c + (n6 - 0.5) * 1.4))))
    mem_temp = temp + gpu.mem_temp_offset_c
    if act.throttle & THROTTLE_HW_THERMAL:
        temp, mem_temp = THERMAL_TEMP_C, THERMAL_MEM_TEMP_C
        clock = min(clock, SM_CLOCK_THERMAL_MHZ)
    if act.throttle & THROTTLE_HW_POWER_BRAKE:
        clock = min(clock, SM_CLOCK_POWER_BRAKE_MHZ)
    if act.clock_cap_mhz:
        clock = min(clock, act.clock_cap_mhz)
    return GpuSample(
        index=gpu.index,
        uuid=gpu.uuid,
        model=gpu.model,
        util_gpu_ratio=util_pct / 100,
        util_mem_ratio=mem_util_pct / 100,
        mem_used_bytes=mem,
        mem_total_bytes=gpu.mem_total_bytes,
        power_w=power,
        energy_j=round(energy_j, 3),
        temp_gpu_c=temp,
        temp_mem_c=mem_temp,
        clock_sm_mhz=clock,
        clock_mem_mhz=MEM_CLOCK_MHZ,
        clock_event_reasons=act.throttle | (THROTTLE_GPU_IDLE if util_pct == 0 else 0),
        ecc_corrected_volatile=0,
        ecc_uncorrected_volatile=health.ecc_uncorrected_volatile,
        ecc_corrected_aggregate=0,
        ecc_uncorrected_aggregate=health.ecc_uncorrected_aggregate,
        remapped_rows_correctable=0,
        remapped_rows_uncorrectable=health.remapped_rows_uncorrectable,
        remap_pending=health.remap_pending,
        remap_failure=health.remap_failure,
        retired_pages=health.retired_pages,
        retired_pages_pending=health.retired_pages_pending,
        pcie_replay_count=health.pcie_replay_count,
        nvlink_crc_errors=0,
        nvlink_replay_errors=health.nvlink_replay_errors,
        nvlink_recovery_errors=health.nvlink_recovery_errors,
        nvlink_links_down=health.nvlink_links_down,
        xids=xids,
        compute_processes=procs,
        sm_active_ratio=sm,
        tensor_active_ratio=tensor,
        dram_active_ratio=dram,
    )
