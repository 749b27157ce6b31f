"""GPU health rules: one sample (and the same GPU's previous counters) -> state and reasons.

States: `ok`, `degraded`, `failing`; `unknown` (no report for longer than `health.silent_after_s`) is
decided by queries over time, since a missing sample cannot classify itself. The rules, their
reasons and the grounding of each threshold are in docs/aggregations.md ("Health"). Everything that
can make a GPU *failing* depends on the sample alone, so the billed (SLA) seconds never depend on the
order samples arrive in; the counter-growth rules only ever degrade. Sticky conditions are read from
the sample too: NVML's recovery action stays set until its remedy, and the temperature limits are
the GPU's own, carried in every sample (the fleet-wide config values only where NVML cannot say).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from gpufleet.config import HealthConfig
from gpufleet.gpu_facts import THROTTLE_HW_POWER_BRAKE, THROTTLE_HW_SLOWDOWN, THROTTLE_THERMAL_MASK
from gpufleet.node_facts import (
    FABRIC_COMPLETED,
    FABRIC_CONFIG_SHIFT,
    FABRIC_CONFIG_WIDTH,
    FABRIC_MASK_TRUE_BITS,
    FABRIC_NOT_SUPPORTED,
    RECOVERY_FAILING,
    fabric_mask_faults,
    recovery_name,
)
from gpufleet.wire import GpuSample


class State(IntEnum):
    """Ordered by severity; values match the ClickHouse Enum8 `health` column."""

    OK = 0
    DEGRADED = 1
    FAILING = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Verdict:
    state: State
    reasons: tuple[str, ...]


class Previous(NamedTuple):
    """The counters of the GPU's previous sample that growth rules compare against."""

    pcie_replay_count: int | None
    nvlink_errors: int | None


def previous_of(sample: GpuSample) -> Previous:
    return Previous(sample.pcie_replay_count, _nvlink_errors(sample))


def _nvlink_errors(s: GpuSample) -> int | None:
    if s.nvlink_replay_errors is None and s.nvlink_recovery_errors is None:
        return None
    return (s.nvlink_replay_errors or 0) + (s.nvlink_recovery_errors or 0)


def _grew(now: int | None, before: int | None) -> bool:
    return now is not None and before is not None and now > before


_OK = Verdict(State.OK, ())
_ALARM_BITS = THROTTLE_THERMAL_MASK | THROTTLE_HW_SLOWDOWN | THROTTLE_HW_POWER_BRAKE


def classify(s: GpuSample, prev: Previous | None, cfg: HealthConfig) -> Verdict:
    """The health of one GPU for one interval."""
    if _plainly_ok(s, prev, cfg):
        return _OK
    return _classify(s, prev, cfg)


def _plainly_ok(s: GpuSample, prev: Previous | None, cfg: HealthConfig) -> bool:
    """A cheap test that no rule can fire (the common case), so the full rules run rarely."""
    if (s.error or s.xids or s.ecc_uncorrected_volatile or s.remap_failure or s.remap_pending
            or s.retired_pages_pending or s.nvlink_links_down or s.recovery_action
            or (s.clock_event_reasons or 0) & _ALARM_BITS):
        return False
    if ((s.remapped_rows_uncorrectable or 0) >= cfg.remapped_rows_uncorrectable_failing
            or (s.retired_pages or 0) >= cfg.retired_pages_failing):
        return False
    if (_hot(s, cfg) or _fabric_suspect(s.fabric_state, s.fabric_status, s.fabric_health_mask)
            or _power_limit_low(s.power_limit_w, s.power_limit_default_w, cfg.power_limit_low_ratio)):
        return False
    if prev is None:
        return True
    return not (_grew(s.pcie_replay_count, prev.pcie_replay_count) or _grew(_nvlink_errors(s), prev.nvlink_errors))


def _temperature_limits(s: GpuSample, cfg: HealthConfig) -> tuple[float, float, float]:
    """(degraded at, failing at, memory degraded at), °C: the GPU's own NVML thresholds less the configured
    margins, the fleet-wide config values where the sample carries none."""
    degraded = cfg.temp_degraded_c if s.temp_slowdown_c is None else s.temp_slowdown_c - cfg.temp_slowdown_margin_c
    failing = cfg.temp_failing_c if s.temp_shutdown_c is None else s.temp_shutdown_c - cfg.temp_shutdown_margin_c
    memory = cfg.mem_temp_degraded_c if s.temp_mem_max_c is None else s.temp_mem_max_c
    return degraded, failing, memory


def _hot(s: GpuSample, cfg: HealthConfig) -> bool:
    degraded, failing, memory = _temperature_limits(s, cfg)
    gpu = s.temp_gpu_c is not None and (s.temp_gpu_c >= degraded or s.temp_gpu_c >= failing)
    return gpu or (s.temp_mem_c is not None and s.temp_mem_c >= memory)


def _fabric_suspect(state: int | None, status: int | None, mask: int | None) -> bool:
    """Whether a fabric rule may fire: registration not completed or failed, or the health mask names a fault."""
    if state is None or state == FABRIC_NOT_SUPPORTED:
        return False
    bits = mask or 0
    return (state != FABRIC_COMPLETED or bool(status) or bool(bits & FABRIC_MASK_TRUE_BITS)
            or (bits >> FABRIC_CONFIG_SHIFT) & FABRIC_CONFIG_WIDTH > 1)


def _power_limit_low(limit: float | None, default: float | None, ratio: float) -> bool:
    return limit is not None and default is not None and limit < ratio * default


_new_previous = tuple.__new__
_FLAGS = operator.attrgetter(
    "error", "xids", "ecc_uncorrected_volatile", "remap_failure", "remap_pending", "retired_pages_pending",
    "nvlink_links_down",
)
_LEVELS = operator.attrgetter(
    "uuid", "clock_event_reasons", "remapped_rows_uncorrectable", "retired_pages", "temp_gpu_c", "temp_mem_c",
    "pcie_replay_count", "nvlink_replay_errors", "nvlink_recovery_errors", "recovery_action", "fabric_state",
    "power_limit_w",
)
_LIMITS = operator.attrgetter("temp_slowdown_c", "temp_shutdown_c", "temp_mem_max_c")


def classify_all(
    samples: Sequence[GpuSample], previous: dict[str, Previous], cfg: HealthConfig
) -> tuple[list[int], list[list[str]]]:
    """`classify` for many samples in order, reading and updating `previous` (uuid -> counters).

    The ingester's hot path: the tests of `_plainly_ok` inlined over two attribute fetches per
    sample, and the full rules only for the rare sample they do not clear. Returns the states
    (as ints) and the reasons (lists) in sample order.
    """
    states: list[int] = []
    reasons: list[list[str]] = []
    add_state, add_reasons, last = states.append, reasons.append, previous.get
    rows_limit, pages_limit = cfg.remapped_rows_uncorrectable_failing, cfg.retired_pages_failing
    hot_gpu, hot_fail, hot_mem = cfg.temp_degraded_c, cfg.temp_failing_c, cfg.mem_temp_degraded_c
    slow_margin, shut_margin = cfg.temp_slowdown_margin_c, cfg.temp_shutdown_margin_c
    low_ratio = cfg.power_limit_low_ratio
    for s in samples:
        uuid, bits, rows, pages, temp, mem_temp, pcie, replay, recovery, action, fabric, power_limit = _LEVELS(s)
        nvlink = None if replay is None and recovery is None else (replay or 0) + (recovery or 0)
        hot = False
        if temp is not None or mem_temp is not None:  # `_temperature_limits`, inlined
            slowdown, shutdown, mem_max = _LIMITS(s)
            degrade_at = hot_gpu if slowdown is None else slowdown - slow_margin
            fail_at = hot_fail if shutdown is None else shutdown - shut_margin
            hot = ((temp is not None and (temp >= degrade_at or temp >= fail_at))
                   or (mem_temp is not None and mem_temp >= (hot_mem if mem_max is None else mem_max)))
        prev = last(uuid)
        grew = False
        if prev is None or prev[0] != pcie or prev[1] != nvlink:
            previous[uuid] = _new_previous(Previous, (pcie, nvlink))
            grew = prev is not None and (
                (pcie is not None and prev[0] is not None and pcie > prev[0])
                or (nvlink is not None and prev[1] is not None and nvlink > prev[1]))
        if (grew or hot or action or any(_FLAGS(s)) or (bits or 0) & _ALARM_BITS or (rows or 0) >= rows_limit
                or (pages or 0) >= pages_limit
                or (fabric is not None and _fabric_suspect(fabric, s.fabric_status, s.fabric_health_mask))
                or (power_limit is not None and _power_limit_low(power_limit, s.power_limit_default_w, low_ratio))):
            v = _classify(s, prev, cfg)
            add_state(int(v.state))
            add_reasons(list(v.reasons))
        else:
            add_state(0)
            add_reasons([])
    return states, reasons


def _classify(s: GpuSample, prev: Previous | None, cfg: HealthConfig) -> Verdict:
    failing: list[str] = []
    degraded: list[str] = []
    if s.error:
        failing.append("unreachable")
    if s.recovery_action:
        (failing if s.recovery_action in RECOVERY_FAILING else degraded).append(
            f"recovery_{recovery_name(s.recovery_action)}")
    failing_xids, degrading_xids = set(cfg.failing_xids), set(cfg.degrading_xids)
    for x in dict.fromkeys(s.xids):
        if x in failing_xids:
            failing.append(f"xid_{x}")
        elif x in degrading_xids:
            degraded.append(f"xid_{x}")
    if s.ecc_uncorrected_volatile:
        failing.append("ecc_dbe")
    if s.remap_failure:
        failing.append("row_remap_failure")
    if (s.remapped_rows_uncorrectable or 0) >= cfg.remapped_rows_uncorrectable_failing:
        failing.append("remapped_rows_limit")
    if (s.retired_pages or 0) >= cfg.retired_pages_failing:
        failing.append("retired_pages_limit")
    if s.nvlink_links_down:
        failing.append("nvlink_down")
    _fabric(s, failing, degraded)
    temp_degraded, temp_failing, mem_degraded = _temperature_limits(s, cfg)
    if s.temp_gpu_c is not None and s.temp_gpu_c >= temp_failing:
        failing.append("temperature_critical")
    if s.remap_pending or s.retired_pages_pending:
        degraded.append("row_remap_pending")
    if prev is not None:
        if _grew(_nvlink_errors(s), prev.nvlink_errors):
            degraded.append("nvlink_errors")
        if _grew(s.pcie_replay_count, prev.pcie_replay_count):
            degraded.append("pcie_replay")
    reasons_bits = s.clock_event_reasons or 0
    if reasons_bits & THROTTLE_THERMAL_MASK:
        degraded.append("thermal_throttle")
    if reasons_bits & (THROTTLE_HW_SLOWDOWN | THROTTLE_HW_POWER_BRAKE):
        degraded.append("power_brake")
    gpu_hot = s.temp_gpu_c is not None and temp_degraded <= s.temp_gpu_c < temp_failing
    mem_hot = s.temp_mem_c is not None and s.temp_mem_c >= mem_degraded
    if gpu_hot or mem_hot:
        degraded.append("temperature_high")
    if _power_limit_low(s.power_limit_w, s.power_limit_default_w, cfg.power_limit_low_ratio):
        degraded.append("power_limit_low")
    if failing:
        return Verdict(State.FAILING, tuple(failing + degraded))
    if degraded:
        return Verdict(State.DEGRADED, tuple(degraded))
    return Verdict(State.OK, ())


def _fabric(s: GpuSample, failing: list[str], degraded: list[str]) -> None:
    """NVSwitch fabric: not registered (CUDA cannot start on the GPU) or registration failed is failing;
    each fault the health mask names degrades (`fabric_<fault>`)."""
    if s.fabric_state is None or s.fabric_state == FABRIC_NOT_SUPPORTED:
        return
    if s.fabric_state != FABRIC_COMPLETED:
        failing.append("fabric_not_ready")
    elif s.fabric_status:
        failing.append("fabric_error")
    degraded.extend(f"fabric_{fault}" for fault in fabric_mask_faults(s.fabric_health_mask or 0))
