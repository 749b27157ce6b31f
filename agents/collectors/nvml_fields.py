"""Counters read in batches through `nvmlDeviceGetFieldValues`, and what they become on the wire.

Design notes: docs/design-notes.md#agents-collectors-nvml-fields-py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gpufleet.agents.collectors.nvml_funnel import CallCache, Funnel, GpuLost, LibraryDown

MAX_FIELDS_PER_CALL: Final = 128
"""Entries per `nvmlDeviceGetFieldValues` call; a longer plan is split (nvml.h documents no limit)."""

_VALUE_MEMBERS: Final = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
"""`c_nvmlValue_t` union member for each NVML_VALUE_TYPE_* (0..6)."""

Entry = tuple[int, int]
"""(field id, scope id): the scope is the NVLink link for per-link fields, the power scope for power."""


@dataclass(frozen=True)
class FieldIds:
    """The field ids the collector asks for, resolved from the nvml module once."""

    energy: int
    power: int
    mem_temp: int
    throttle_power: int
    throttle_thermal: int
    link_count: int
    link_state: int
    ecc: tuple[int, int, int, int]
    """SBE volatile, DBE volatile, SBE aggregate, DBE aggregate totals."""
    remapped: tuple[int, int, int, int]
    """Correctable, uncorrectable, pending, failure."""
    retired: tuple[int, int, int]
    """SBE pages, DBE pages, pending."""
    pcie_replay: int
    dl: tuple[int, int, int]
    """NVLink 4 and older, per link: replay, recovery, CRC."""
    nvlink5: tuple[int, int, int]
    """NVLink5, per link: symbol errors, effective errors, link recovery events."""
    link_inactive: int
    recovery_action: int
    power_limit: int
    """The enforced limit (`NVML_FI_DEV_POWER_CURRENT_LIMIT`, mW, GPU scope)."""
    power_default_limit: int

    @classmethod
    def of(cls, nvml: Any) -> FieldIds:
        return cls(
            energy=nvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, power=nvml.NVML_FI_DEV_POWER_AVERAGE,
            mem_temp=nvml.NVML_FI_DEV_MEMORY_TEMP, throttle_power=nvml.NVML_FI_DEV_PERF_POLICY_POWER,
            throttle_thermal=nvml.NVML_FI_DEV_PERF_POLICY_THERMAL, link_count=nvml.NVML_FI_DEV_NVLINK_LINK_COUNT,
            link_state=nvml.NVML_FI_DEV_NVLINK_GET_STATE,
            ecc=(nvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, nvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
                 nvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL, nvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL),
            remapped=(nvml.NVML_FI_DEV_REMAPPED_COR, nvml.NVML_FI_DEV_REMAPPED_UNC, nvml.NVML_FI_DEV_REMAPPED_PENDING,
                      nvml.NVML_FI_DEV_REMAPPED_FAILURE),
            retired=(nvml.NVML_FI_DEV_RETIRED_SBE, nvml.NVML_FI_DEV_RETIRED_DBE, nvml.NVML_FI_DEV_RETIRED_PENDING),
            pcie_replay=nvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER,
            dl=(nvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY, nvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY,
                nvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC),
            nvlink5=(nvml.NVML_FI_DEV_NVLINK_COUNT_SYMBOL_ERRORS, nvml.NVML_FI_DEV_NVLINK_COUNT_EFFECTIVE_ERRORS,
                     nvml.NVML_FI_DEV_NVLINK_COUNT_LINK_RECOVERY_EVENTS),
            link_inactive=nvml.NVML_NVLINK_STATE_INACTIVE,
            recovery_action=nvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION,
            power_limit=nvml.NVML_FI_DEV_POWER_CURRENT_LIMIT,
            power_default_limit=nvml.NVML_FI_DEV_POWER_DEFAULT_LIMIT,
        )

    def fast(self, links: Sequence[int]) -> list[Entry]:
        """Read every interval: energy, power (GPU scope), memory temperature, throttle times, the recovery
        action, link states."""
        return [(self.energy, 0), (self.power, 0), (self.mem_temp, 0), (self.throttle_power, 0),
                (self.throttle_thermal, 0), (self.recovery_action, 0), *((self.link_state, link) for link in links)]

    def baseline(self) -> list[Entry]:
        """Read once when a GPU is attached: the counters' starting values and the NVLink count."""
        return [(self.energy, 0), (self.throttle_power, 0), (self.throttle_thermal, 0), (self.link_count, 0)]

    def slow(self, links: Sequence[int]) -> list[Entry]:
        """Read every `slow_every_s`: error counters that change rarely (and cost GSP RPCs on Hopper), and the
        power limits (GPU scope)."""
        per_link = [(f, link) for link in links for f in (*self.dl, *self.nvlink5)]
        return [*((f, 0) for f in (*self.ecc, *self.remapped, *self.retired, self.pcie_replay)),
                (self.power_limit, 0), (self.power_default_limit, 0), *per_link]


@dataclass
class FieldReading:
    """What one or more `nvmlDeviceGetFieldValues` calls answered."""

    values: dict[Entry, int | float] = field(default_factory=dict)
    stamps: dict[Entry, int] = field(default_factory=dict)
    """The entry's `timestamp` (CPU microseconds) as NVML stamped it."""
    failed: set[Entry] = field(default_factory=set)
    """Entries that answered an error other than "not supported" (their value is unknown this time)."""

    def get(self, entry: Entry) -> int | float | None:
        return self.values.get(entry)

    def merge(self, other: FieldReading) -> None:
        self.values.update(other.values)
        self.stamps.update(other.stamps)
        self.failed |= other.failed


def field_key(entry: Entry) -> tuple[str, int, int]:
    """The funnel cache key of one field entry."""
    return ("field", *entry)


def read_fields(funnel: Funnel, cache: CallCache, errors: list[str], handle: Any,
                entries: Iterable[Entry]) -> FieldReading:
    """Ask for `entries` (those not known to be unsupported) in as few calls as the limit allows."""
    wanted = [e for e in entries if not cache.skip(field_key(e))]
    out = FieldReading()
    for start in range(0, len(wanted), MAX_FIELDS_PER_CALL):
        chunk = wanted[start:start + MAX_FIELDS_PER_CALL]
        values = funnel.call(cache, errors, "nvmlDeviceGetFieldValues", handle, chunk,
                             key="nvmlDeviceGetFieldValues")
        if values is None:
            if not cache.skip("nvmlDeviceGetFieldValues"):
                out.failed.update(chunk)
            continue
        for entry, value in zip(chunk, values, strict=True):
            _decode(funnel, cache, errors, entry, value, out)
    return out


def _decode(funnel: Funnel, cache: CallCache, errors: list[str], entry: Entry, value: Any, out: FieldReading) -> None:
    """One entry's own answer into `out`, through the same error classes as a whole call."""
    kind = funnel.classify_return(value.nvmlReturn)
    if kind is None:
        if not 0 <= value.valueType < len(_VALUE_MEMBERS):
            cache.counters.add(errors=1)
            errors.append(f"field {entry}: unknown value type {value.valueType}")
            out.failed.add(entry)
            return
        out.values[entry] = getattr(value.value, _VALUE_MEMBERS[value.valueType])
        out.stamps[entry] = int(value.timestamp)
        return
    error = funnel.nvml.NVMLError(value.nvmlReturn)
    if issubclass(kind, (*funnel.absent, funnel.nvml.NVMLError_InvalidArgument)):
        cache.unsupported.add(field_key(entry))
    elif issubclass(kind, funnel.denied):
        funnel.deny(cache, field_key(entry), f"field {entry[0]}")
    elif issubclass(kind, funnel.lost):
        raise GpuLost(f"{error} (field {entry[0]})")
    elif issubclass(kind, funnel.library):
        raise LibraryDown(f"{error} (field {entry[0]})")
    else:
        cache.counters.add(errors=1)
        errors.append(f"field {entry[0]}/{entry[1]}: {error}")
        out.failed.add(entry)


def link_sum(reading: FieldReading, field_id: int, links: Sequence[int]) -> int | None:
    """A per-link counter summed over the links that have it; None if any link's read failed (a partial
    sum would look like a counter reset) or no link has it."""
    entries = [(field_id, link) for link in links]
    if any(e in reading.failed for e in entries):
        return None
    present = [int(reading.values[e]) for e in entries if e in reading.values]
    return sum(present) if present else None


def links_down(reading: FieldReading, ids: FieldIds, links: Sequence[int]) -> int | None:
    """Links whose state is Inactive; None when a link's state could not be read or no link answered."""
    entries = [(ids.link_state, link) for link in links]
    if any(e in reading.failed for e in entries):
        return None
    states = [reading.values[e] for e in entries if e in reading.values]
    return sum(s == ids.link_inactive for s in states) if states else None
