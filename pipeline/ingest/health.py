"""GPU health rules: one sample (and the same GPU's previous counters) -> state and reasons.

States: `ok`, `degraded`, `failing`; `unknown` (no report for longer than `health.silent_after_s`) is
decided by queries over time, since a missing sample cannot classify itself. The rules, their
reasons and the grounding of each threshold are in docs/aggregations.md ("Health"). Everything that
can make a GPU *failing* depends on the sample alone, so the billed (SLA) seconds never depend on the
order samples arrive in; the counter-growth rules only ever degrade.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from gpufleet.config import HealthConfig
from gpufleet.gpu_facts import THROTTLE_HW_POWER_BRAKE, THROTTLE_HW_SLOWDOWN, THROTTLE_THERMAL_MASK
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
            or s.retired_pages_pending or s.nvlink_links_down or (s.clock_event_reasons or 0) & _ALARM_BITS):
        return False
    if (s.remapped_rows_uncorrectable or 0) >= cfg.remapped_rows_uncorrectable_failing:
        return False
    if (s.retired_pages or 0) >= cfg.retired_pages_failing:
        return False
    if (s.temp_gpu_c or 0.0) >= cfg.temp_degraded_c or (s.temp_mem_c or 0.0) >= cfg.mem_temp_degraded_c:
        return False
    if prev is None:
        return True
    return not (_grew(s.pcie_replay_count, prev.pcie_replay_count) or _grew(_nvlink_errors(s), prev.nvlink_errors))


_new_previous = tuple.__new__
_FLAGS = operator.attrgetter(
    "error", "xids", "ecc_uncorrected_volatile", "remap_failure", "remap_pending", "retired_pages_pending",
    "nvlink_links_down",
)
_LEVELS = operator.attrgetter(
    "uuid", "clock_event_reasons", "remapped_rows_uncorrectable", "retired_pages", "temp_gpu_c", "temp_mem_c",
    "pcie_replay_count", "nvlink_replay_errors", "nvlink_recovery_errors",
)


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
    hot_gpu, hot_mem = cfg.temp_degraded_c, cfg.mem_temp_degraded_c
    for s in samples:
        uuid, bits, rows, pages, temp, mem_temp, pcie, replay, recovery = _LEVELS(s)
        nvlink = None if replay is None and recovery is None else (replay or 0) + (recovery or 0)
        prev = last(uuid)
        grew = False
        if prev is None or prev[0] != pcie or prev[1] != nvlink:
            previous[uuid] = _new_previous(Previous, (pcie, nvlink))
            grew = prev is not None and (
                (pcie is not None and prev[0] is not None and pcie > prev[0])
                or (nvlink is not None and prev[1] is not None and nvlink > prev[1]))
        if (grew or any(_FLAGS(s)) or (bits or 0) & _ALARM_BITS or (rows or 0) >= rows_limit
                or (pages or 0) >= pages_limit or (temp or 0.0) >= hot_gpu or (mem_temp or 0.0) >= hot_mem):
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
    if s.temp_gpu_c is not None and s.temp_gpu_c >= cfg.temp_failing_c:
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
    gpu_hot = s.temp_gpu_c is not None and cfg.temp_degraded_c <= s.temp_gpu_c < cfg.temp_failing_c
    mem_hot = s.temp_mem_c is not None and s.temp_mem_c >= cfg.mem_temp_degraded_c
    if gpu_hot or mem_hot:
        degraded.append("temperature_high")
    if failing:
        return Verdict(State.FAILING, tuple(failing + degraded))
    if degraded:
        return Verdict(State.DEGRADED, tuple(degraded))
    return Verdict(State.OK, ())
