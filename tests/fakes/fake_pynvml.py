"""A faithful in-memory fake of the `pynvml` module (nvidia-ml-py 13.x) for the NVML collector's tests.

`FakeNvml()` is used where the real module is: `NvmlCollector(nvml=FakeNvml([...]))`. It mirrors the
real module rather than inventing an API of its own:

* the functions the collector calls, with the real names and parameter names (a test compares
  signatures with `inspect`, so the fake cannot drift from the installed pynvml);
* the real constants, the real `NVMLError` class with its generated subclasses and the real ctypes
  structs (`c_nvmlFieldValue_t`, `c_nvmlSample_t`, `c_nvmlEventData_t`, `c_nvmlGpmMetricsGet_t`, ...),
  all re-exported from pynvml itself; handles, event sets and GPM samples are real ctypes pointers
  holding made-up addresses that are never dereferenced, as the real library's are opaque.

NVML's documented rules (nvml.h, quoted where it matters) that the fake keeps:

* calls before `nvmlInit` raise Uninitialized; `nvmlShutdown` is reference counted (a second
  component in the process calling it once too often leaves the collector Uninitialized);
* an unknown handle or link raises InvalidArgument; a lost GPU (`FakeGpu.lost`, "fallen off the
  bus") raises GpuIsLost on every call about it, and a lost GPU stays lost until it is reset;
* **events**: `nvmlEventSetWait` blocks up to its timeout and raises Timeout; events reach only the
  sets registered for them; it "returns GPU_IS_LOST if a GPU has fallen off the bus": here, on every
  wait of a set in which a lost GPU is registered (the narrow reading; the collector also survives
  the wide one); registering for an unsupported type raises NotSupported (the set stays usable), a
  registration that fails with Unknown leaves the set "in undefined state and [it] should be
  freed": every later wait on it raises Unknown;
* **fields**: `nvmlDeviceGetFieldValues` answers each entry with its own `nvmlReturn`, `timestamp`
  (CPU microseconds) and scope (link id for NVLink fields); NVLink DL replay/recovery/CRC fields are
  "unsupported for Blackwell+", where the NVLink5 counters answer instead;
  `NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION` is mJ "since the driver was last reloaded";
  the clocks-event (throttle) counters are cumulative nanoseconds;
* **samples**: `nvmlDeviceGetSamples` returns the driver's buffered utilization samples newer than
  `lastSeenTimeStamp` (CPU microseconds), NotFound when there are none, and NotSupported for
  utilization samples on a MIG-enabled GPU ("not currently supported");
* **GPM**: metrics need two samples of the same GPU taken in order, and "the interval between two
  nvmlGpmSampleGet() calls should be greater than 100ms due to the internal sample refresh rate":
  NVML does not say what it returns otherwise; the fake returns zero activity for samples taken
  within one 100 ms refresh period (the counters did not move), the quietly wrong answer a
  collector must refuse to produce;
* **MIG**: `nvmlDeviceGetMigMode` answers (current, pending); a mode change is pending until the GPU
  is reset (or at once on a GPU that supports resetless MIG), and utilization is NotSupported while
  MIG is on. `FakeGpu.mig_instances` (`FakeMig`: GPU and compute instance ids, profile, slices, memory,
  processes) exist while MIG is on: `nvmlDeviceGetMigDeviceHandleByIndex` answers a handle of their own
  (NotFound past the last), which `nvmlDeviceGetUUID`/`GetName`/`GetMemoryInfo`/
  `GetComputeRunningProcesses`/`GetGpuInstanceId`/`GetComputeInstanceId`/`GetAttributes_v2` accept and
  `nvmlDeviceGetUtilizationRates` refuses (NotSupported, as NVML does for MIG devices);
  `nvmlDeviceGetGpuInstanceProfileInfo` answers the GPU's profiles (an H100: 1, 2, 3, 4 and 7 slices);
* **resets and the driver**: a GPU reset (`reset_gpu`) and a driver unload (`unload_driver`) are
  refused while any client holds NVML open (`nvidia-smi -r` answers "in use"), so a GPU never
  "returns" under a collector that keeps NVML open; a driver load gives new handles and restarts
  the energy counters and the volatile ECC counts;
* **permissions**: an unprivileged caller (`privileged=False`) gets NoPermission from
  `nvmlDeviceGetComputeRunningProcesses` ("if the user doesn't have permission");
* **recovery action** (`NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`): a field value that stays what the driver
  set (`FakeGpu.recovery_action`) until the remedy: `reset_gpu` clears a GPU or bus reset, a driver
  reload (what a reboot does to NVML) clears every action; NotSupported before R570 (`None`);
* **limits**: `nvmlDeviceGetTemperatureThreshold` answers absolute degrees per threshold and
  NotSupported for one the GPU lacks; the power-limit fields (`NVML_FI_DEV_POWER_CURRENT_LIMIT`,
  `..._DEFAULT_LIMIT`, mW, power scope GPU) agree with `nvmlDeviceGetEnforcedPowerLimit` and
  `nvmlDeviceGetPowerManagementDefaultLimit`;
* **fabric**: `nvmlDeviceGetGpuFabricInfoV` fills the versioned struct it is given by reference (v2 or
  v3; another version: ArgumentVersionMismatch); NotSupported on GPUs without fabric support (before
  Hopper), state NOT_SUPPORTED on a Hopper that is on no NVSwitch fabric;
* **enumeration**: a GPU taken off the bus for good (`FakeGpu.present = False`) is still enumerated
  (and GpuIsLost if `lost`) until the driver is loaded again, which enumerates only present GPUs;
  indices then close up, as NVML's do.

Time: the fake keeps its own clock (`now_us`, CPU microseconds). In the default manual mode only
`advance(seconds)` moves it; with `real_time=True` it follows the wall clock. While time passes each
GPU's energy counter integrates `power_mw`, its throttle counters integrate the active
clocks-event bits, and its sampler records `util_gpu_pct`/`util_mem_pct` every
`util_sample_period_us`, so interval averages can be checked by hand.

What a test controls lives on `FakeGpu` (one per GPU, mutable between intervals): the values,
`errors` (call name, or call name plus arguments after the handle, or ("field", field id[, scope])
-> NVML error code), `lost`, `hang` (calls that block until `release_hangs()`). The fake counts
calls per (function, GPU index) in `calls`, injects XIDs with `inject_xid()`, and
`wait_for_event_consumer()` blocks until a consumer has handled every queued event.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pynvml
from pynvml import (
    NVML_AGGREGATE_ECC,
    NVML_CLOCK_GRAPHICS,
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_CLOCK_VIDEO,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNINITIALIZED,
    NVML_ERROR_UNKNOWN,
    NVML_FEATURE_DISABLED,
    NVML_FI_DEV_MEMORY_TEMP,
    NVML_GPM_METRIC_MAX,
    NVML_GPM_METRICS_GET_VERSION,
    NVML_GPM_SUPPORT_VERSION,
    NVML_MEMORY_ERROR_TYPE_CORRECTED,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_NVLINK_ERROR_DL_CRC_DATA,
    NVML_NVLINK_ERROR_DL_CRC_FLIT,
    NVML_NVLINK_ERROR_DL_ECC_DATA,
    NVML_NVLINK_ERROR_DL_RECOVERY,
    NVML_NVLINK_ERROR_DL_REPLAY,
    NVML_NVLINK_MAX_LINKS,
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    NVML_SUCCESS,
    NVML_TEMPERATURE_GPU,
    NVML_VALUE_TYPE_UNSIGNED_INT,
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
    NVML_VOLATILE_ECC,
    NVMLError,
    c_nvmlDevice_t,
    c_nvmlEventData_t,
    c_nvmlEventSet_t,
    c_nvmlFieldValue_t,
    c_nvmlGpmSample_t,
    c_nvmlGpmSupport_t,
    c_nvmlMemory_t,
    c_nvmlMemory_v2_t,
    c_nvmlProcessInfo_v3_t,
    c_nvmlSample_t,
    c_nvmlUtilization_t,
    nvmlEventTypeXidCriticalError,
    nvmlMemory_v2,
    nvmlPciInfo_t,
    nvmlStructToFriendlyObject,
    nvmlTemperature_v1,
)

H100_MEMORY_BYTES = 81559 * 1024 * 1024
"""What NVML reports as total memory on an H100 80GB HBM3 (81559 MiB)."""

ALL_SUPPORTED_EVENTS = (
    pynvml.nvmlEventTypeSingleBitEccError
    | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypePState
    | nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeClock
)
"""What `nvmlDeviceGetSupportedEventTypes` answers on a data-centre GPU."""

T0_US = 1_760_000_000_000_000
"""Where the fake's clock starts (CPU microseconds, 2025-10-09)."""
GPM_REFRESH_US = 100_000
"""GPM's internal sample refresh period (nvml.h: samples should be more than 100 ms apart)."""
SAMPLE_BUFFER = 120
"""How many utilization samples the driver keeps per type (a bounded ring, oldest dropped)."""
HANG_LIMIT_S = 60.0
"""A hung call gives up after this long even if the test never releases it (no test waits that long)."""

_NO_INSTANCE = 0xFFFFFFFF
_ECC_KEYS = [
    (t, c)
    for t in (NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
    for c in (NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC)
]
_NVLINK_COUNTERS = frozenset(
    {
        NVML_NVLINK_ERROR_DL_REPLAY,
        NVML_NVLINK_ERROR_DL_RECOVERY,
        NVML_NVLINK_ERROR_DL_CRC_FLIT,
        NVML_NVLINK_ERROR_DL_CRC_DATA,
        NVML_NVLINK_ERROR_DL_ECC_DATA,
    }
)
NVLINK5_FIELDS = frozenset(
    {
        pynvml.NVML_FI_DEV_NVLINK_COUNT_SYMBOL_ERRORS,
        pynvml.NVML_FI_DEV_NVLINK_COUNT_EFFECTIVE_ERRORS,
        pynvml.NVML_FI_DEV_NVLINK_COUNT_LINK_RECOVERY_EVENTS,
    }
)
"""NVLink5 per-link counters (Blackwell and newer), keyed in `FakeGpu.nvlink5_errors` by (link, field)."""
THROTTLE_BITS = {
    pynvml.NVML_FI_DEV_PERF_POLICY_POWER: 0x04,  # SW power cap
    pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL: 0x20 | 0x40,  # SW or HW thermal slowdown
}
"""Throttle-time field -> the clocks-event bits whose active time it accumulates (ns)."""
_UTIL_SAMPLES = (pynvml.NVML_GPU_UTILIZATION_SAMPLES, pynvml.NVML_MEMORY_UTILIZATION_SAMPLES)


@dataclass
class FakeMig:
    """One MIG device (a GPU instance with one compute instance) of a MIG-enabled `FakeGpu`."""

    uuid: str
    gpu_instance_id: int
    compute_instance_id: int = 0
    profile: str = "1g.10gb"
    gi_slices: int = 1
    ci_slices: int = 1
    mem_total: int = 9_984 * 1024 * 1024
    mem_used: int = 0
    process_pids: list[int] = field(default_factory=list)


MIG_PROFILE_SLICES = {pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: 1, pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: 2,
                      pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: 3, pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: 4,
                      pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: 7}
"""The GPU instance profiles an H100 (or A100) offers, by profile id -> compute slices."""


@dataclass
class FakeGpu:
    """One fake GPU: what each NVML call answers, in NVML's own units (mW, mJ, percent, bytes, MHz, ns)."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    architecture: int = pynvml.NVML_DEVICE_ARCH_HOPPER
    pci: tuple[int, int, int] = (0, 0x18, 0)
    """(domain, bus, device) as `nvmlDeviceGetPciInfo` answers and the kernel's XID lines name it."""
    util_gpu_pct: int = 0
    util_mem_pct: int = 0
    util_sample_period_us: int = 166_667
    """The driver's utilization sampling period (1/6 s on recent data-centre GPUs)."""
    mem_total: int = H100_MEMORY_BYTES
    mem_reserved: int = 0
    mem_used: int = 0
    """Used memory as the v2 call reports it (excluding `mem_reserved`); v1 reports used + reserved."""
    power_mw: int = 0
    energy_mj: int = 0
    """The energy counter (mJ since the driver loaded); integrates `power_mw` as the clock advances."""
    temp_gpu_c: int = 30
    temp_mem_c: int | None = 30
    """None: the NVML_FI_DEV_MEMORY_TEMP field answers NOT_SUPPORTED (consumer GPUs)."""
    clock_sm_mhz: int = 1980
    clock_mem_mhz: int = 2619
    clocks_event_reasons: int = 0
    throttle_ns: dict[int, int] = field(default_factory=lambda: dict.fromkeys(THROTTLE_BITS, 0))
    """Throttle-time field id -> cumulative ns; grows while the matching `clocks_event_reasons` bits are set."""
    ecc: dict[tuple[int, int], int] = field(default_factory=lambda: dict.fromkeys(_ECC_KEYS, 0))
    """(NVML_MEMORY_ERROR_TYPE_*, NVML_VOLATILE_ECC | NVML_AGGREGATE_ECC) -> count."""
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)
    """(correctable, uncorrectable, isPending, failureOccurred); None: not supported (pre-Ampere)."""
    retired_pages: dict[int, list[int]] | None = None
    """Cause -> retired page addresses; None: page retirement not supported (Ampere and newer)."""
    retired_pages_pending: int = NVML_FEATURE_DISABLED
    pcie_replay: int = 0
    nvlink_states: dict[int, int] = field(default_factory=dict)
    """Link -> NVML_NVLINK_STATE_* (1 active, 0 inactive). Empty: no NVLink (every link query: NotSupported)."""
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)
    """(link, NVML_NVLINK_ERROR_DL_*) -> count (NVLink 4 and older); an existing link's counter not listed is 0."""
    nvlink5_errors: dict[tuple[int, int], int] = field(default_factory=dict)
    """(link, NVML_FI_DEV_NVLINK_COUNT_*) -> count (NVLink5, Blackwell); not listed is 0."""
    process_pids: list[int] = field(default_factory=list)
    process_sm_util: dict[int, int] = field(default_factory=dict)
    """pid -> SM utilization percent the driver samples for that process every `util_sample_period_us`
    (`nvmlDeviceGetProcessUtilization`); a listed pid without an entry samples 0."""
    minor: int | None = None
    """/dev/nvidia<minor>; None: the GPU's index."""
    supported_events: int = ALL_SUPPORTED_EVENTS
    gpm_supported: bool = False
    gpm_metrics: dict[int, float] = field(default_factory=dict)
    """GPM metric id -> value (percent) over the interval ending at the next `nvmlGpmSampleGet`."""
    gpm_metric_returns: dict[int, int] = field(default_factory=dict)
    """GPM metric id -> the nvmlReturn that metric reports instead of a value."""
    mig_mode: tuple[int, int] | None = None
    """(current, pending) NVML_DEVICE_MIG_*; None: the GPU has no MIG (nvmlDeviceGetMigMode: NotSupported)."""
    resetless_mig: bool = False
    mig_instances: list[FakeMig] = field(default_factory=list)
    """MIG devices, visible while MIG is enabled."""
    mig_profiles: dict[int, int] = field(default_factory=lambda: dict(MIG_PROFILE_SLICES))
    """GPU instance profile id -> slices, for `nvmlDeviceGetGpuInstanceProfileInfo` (others: NotSupported)."""
    errors: dict[Hashable, int] = field(default_factory=dict)
    """Call name, (call name, *arguments after the handle), or ("field", id[, scope]) -> NVML error code."""
    lost: bool = False
    """The GPU has fallen off the bus: every call about it raises NVMLError_GpuIsLost until `reset_gpu`."""
    hang: set[str] = field(default_factory=set)
    """Call names that block (a GSP timeout) until `FakeNvml.release_hangs()`."""
    recovery_action: int | None = pynvml.NVML_GPU_RECOVERY_ACTION_NONE
    """NVML_GPU_RECOVERY_ACTION_*; None: a driver without the field (NotSupported)."""
    temp_thresholds: dict[int, int] = field(default_factory=lambda: {
        pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 92, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 89,
        pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX: 95, pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: 87})
    """NVML_TEMPERATURE_THRESHOLD_* -> °C (an H100 SXM's); a threshold not listed answers NotSupported."""
    power_limit_mw: int | None = 700_000
    """The enforced power limit; None: not supported (both the field and the call)."""
    power_default_limit_mw: int | None = 700_000
    fabric: tuple[int, int, int, bytes, int] | None = None
    """(state, status, clique id, cluster uuid (16 bytes), health mask) of nvmlDeviceGetGpuFabricInfoV;
    None: the GPU has no fabric support (NotSupported)."""
    serial: str = "1654922007431"
    vbios: str = "96.00.89.00.01"
    persistence_mode: int = pynvml.NVML_FEATURE_ENABLED
    ecc_mode: tuple[int, int] = (pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_ENABLED)
    """(current, pending)."""
    present: bool = True
    """On the bus: False takes the GPU out of the next enumeration (a driver load)."""

    @property
    def nvlink5(self) -> bool:
        return self.architecture >= pynvml.NVML_DEVICE_ARCH_BLACKWELL

    @property
    def mig_enabled(self) -> bool:
        return self.mig_mode is not None and self.mig_mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE


FABRIC_CLUSTER = bytes.fromhex("7c3a1f0e9b2d4c58a6e1f203b4c5d6e7")
FABRIC_HEALTHY_MASK = 0b0001_1010_1010
"""Every yes/no field "false" (2), incorrect configuration "none" (1)."""
FABRIC_OK = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, NVML_SUCCESS, 1, FABRIC_CLUSTER, FABRIC_HEALTHY_MASK)
"""An HGX GPU registered with the Fabric Manager in clique 1."""


def h100(uuid: str, **overrides: Any) -> FakeGpu:
    """An H100 SXM on an HGX board: remapped rows, no page retirement, 18 NVLink 4 links to the NVSwitches (fabric
    registered), GPM, MIG capable."""
    values: dict[str, Any] = {"uuid": uuid, "nvlink_states": dict.fromkeys(range(18), 1), "gpm_supported": True,
                              "mig_mode": (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_DISABLE),
                              "fabric": FABRIC_OK}
    values.update(overrides)
    return FakeGpu(**values)


def b200(uuid: str, **overrides: Any) -> FakeGpu:
    """A B200: NVLink5 (18 links; DL replay/recovery/CRC unsupported, symbol/effective/recovery counters), GPM."""
    values: dict[str, Any] = {"uuid": uuid, "name": "NVIDIA B200", "architecture": pynvml.NVML_DEVICE_ARCH_BLACKWELL,
                              "mem_total": 183_359 * 1024 * 1024, "nvlink_states": dict.fromkeys(range(18), 1),
                              "gpm_supported": True, "fabric": FABRIC_OK, "power_limit_mw": 1_000_000,
                              "power_default_limit_mw": 1_000_000,
                              "mig_mode": (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_DISABLE)}
    values.update(overrides)
    return FakeGpu(**values)


def v100(uuid: str, **overrides: Any) -> FakeGpu:
    """A V100 PCIe: page retirement, no remapped rows, GPM, NVLink, MIG or memory temperature."""
    values: dict[str, Any] = {
        "uuid": uuid, "name": "Tesla V100-PCIE-32GB", "architecture": pynvml.NVML_DEVICE_ARCH_VOLTA,
        "mem_total": 34_359_738_368, "temp_mem_c": None, "remapped_rows": None,
        "retired_pages": {NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [],
                          NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: []},
        "throttle_ns": {}, "util_sample_period_us": 1_000_000, "recovery_action": None,
        "temp_thresholds": {pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 90,
                            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 87},
        "power_limit_mw": 250_000, "power_default_limit_mw": 250_000, "vbios": "88.00.4F.00.09",
    }
    values.update(overrides)
    return FakeGpu(**values)


@dataclass
class _EventSet:
    registered: dict[int, int] = field(default_factory=dict)
    queue: deque[tuple[int, int, int]] = field(default_factory=deque)
    waiting: int = 0
    waits_started: int = 0
    undefined: bool = False
    freed: bool = False
    leaked: bool = False
    """Never freed by the client: released only by the last nvmlShutdown."""


@dataclass
class _GpmSample:
    device: int | None = None
    seq: int = 0
    refresh: int = 0
    metrics: dict[int, float] = field(default_factory=dict)
    returns: dict[int, int] = field(default_factory=dict)
    freed: bool = False
    leaked: bool = False


@dataclass
class _Driver:
    """Per-GPU driver state the fake keeps beside the test's `FakeGpu` (sample buffers, sub-unit remainders)."""

    samples: dict[int, deque[tuple[int, int]]] = field(
        default_factory=lambda: {t: deque(maxlen=SAMPLE_BUFFER) for t in _UTIL_SAMPLES})
    process_samples: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=SAMPLE_BUFFER * 8))
    """(timestamp us, pid, SM percent) per process per sampling period."""
    energy_remainder_nj: int = 0


def _pointer(kind: Any, address: int) -> Any:
    """A ctypes pointer of the real handle type holding a made-up address (never dereferenced)."""
    return ctypes.cast(ctypes.c_void_p(address), kind)


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _power_field(milliwatts: int | None, scope: int) -> tuple[int, int] | int:
    """A power-limit field: mW at the GPU scope; NotSupported for another scope or a GPU without limits."""
    if milliwatts is None or scope != pynvml.NVML_POWER_SCOPE_GPU:
        return NVML_ERROR_NOT_SUPPORTED
    return (NVML_VALUE_TYPE_UNSIGNED_INT, milliwatts)


_RESET_REMEDIES = frozenset({pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, pynvml.NVML_GPU_RECOVERY_ACTION_BUS_RESET})
"""Recovery actions a GPU reset clears; the rest need a reboot (a driver load here) or a drain."""
_FABRIC_VERSIONS = frozenset({pynvml.nvmlGpuFabricInfo_v2, pynvml.nvmlGpuFabricInfo_v3})


def _field_key(requested: int | tuple[int, int]) -> tuple[int, int]:
    """Like pynvml: a field entry is a field id or a (field id, scope id) pair."""
    return requested if isinstance(requested, tuple) else (requested, 0)


def _attributes(gi_slices: int, ci_slices: int, mem_total: int) -> Any:
    attrs = pynvml.c_nvmlDeviceAttributes()
    attrs.gpuInstanceSliceCount, attrs.computeInstanceSliceCount = gi_slices, ci_slices
    attrs.memorySizeMB = mem_total // (1024 * 1024)
    return attrs


class FakeNvml:
    """Stands in for the `pynvml` module; one instance per test, no global state."""

    # The real module's error types, structs and constants, so `except nvml.NVMLError_X` and
    # `nvml.c_nvmlGpmMetricsGet_t()` in the collector behave exactly as with pynvml.
    NVMLError = NVMLError
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_ResetRequired = pynvml.NVMLError_ResetRequired
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_LibRmVersionMismatch = pynvml.NVMLError_LibRmVersionMismatch
    NVMLError_Unknown = pynvml.NVMLError_Unknown
    NVMLError_ArgumentVersionMismatch = pynvml.NVMLError_ArgumentVersionMismatch
    c_nvmlGpmMetricsGet_t = pynvml.c_nvmlGpmMetricsGet_t
    c_nvmlGpuFabricInfoV_t = pynvml.c_nvmlGpuFabricInfoV_t
    NVML_GPU_FABRIC_STATE_NOT_SUPPORTED = pynvml.NVML_GPU_FABRIC_STATE_NOT_SUPPORTED
    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
    NVML_FI_DEV_POWER_CURRENT_LIMIT = pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT
    NVML_FI_DEV_POWER_DEFAULT_LIMIT = pynvml.NVML_FI_DEV_POWER_DEFAULT_LIMIT
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
    NVML_TEMPERATURE_THRESHOLD_MEM_MAX = pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_FEATURE_DISABLED = NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_MEMORY_ERROR_TYPE_CORRECTED = NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_AGGREGATE_ECC = NVML_AGGREGATE_ECC
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = (
        NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    )
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    NVML_NVLINK_MAX_LINKS = NVML_NVLINK_MAX_LINKS
    NVML_NVLINK_ERROR_DL_REPLAY = NVML_NVLINK_ERROR_DL_REPLAY
    NVML_NVLINK_ERROR_DL_RECOVERY = NVML_NVLINK_ERROR_DL_RECOVERY
    NVML_NVLINK_ERROR_DL_CRC_FLIT = NVML_NVLINK_ERROR_DL_CRC_FLIT
    NVML_NVLINK_ERROR_DL_CRC_DATA = NVML_NVLINK_ERROR_DL_CRC_DATA
    NVML_GPU_UTILIZATION_SAMPLES = pynvml.NVML_GPU_UTILIZATION_SAMPLES
    NVML_MEMORY_UTILIZATION_SAMPLES = pynvml.NVML_MEMORY_UTILIZATION_SAMPLES
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_GPU_INSTANCE_PROFILE_1_SLICE = pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE
    NVML_GPU_INSTANCE_PROFILE_2_SLICE = pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE
    NVML_GPU_INSTANCE_PROFILE_3_SLICE = pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE
    NVML_GPU_INSTANCE_PROFILE_4_SLICE = pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE
    NVML_GPU_INSTANCE_PROFILE_6_SLICE = pynvml.NVML_GPU_INSTANCE_PROFILE_6_SLICE
    NVML_GPU_INSTANCE_PROFILE_7_SLICE = pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE
    NVML_GPU_INSTANCE_PROFILE_8_SLICE = pynvml.NVML_GPU_INSTANCE_PROFILE_8_SLICE
    NVML_NVLINK_STATE_INACTIVE = pynvml.NVML_NVLINK_STATE_INACTIVE
    NVML_FI_DEV_MEMORY_TEMP = NVML_FI_DEV_MEMORY_TEMP
    NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION = pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION
    NVML_FI_DEV_POWER_AVERAGE = pynvml.NVML_FI_DEV_POWER_AVERAGE
    NVML_FI_DEV_PERF_POLICY_POWER = pynvml.NVML_FI_DEV_PERF_POLICY_POWER
    NVML_FI_DEV_PERF_POLICY_THERMAL = pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL
    NVML_FI_DEV_ECC_SBE_VOL_TOTAL = pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL
    NVML_FI_DEV_ECC_DBE_VOL_TOTAL = pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL
    NVML_FI_DEV_ECC_SBE_AGG_TOTAL = pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL
    NVML_FI_DEV_ECC_DBE_AGG_TOTAL = pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL
    NVML_FI_DEV_RETIRED_SBE = pynvml.NVML_FI_DEV_RETIRED_SBE
    NVML_FI_DEV_RETIRED_DBE = pynvml.NVML_FI_DEV_RETIRED_DBE
    NVML_FI_DEV_RETIRED_PENDING = pynvml.NVML_FI_DEV_RETIRED_PENDING
    NVML_FI_DEV_REMAPPED_COR = pynvml.NVML_FI_DEV_REMAPPED_COR
    NVML_FI_DEV_REMAPPED_UNC = pynvml.NVML_FI_DEV_REMAPPED_UNC
    NVML_FI_DEV_REMAPPED_PENDING = pynvml.NVML_FI_DEV_REMAPPED_PENDING
    NVML_FI_DEV_REMAPPED_FAILURE = pynvml.NVML_FI_DEV_REMAPPED_FAILURE
    NVML_FI_DEV_PCIE_REPLAY_COUNTER = pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER
    NVML_FI_DEV_NVLINK_LINK_COUNT = pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT
    NVML_FI_DEV_NVLINK_GET_STATE = pynvml.NVML_FI_DEV_NVLINK_GET_STATE
    NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY = pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY
    NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY = pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY
    NVML_FI_DEV_NVLINK_ERROR_DL_CRC = pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC
    NVML_FI_DEV_NVLINK_COUNT_SYMBOL_ERRORS = pynvml.NVML_FI_DEV_NVLINK_COUNT_SYMBOL_ERRORS
    NVML_FI_DEV_NVLINK_COUNT_EFFECTIVE_ERRORS = pynvml.NVML_FI_DEV_NVLINK_COUNT_EFFECTIVE_ERRORS
    NVML_FI_DEV_NVLINK_COUNT_LINK_RECOVERY_EVENTS = pynvml.NVML_FI_DEV_NVLINK_COUNT_LINK_RECOVERY_EVENTS
    NVML_GPM_METRIC_SM_UTIL = pynvml.NVML_GPM_METRIC_SM_UTIL
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
    NVML_GPM_METRIC_DRAM_BW_UTIL = pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL
    NVML_GPM_METRICS_GET_VERSION = NVML_GPM_METRICS_GET_VERSION
    NVML_VALUE_TYPE_UNSIGNED_INT = NVML_VALUE_TYPE_UNSIGNED_INT
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError
    nvmlEventTypePState = pynvml.nvmlEventTypePState
    nvmlEventTypeClock = pynvml.nvmlEventTypeClock
    nvmlMemory_v2 = nvmlMemory_v2

    def __init__(
        self,
        gpus: Sequence[FakeGpu] = (),
        *,
        init_error: int | None = None,
        privileged: bool = True,
        real_time: bool = False,
    ) -> None:
        """`init_error`: the NVML error code `nvmlInit` raises (e.g. NVML_ERROR_LIBRARY_NOT_FOUND);
        `privileged`: the caller is root (else per-user restrictions apply); `real_time`: the clock
        follows the wall clock instead of `advance()`."""
        self.gpus = list(gpus)
        self.init_error = init_error
        self.privileged = privileged
        self.calls: Counter[tuple[str, int | None]] = Counter()
        """(function name, GPU index or None) -> how many times it was called."""
        self.field_requests: Counter[tuple[int, int, int]] = Counter()
        """(GPU index, field id, scope id) -> how many `nvmlDeviceGetFieldValues` entries asked for it."""
        self.init_count = 0
        self.shutdown_count = 0
        self.driver_loaded = True
        self.driver_version = "580.95.05"
        """What `nvmlSystemGetDriverVersion` answers (a test changes it around `load_driver`)."""
        self._real_time = real_time
        self._now_us = time.time_ns() // 1000 if real_time else T0_US
        self._refcount = 0
        self._lock = threading.RLock()
        self._events = threading.Condition(self._lock)
        self._hangs = threading.Event()
        self._addresses = itertools.count(0x7F0000001000, 0x100)
        self._drivers = [_Driver() for _ in self.gpus]
        self._handles: list[Any] = []
        self._enumerated: list[int] = []
        """The GPUs (by position in `gpus`) the driver enumerated at its last load, in NVML index order."""
        self._by_address: dict[int, int] = {}
        self._new_handles()
        self._event_sets: dict[int, _EventSet] = {}
        self._gpm_samples: dict[int, _GpmSample] = {}
        self._gpm_seq = itertools.count(1)
        self._record_samples(self._now_us - 1_000_000, self._now_us)  # the driver has been sampling for a while

    # -- test controls -----------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self._refcount > 0

    @property
    def now_us(self) -> int:
        """The fake's CPU clock in microseconds (what timestamps in samples and field values use)."""
        with self._lock:
            self._sync_clock()
            return self._now_us

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass: counters integrate and the sampler records the current values."""
        with self._lock:
            start = self._now_us
            self._now_us += round(seconds * 1_000_000)
            self._integrate(start, self._now_us)

    def calls_to(self, name: str, gpu: int | None = None) -> int:
        """How many times `name` was called for GPU `gpu` (None: calls not about one GPU)."""
        return self.calls[(name, gpu)]

    def calls_for_gpu(self, gpu: int) -> int:
        """Every call made about GPU `gpu`."""
        return sum(n for (_, index), n in self.calls.items() if index == gpu)

    def handle(self, gpu: int) -> Any:
        """GPU `gpu`'s current handle (tests build event data with it)."""
        return self._handles[gpu]

    def inject_xid(self, gpu: int, xid: int, *, alias: bool = False) -> None:
        """The driver raises XID `xid` on GPU `gpu`: every event set registered for XIDs there gets it.

        `alias`: the event names the GPU by another handle value than the one the client holds (NVML's
        handles are opaque; only `nvmlDeviceGetUUID` of the event's handle says which GPU it is).
        """
        address = _address(self._handles[gpu])
        delivered = address
        if alias:
            delivered = next(self._addresses)
            self._by_address[delivered] = gpu
        with self._events:
            for es in self._event_sets.values():
                if not es.freed and es.registered.get(address, 0) & nvmlEventTypeXidCriticalError:
                    es.queue.append((delivered, nvmlEventTypeXidCriticalError, xid))
            self._events.notify_all()

    def wait_for_event_consumer(self, timeout: float = 10.0) -> bool:
        """Block until every usable event set is empty and a consumer has begun a new wait on each since.

        A consumer loop (wait -> handle -> wait on the next set) that has gone round every set with
        nothing queued has finished handling everything injected before; False if that never happens.
        """
        def usable() -> list[_EventSet]:
            return [es for es in self._event_sets.values() if not es.freed and not es.undefined]

        with self._events:
            if not self._events.wait_for(lambda: all(not es.queue for es in usable()), timeout):
                return False
            marks = {id(es): es.waits_started for es in usable()}
            return self._events.wait_for(
                lambda: all(es.waits_started > marks.get(id(es), -1) for es in usable()), timeout)

    def release_hangs(self) -> None:
        """Every hung call returns (its answer as if it had not hung)."""
        self._hangs.set()

    def reset_gpu(self, gpu: int) -> bool:
        """`nvidia-smi -r -i gpu`: refused (False) while any client holds NVML open, as a real reset is.

        A reset brings a lost GPU back, clears its volatile ECC counts, applies a pending MIG mode and clears
        a recovery action a GPU or bus reset remedies (a reboot or a drain is still needed for the others).
        """
        with self._lock:
            if self._refcount > 0:
                return False
            g = self.gpus[gpu]
            g.lost = False
            if g.recovery_action in _RESET_REMEDIES:
                g.recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_NONE
            for key in list(g.ecc):
                if key[1] == NVML_VOLATILE_ECC:
                    g.ecc[key] = 0
            if g.mig_mode is not None:
                g.mig_mode = (g.mig_mode[1], g.mig_mode[1])
            return True

    def set_mig_mode(self, gpu: int, mode: int) -> None:
        """`nvidia-smi -mig 0|1`: pending until the next reset, or current at once with resetless MIG."""
        g = self.gpus[gpu]
        if g.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        g.mig_mode = (mode, mode) if g.resetless_mig else (g.mig_mode[0], mode)

    def unload_driver(self) -> bool:
        """`rmmod nvidia`: refused (False) while a client holds NVML open (the module is in use)."""
        with self._lock:
            if self._refcount > 0:
                return False
            self.driver_loaded = False
            return True

    def load_driver(self) -> None:
        """`modprobe nvidia`: new handles, energy counters from 0, volatile ECC cleared, lost GPUs back, recovery
        actions cleared; only the GPUs still on the bus (`present`) are enumerated."""
        with self._lock:
            self.driver_loaded = True
            for g, d in zip(self.gpus, self._drivers, strict=True):
                g.energy_mj, d.energy_remainder_nj, g.lost = 0, 0, False
                if g.recovery_action is not None:
                    g.recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_NONE
                for key in list(g.ecc):
                    if key[1] == NVML_VOLATILE_ECC:
                        g.ecc[key] = 0
            self._new_handles()

    @property
    def live_event_sets(self) -> int:
        return sum(not es.freed for es in self._event_sets.values())

    @property
    def live_gpm_samples(self) -> int:
        return sum(not s.freed for s in self._gpm_samples.values())

    @property
    def leaked(self) -> int:
        """Event sets and GPM samples the client never freed (the last nvmlShutdown released them)."""
        return sum(x.leaked for x in (*self._event_sets.values(), *self._gpm_samples.values()))

    # -- internals ---------------------------------------------------------------------------

    def _new_handles(self) -> None:
        self._handles = [_pointer(c_nvmlDevice_t, next(self._addresses)) for _ in self.gpus]
        self._enumerated = [i for i, g in enumerate(self.gpus) if g.present]
        self._by_address = {_address(self._handles[i]): i for i in self._enumerated}
        self._registered_address = dict(self._by_address)
        self._mig_handles: dict[tuple[int, str], Any] = {}
        self._mig_by_address: dict[int, tuple[int, str]] = {}

    def _mig(self, handle: Any) -> tuple[FakeGpu, FakeMig] | None:
        """The (parent, MIG device) a MIG handle names; None for any other handle."""
        key = self._mig_by_address.get(_address(handle)) if isinstance(handle, c_nvmlDevice_t) else None
        if key is None:
            return None
        parent = self.gpus[key[0]]
        mig = next((m for m in parent.mig_instances if m.uuid == key[1]), None)
        if mig is None or not parent.mig_enabled:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # the instance was destroyed
        return parent, mig

    def _mig_call(self, name: str, handle: Any) -> tuple[FakeGpu, FakeMig] | None:
        """Count and check a call on a MIG handle (the parent's index, lost and injected errors apply)."""
        key = self._mig_by_address.get(_address(handle)) if isinstance(handle, c_nvmlDevice_t) else None
        if key is None:
            return None
        self._require_init(name, key[0])
        found = self._mig(handle)
        assert found is not None
        self._raise_injected(found[0], name)
        return found

    def _sync_clock(self) -> None:
        if self._real_time:
            now = time.time_ns() // 1000
            if now > self._now_us:
                start, self._now_us = self._now_us, now
                self._integrate(start, now)

    def _integrate(self, start_us: int, end_us: int) -> None:
        """Counters and samplers over (start, end]: energy, throttle time, utilization samples."""
        dt_us = end_us - start_us
        for g, d in zip(self.gpus, self._drivers, strict=True):
            if g.lost:
                continue
            nj = g.power_mw * dt_us + d.energy_remainder_nj  # mW x us = nJ
            g.energy_mj += nj // 1_000_000
            d.energy_remainder_nj = nj % 1_000_000
            for fid, bits in THROTTLE_BITS.items():
                if fid in g.throttle_ns and g.clocks_event_reasons & bits:
                    g.throttle_ns[fid] += dt_us * 1000
        self._record_samples(start_us, end_us)

    def _record_samples(self, start_us: int, end_us: int) -> None:
        for g, d in zip(self.gpus, self._drivers, strict=True):
            period = g.util_sample_period_us
            first = (start_us // period + 1) * period
            for ts in range(max(first, end_us - period * SAMPLE_BUFFER), end_us + 1, period):
                d.samples[pynvml.NVML_GPU_UTILIZATION_SAMPLES].append((ts, g.util_gpu_pct))
                d.samples[pynvml.NVML_MEMORY_UTILIZATION_SAMPLES].append((ts, g.util_mem_pct))
                for pid in g.process_pids:
                    d.process_samples.append((ts, pid, g.process_sm_util.get(pid, 0)))

    def _require_init(self, name: str, gpu: int | None = None) -> None:
        with self._lock:
            self.calls[(name, gpu)] += 1
            self._sync_clock()
        if self._refcount == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _device(self, name: str, handle: Any, *args: Hashable) -> FakeGpu:
        """Validate the handle, count the call, and raise whatever the test made this call raise."""
        index = self._by_address.get(_address(handle)) if isinstance(handle, c_nvmlDevice_t) else None
        self._require_init(name, index)
        if index is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        self._raise_injected(gpu, name, *args)
        return gpu

    def _raise_injected(self, gpu: FakeGpu, name: str, *args: Hashable) -> None:
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if name in gpu.hang:
            self._hangs.wait(HANG_LIMIT_S)
        for key in (name, (name, *args)):
            if key in gpu.errors:
                raise NVMLError(gpu.errors[key])

    def _event_set(self, event_set: Any) -> _EventSet:
        es = self._event_sets.get(_address(event_set)) if isinstance(event_set, c_nvmlEventSet_t) else None
        if es is None or es.freed:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return es

    def _gpm_sample(self, gpm_sample: Any) -> _GpmSample:
        sample = self._gpm_samples.get(_address(gpm_sample)) if isinstance(gpm_sample, c_nvmlGpmSample_t) else None
        if sample is None or sample.freed:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return sample

    # -- library -----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_count += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        if not self.driver_loaded:
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
        self._refcount += 1

    def nvmlShutdown(self) -> None:
        """The last shutdown releases everything the library allocated: event sets and GPM samples die."""
        self.shutdown_count += 1
        if self._refcount == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self._refcount -= 1
        if self._refcount == 0:
            with self._events:
                for item in (*self._event_sets.values(), *self._gpm_samples.values()):
                    if not item.freed:
                        item.freed, item.leaked = True, True
                self._events.notify_all()

    def nvmlSystemGetDriverVersion(self) -> str:
        self._require_init("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._require_init("nvmlDeviceGetCount")
        return len(self._enumerated)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        gpu = self._enumerated[index] if 0 <= index < len(self._enumerated) else None
        self._require_init("nvmlDeviceGetHandleByIndex", gpu)
        if gpu is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._raise_injected(self.gpus[gpu], "nvmlDeviceGetHandleByIndex")
        return self._handles[gpu]

    # -- identity and readings ---------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: Any) -> str:
        mig = self._mig_call("nvmlDeviceGetName", handle)
        if mig is not None:
            return f"{mig[0].name} MIG {mig[1].profile}"
        return self._device("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        mig = self._mig_call("nvmlDeviceGetUUID", handle)
        return mig[1].uuid if mig is not None else self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        gpu = self._device("nvmlDeviceGetMaxMigDeviceCount", device)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return max(gpu.mig_profiles.values(), default=0)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> Any:
        gpu = self._device("nvmlDeviceGetMigDeviceHandleByIndex", device, index)
        if not gpu.mig_enabled:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < len(gpu.mig_instances):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        key = (self.gpus.index(gpu), gpu.mig_instances[index].uuid)
        if key not in self._mig_handles:
            handle = self._mig_handles[key] = _pointer(c_nvmlDevice_t, next(self._addresses))
            self._mig_by_address[_address(handle)] = key
        return self._mig_handles[key]

    def nvmlDeviceGetGpuInstanceId(self, device: Any) -> int:
        mig = self._mig_call("nvmlDeviceGetGpuInstanceId", device)
        if mig is None:
            self._device("nvmlDeviceGetGpuInstanceId", device)
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # not a MIG device handle
        return mig[1].gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, device: Any) -> int:
        mig = self._mig_call("nvmlDeviceGetComputeInstanceId", device)
        if mig is None:
            self._device("nvmlDeviceGetComputeInstanceId", device)
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return mig[1].compute_instance_id

    def nvmlDeviceGetAttributes_v2(self, device: Any) -> Any:
        mig = self._mig_call("nvmlDeviceGetAttributes_v2", device)
        if mig is None:
            gpu = self._device("nvmlDeviceGetAttributes_v2", device)
            slices = max(gpu.mig_profiles.values(), default=1)
            return _attributes(slices, slices, gpu.mem_total)
        return _attributes(mig[1].gi_slices, mig[1].ci_slices, mig[1].mem_total)

    def nvmlDeviceGetGpuInstanceProfileInfo(self, device: Any, profile: int, version: int = 2) -> Any:
        gpu = self._device("nvmlDeviceGetGpuInstanceProfileInfo", device, profile)
        if gpu.mig_mode is None or profile not in gpu.mig_profiles:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
        info.id, info.sliceCount = profile, gpu.mig_profiles[profile]
        return info

    def nvmlDeviceGetArchitecture(self, device: Any) -> int:
        return self._device("nvmlDeviceGetArchitecture", device).architecture

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        gpu = self._device("nvmlDeviceGetPciInfo", handle)
        domain, bus, dev = gpu.pci
        bus_id = f"{domain:08X}:{bus:02X}:{dev:02X}.0".encode()
        return nvmlPciInfo_t(busIdLegacy=bus_id, domain=domain, bus=bus, device=dev, busId=bus_id)

    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        gpu = self._device("nvmlDeviceGetMigMode", device)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(gpu.mig_mode)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        if self._mig_call("nvmlDeviceGetUtilizationRates", handle) is not None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle)
        if gpu.mig_enabled:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return c_nvmlUtilization_t(gpu=gpu.util_gpu_pct, memory=gpu.util_mem_pct)

    def nvmlDeviceGetSamples(self, device: Any, sampling_type: int, timeStamp: int) -> Any:
        gpu = self._device("nvmlDeviceGetSamples", device, sampling_type)
        if sampling_type not in _UTIL_SAMPLES or gpu.mig_enabled:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        with self._lock:
            buffered = self._drivers[self.gpus.index(gpu)].samples[sampling_type]
            newer = [(ts, v) for ts, v in buffered if ts > timeStamp]
        if not newer:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        out = []
        for ts, value in newer:
            sample = c_nvmlSample_t()
            sample.timeStamp, sample.sampleValue.uiVal = ts, value
            out.append(sample)
        return (NVML_VALUE_TYPE_UNSIGNED_INT, out)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        mig = self._mig_call("nvmlDeviceGetMemoryInfo", handle)
        if mig is not None:
            m = mig[1]
            if not version:
                return c_nvmlMemory_t(total=m.mem_total, free=m.mem_total - m.mem_used, used=m.mem_used)
            return c_nvmlMemory_v2_t(version=version, total=m.mem_total, reserved=0, free=m.mem_total - m.mem_used,
                                     used=m.mem_used)
        gpu = self._device("nvmlDeviceGetMemoryInfo", handle, *(() if not version else (version,)))
        if not version:
            used = gpu.mem_used + gpu.mem_reserved
            return c_nvmlMemory_t(total=gpu.mem_total, free=gpu.mem_total - used, used=used)
        if version != nvmlMemory_v2:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        free = gpu.mem_total - gpu.mem_reserved - gpu.mem_used
        return c_nvmlMemory_v2_t(
            version=version, total=gpu.mem_total, reserved=gpu.mem_reserved, free=free, used=gpu.mem_used
        )

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int, version: int = nvmlTemperature_v1) -> int:
        gpu = self._device("nvmlDeviceGetTemperatureV", handle, sensor)
        if version != nvmlTemperature_v1:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temp_gpu_c

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._device("nvmlDeviceGetTemperature", handle, sensor)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temp_gpu_c

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[int | tuple[int, int]]) -> Any:
        gpu = self._device("nvmlDeviceGetFieldValues", handle)
        index = self._by_address[_address(handle)]
        now = self.now_us
        values = (c_nvmlFieldValue_t * len(fieldIds))()
        for value, requested in zip(values, fieldIds, strict=True):
            field_id, scope_id = _field_key(requested)
            self.field_requests[(index, field_id, scope_id)] += 1
            value.fieldId, value.scopeId, value.timestamp, value.latencyUsec = field_id, scope_id, now, 0
            injected = gpu.errors.get(("field", field_id, scope_id), gpu.errors.get(("field", field_id)))
            answer = self._field(gpu, field_id, scope_id) if injected is None else injected
            if isinstance(answer, tuple):
                value.valueType, number = answer
                if value.valueType == NVML_VALUE_TYPE_UNSIGNED_INT:
                    value.value.uiVal = number
                else:
                    value.value.ullVal = number
                value.nvmlReturn = NVML_SUCCESS
            else:
                value.nvmlReturn = answer
        return values

    def _field(self, gpu: FakeGpu, field_id: int, scope: int) -> tuple[int, int] | int:
        """One field's (value type, value), or the NVML error code its entry reports."""
        uint, ull = NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
        p = pynvml
        simple: dict[int, Callable[[], tuple[int, int] | int]] = {
            NVML_FI_DEV_MEMORY_TEMP: lambda: (uint, gpu.temp_mem_c) if gpu.temp_mem_c is not None
            else NVML_ERROR_NOT_SUPPORTED,
            p.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: lambda: (ull, gpu.energy_mj),
            p.NVML_FI_DEV_POWER_AVERAGE: lambda: (uint, gpu.power_mw) if scope == p.NVML_POWER_SCOPE_GPU
            else NVML_ERROR_NOT_SUPPORTED,
            p.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: lambda: (ull, gpu.ecc[(NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                                                    NVML_VOLATILE_ECC)]),
            p.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: lambda: (ull, gpu.ecc[(NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                                    NVML_VOLATILE_ECC)]),
            p.NVML_FI_DEV_ECC_SBE_AGG_TOTAL: lambda: (ull, gpu.ecc[(NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                                                    NVML_AGGREGATE_ECC)]),
            p.NVML_FI_DEV_ECC_DBE_AGG_TOTAL: lambda: (ull, gpu.ecc[(NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                                    NVML_AGGREGATE_ECC)]),
            p.NVML_FI_DEV_PCIE_REPLAY_COUNTER: lambda: (ull, gpu.pcie_replay),
            p.NVML_FI_DEV_NVLINK_LINK_COUNT: lambda: (uint, len(gpu.nvlink_states)) if gpu.nvlink_states
            else NVML_ERROR_NOT_SUPPORTED,
            p.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: lambda: (uint, gpu.recovery_action)
            if gpu.recovery_action is not None else NVML_ERROR_NOT_SUPPORTED,
            p.NVML_FI_DEV_POWER_CURRENT_LIMIT: lambda: _power_field(gpu.power_limit_mw, scope),
            p.NVML_FI_DEV_POWER_DEFAULT_LIMIT: lambda: _power_field(gpu.power_default_limit_mw, scope),
        }
        if field_id in simple:
            return simple[field_id]()
        if field_id in THROTTLE_BITS:
            return (ull, gpu.throttle_ns[field_id]) if field_id in gpu.throttle_ns else NVML_ERROR_NOT_SUPPORTED
        if field_id in (p.NVML_FI_DEV_REMAPPED_COR, p.NVML_FI_DEV_REMAPPED_UNC, p.NVML_FI_DEV_REMAPPED_PENDING,
                        p.NVML_FI_DEV_REMAPPED_FAILURE):
            if gpu.remapped_rows is None:
                return NVML_ERROR_NOT_SUPPORTED
            return (uint, gpu.remapped_rows[field_id - p.NVML_FI_DEV_REMAPPED_COR])
        if field_id in (p.NVML_FI_DEV_RETIRED_SBE, p.NVML_FI_DEV_RETIRED_DBE, p.NVML_FI_DEV_RETIRED_PENDING):
            return self._retired_field(gpu, field_id)
        return self._nvlink_field(gpu, field_id, scope)

    @staticmethod
    def _retired_field(gpu: FakeGpu, field_id: int) -> tuple[int, int] | int:
        if gpu.retired_pages is None:
            return NVML_ERROR_NOT_SUPPORTED
        if field_id == pynvml.NVML_FI_DEV_RETIRED_PENDING:
            return (NVML_VALUE_TYPE_UNSIGNED_INT, int(gpu.retired_pages_pending == pynvml.NVML_FEATURE_ENABLED))
        cause = (NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS if field_id == pynvml.NVML_FI_DEV_RETIRED_SBE
                 else NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
        return (NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, len(gpu.retired_pages[cause]))

    @staticmethod
    def _nvlink_field(gpu: FakeGpu, field_id: int, link: int) -> tuple[int, int] | int:
        p = pynvml
        dl = {p.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY: (NVML_NVLINK_ERROR_DL_REPLAY,),
              p.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY: (NVML_NVLINK_ERROR_DL_RECOVERY,),
              p.NVML_FI_DEV_NVLINK_ERROR_DL_CRC: (NVML_NVLINK_ERROR_DL_CRC_FLIT, NVML_NVLINK_ERROR_DL_CRC_DATA)}
        if field_id not in (*dl, p.NVML_FI_DEV_NVLINK_GET_STATE, *NVLINK5_FIELDS):
            return NVML_ERROR_NOT_SUPPORTED
        if not gpu.nvlink_states:
            return NVML_ERROR_NOT_SUPPORTED
        if link not in gpu.nvlink_states:
            return NVML_ERROR_INVALID_ARGUMENT
        if field_id == p.NVML_FI_DEV_NVLINK_GET_STATE:
            return (NVML_VALUE_TYPE_UNSIGNED_INT, gpu.nvlink_states[link])
        if field_id in NVLINK5_FIELDS:
            if not gpu.nvlink5:
                return NVML_ERROR_NOT_SUPPORTED
            return (NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, gpu.nvlink5_errors.get((link, field_id), 0))
        if gpu.nvlink5:
            return NVML_ERROR_NOT_SUPPORTED  # "This is unsupported for Blackwell+"
        return (NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, sum(gpu.nvlink_errors.get((link, c), 0) for c in dl[field_id]))

    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:
        gpu = self._device("nvmlDeviceGetClockInfo", handle, type)
        clocks = {
            NVML_CLOCK_GRAPHICS: gpu.clock_sm_mhz,
            NVML_CLOCK_SM: gpu.clock_sm_mhz,
            NVML_CLOCK_MEM: gpu.clock_mem_mhz,
            NVML_CLOCK_VIDEO: gpu.clock_sm_mhz,
        }
        if type not in clocks:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return clocks[type]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetCurrentClocksEventReasons", handle).clocks_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clocks_event_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        gpu = self._device("nvmlDeviceGetTotalEccErrors", handle, errorType, counterType)
        if (errorType, counterType) not in gpu.ecc:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.ecc[(errorType, counterType)]

    def nvmlDeviceGetRemappedRows(self, device: Any) -> tuple[int, int, int, int]:
        gpu = self._device("nvmlDeviceGetRemappedRows", device)
        if gpu.remapped_rows is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return tuple(gpu.remapped_rows)  # type: ignore[return-value]

    def nvmlDeviceGetRetiredPages(self, device: Any, sourceFilter: int) -> list[int]:
        gpu = self._device("nvmlDeviceGetRetiredPages", device, sourceFilter)
        if gpu.retired_pages is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if sourceFilter not in gpu.retired_pages:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return list(gpu.retired_pages[sourceFilter])

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: Any) -> int:
        gpu = self._device("nvmlDeviceGetRetiredPagesPendingStatus", device)
        if gpu.retired_pages is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.retired_pages_pending

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        gpu = self._device("nvmlDeviceGetTemperatureThreshold", handle, threshold)
        if not 0 <= threshold < pynvml.NVML_TEMPERATURE_THRESHOLD_COUNT:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if threshold not in gpu.temp_thresholds:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.temp_thresholds[threshold]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        gpu = self._device("nvmlDeviceGetEnforcedPowerLimit", handle)
        if gpu.power_limit_mw is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        gpu = self._device("nvmlDeviceGetPowerManagementDefaultLimit", handle)
        if gpu.power_default_limit_mw is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_default_limit_mw

    def nvmlDeviceGetGpuFabricInfoV(self, device: Any, gpuFabricInfo: Any) -> int:
        gpu = self._device("nvmlDeviceGetGpuFabricInfoV", device)
        info = getattr(gpuFabricInfo, "_obj", None)  # pynvml passes the struct by reference
        if not isinstance(info, pynvml.c_nvmlGpuFabricInfo_v2_t | pynvml.c_nvmlGpuFabricInfo_v3_t):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if info.version not in _FABRIC_VERSIONS:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if gpu.fabric is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        state, status, clique, cluster, mask = gpu.fabric
        info.state, info.status, info.cliqueId, info.healthMask = state, status, clique, mask
        ctypes.memmove(info.clusterUuid, cluster, len(cluster))
        return NVML_SUCCESS

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        return self._device("nvmlDeviceGetSerial", handle).serial

    def nvmlDeviceGetVbiosVersion(self, handle: Any) -> str:
        return self._device("nvmlDeviceGetVbiosVersion", handle).vbios

    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetPersistenceMode", handle).persistence_mode

    def nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        gpu = self._device("nvmlDeviceGetEccMode", handle)
        return list(gpu.ecc_mode)

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay

    def _nvlink(self, name: str, device: Any, link: int, *args: int) -> FakeGpu:
        gpu = self._device(name, device, link, *args)
        if not gpu.nvlink_states:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if link not in gpu.nvlink_states or not 0 <= link < NVML_NVLINK_MAX_LINKS:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu

    def nvmlDeviceGetNvLinkState(self, device: Any, link: int) -> int:
        return self._nvlink("nvmlDeviceGetNvLinkState", device, link).nvlink_states[link]

    def nvmlDeviceGetNvLinkErrorCounter(self, device: Any, link: int, counter: int) -> int:
        gpu = self._nvlink("nvmlDeviceGetNvLinkErrorCounter", device, link, counter)
        if counter not in _NVLINK_COUNTERS or gpu.nvlink5:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED if gpu.nvlink5 else NVML_ERROR_INVALID_ARGUMENT)
        return gpu.nvlink_errors.get((link, counter), 0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        mig = self._mig_call("nvmlDeviceGetComputeRunningProcesses", handle)
        if mig is not None:
            if not self.privileged:
                raise NVMLError(NVML_ERROR_NO_PERMISSION)
            m = mig[1]
            return [nvmlStructToFriendlyObject(c_nvmlProcessInfo_v3_t(
                pid=pid, usedGpuMemory=0, gpuInstanceId=m.gpu_instance_id, computeInstanceId=m.compute_instance_id))
                for pid in m.process_pids]
        gpu = self._device("nvmlDeviceGetComputeRunningProcesses", handle)
        if not self.privileged:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        return [
            nvmlStructToFriendlyObject(
                c_nvmlProcessInfo_v3_t(
                    pid=pid, usedGpuMemory=0, gpuInstanceId=_NO_INSTANCE, computeInstanceId=_NO_INSTANCE
                )
            )
            for pid in gpu.process_pids
        ]

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        gpu = self._device("nvmlDeviceGetMinorNumber", handle)
        return self.gpus.index(gpu) if gpu.minor is None else gpu.minor

    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[Any]:
        """Per-process samples newer than `timeStamp` (NotFound when none; NotSupported under MIG)."""
        gpu = self._device("nvmlDeviceGetProcessUtilization", handle)
        if gpu.mig_enabled:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        with self._lock:
            newer = [(ts, pid, sm) for ts, pid, sm in self._drivers[self.gpus.index(gpu)].process_samples
                     if ts > timeStamp]
        if not newer:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return [pynvml.c_nvmlProcessUtilizationSample_t(pid=pid, timeStamp=ts, smUtil=sm, memUtil=0, encUtil=0,
                                                        decUtil=0) for ts, pid, sm in newer]

    # -- events ------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> Any:
        self._require_init("nvmlEventSetCreate")
        address = next(self._addresses)
        with self._events:
            self._event_sets[address] = _EventSet()
        return _pointer(c_nvmlEventSet_t, address)

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetSupportedEventTypes", handle).supported_events

    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        with self._events:
            es = self._event_set(eventSet)
            try:
                gpu = self._device("nvmlDeviceRegisterEvents", handle, eventTypes)
            except NVMLError as exc:
                if exc.value == NVML_ERROR_UNKNOWN:
                    es.undefined = True
                raise
            if eventTypes & ~gpu.supported_events:
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            address = _address(handle)
            es.registered[address] = es.registered.get(address, 0) | eventTypes

    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> Any:
        self._require_init("nvmlEventSetWait")
        with self._events:
            es = self._event_set(eventSet)
            es.waiting += 1
            es.waits_started += 1
            self._events.notify_all()
            try:
                self._events.wait_for(lambda: bool(es.queue) or es.freed or es.undefined or self._set_has_lost(es),
                                      timeoutms / 1000)
            finally:
                es.waiting -= 1
            if es.freed:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            if es.undefined:
                raise NVMLError(NVML_ERROR_UNKNOWN)
            if self._set_has_lost(es):
                raise NVMLError(NVML_ERROR_GPU_IS_LOST)
            if not es.queue:
                raise NVMLError(NVML_ERROR_TIMEOUT)
            address, event_type, event_data = es.queue.popleft()
            self._events.notify_all()
        data = c_nvmlEventData_t()
        data.device = _pointer(c_nvmlDevice_t, address)
        data.eventType = event_type
        data.eventData = event_data
        data.gpuInstanceId = _NO_INSTANCE
        data.computeInstanceId = _NO_INSTANCE
        return data

    def _set_has_lost(self, es: _EventSet) -> bool:
        return any(self.gpus[i].lost for a, i in self._registered_address.items() if a in es.registered)

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        self._require_init("nvmlEventSetFree")
        with self._events:
            self._event_set(eventSet).freed = True
            self._events.notify_all()

    # -- GPM ---------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, device: Any) -> Any:
        gpu = self._device("nvmlGpmQueryDeviceSupport", device)
        return c_nvmlGpmSupport_t(version=NVML_GPM_SUPPORT_VERSION, isSupportedDevice=int(gpu.gpm_supported))

    def nvmlGpmSampleAlloc(self) -> Any:
        self._require_init("nvmlGpmSampleAlloc")
        address = next(self._addresses)
        self._gpm_samples[address] = _GpmSample()
        return _pointer(c_nvmlGpmSample_t, address)

    def nvmlGpmSampleFree(self, gpmSample: Any) -> None:
        self._require_init("nvmlGpmSampleFree")
        self._gpm_sample(gpmSample).freed = True

    def nvmlGpmSampleGet(self, device: Any, gpmSample: Any) -> Any:
        gpu = self._device("nvmlGpmSampleGet", device)
        if not gpu.gpm_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        sample = self._gpm_sample(gpmSample)
        sample.device = _address(device)
        sample.seq = next(self._gpm_seq)
        sample.refresh = self.now_us // GPM_REFRESH_US
        sample.metrics = dict(gpu.gpm_metrics)
        sample.returns = dict(gpu.gpm_metric_returns)
        return gpmSample

    def nvmlGpmMetricsGet(self, metricsGet: Any) -> Any:
        first, second = self._gpm_sample(metricsGet.sample1), self._gpm_sample(metricsGet.sample2)
        index = self._by_address.get(second.device or 0)
        self._require_init("nvmlGpmMetricsGet", index)
        if metricsGet.version != NVML_GPM_METRICS_GET_VERSION:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if (
            index is None
            or first.device != second.device
            or not 0 < first.seq < second.seq
            or not 0 < metricsGet.numMetrics <= NVML_GPM_METRIC_MAX
        ):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._raise_injected(self.gpus[index], "nvmlGpmMetricsGet")
        stale = first.refresh == second.refresh  # within one internal refresh: the counters did not move
        for i in range(metricsGet.numMetrics):
            metric = metricsGet.metrics[i]
            metric_id = metric.metricId
            if metric_id in second.returns:
                metric.nvmlReturn = second.returns[metric_id]
            elif metric_id in second.metrics:
                metric.nvmlReturn, metric.value = NVML_SUCCESS, 0.0 if stale else second.metrics[metric_id]
            else:
                metric.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
        return metricsGet
