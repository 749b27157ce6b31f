"""NvmlCollector against the pynvml fake: field mapping and units, NotSupported caching, lost GPUs,
XID events, GPM ratios, init failure and shutdown; plus a guard that the fake matches the real pynvml."""

from __future__ import annotations

import ast
import inspect
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from gpufleet import wire
from gpufleet.agents.collectors import Collector
from gpufleet.agents.collectors import nvml as nvml_module
from gpufleet.agents.collectors.nvml import NvmlCollector, NvmlUnavailable
from tests.fakes.fake_pynvml import H100_MEMORY_BYTES, FakeGpu, FakeNvml

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
CORRECTED, UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
VOLATILE, AGGREGATE = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
SBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
DBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
CRC_FLIT, CRC_DATA = pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA
REPLAY, RECOVERY = pynvml.NVML_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY
SM_UTIL, TENSOR_UTIL, DRAM_UTIL = 2, 5, 10
UUID0 = "GPU-3f2a9c1e-5b7d-4e10-8a2b-000000000000"
UUID1 = "GPU-3f2a9c1e-5b7d-4e10-8a2b-000000000001"
NOW_MS = 1_760_000_000_000
THREAD_NAME = "nvml-xid-events"


@pytest.fixture
def make_collector() -> Iterator[Callable[[FakeNvml], NvmlCollector]]:
    """Build collectors on a fake with a short event wait; every one is closed after the test."""
    made: list[NvmlCollector] = []

    def make(fake: FakeNvml) -> NvmlCollector:
        collector = NvmlCollector(nvml=fake, event_wait_ms=20)
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.close()


def hopper(**overrides: object) -> FakeGpu:
    """An H100 SXM as NVML shows it: remapped rows yes, retired pages no, 18 NVLinks, GPM."""
    values: dict[str, object] = {
        "uuid": UUID0,
        "errors": {
            "nvmlDeviceGetRetiredPages": NOT_SUPPORTED,
            "nvmlDeviceGetRetiredPagesPendingStatus": NOT_SUPPORTED,
        },
        "nvlink_states": dict.fromkeys(range(18), 1),
        "gpm_supported": True,
    }
    values.update(overrides)
    return FakeGpu(**values)  # type: ignore[arg-type]


def ecc(
    corrected_volatile: int = 0,
    uncorrected_volatile: int = 0,
    corrected_aggregate: int = 0,
    uncorrected_aggregate: int = 0,
) -> dict[tuple[int, int], int]:
    """`FakeGpu.ecc` keyed as nvmlDeviceGetTotalEccErrors(handle, errorType, counterType) is asked."""
    return {
        (CORRECTED, VOLATILE): corrected_volatile,
        (UNCORRECTED, VOLATILE): uncorrected_volatile,
        (CORRECTED, AGGREGATE): corrected_aggregate,
        (UNCORRECTED, AGGREGATE): uncorrected_aggregate,
    }


def volta(**overrides: object) -> FakeGpu:
    """A V100 PCIe: retired pages yes, remapped rows, GPM, NVLink and memory temperature no."""
    values: dict[str, object] = {
        "uuid": UUID1,
        "name": "Tesla V100-PCIE-32GB",
        "mem_total": 34_359_738_368,
        "temp_mem_c": None,
        "errors": {"nvmlDeviceGetRemappedRows": NOT_SUPPORTED},
    }
    values.update(overrides)
    return FakeGpu(**values)  # type: ignore[arg-type]


# -- field mapping and units -----------------------------------------------------------------


def test_every_field_is_mapped_in_its_base_unit(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    gpu = hopper(
        util_gpu_pct=87,
        util_mem_pct=42,
        mem_reserved=536_870_912,
        mem_used=42_949_672_960,
        power_mw=612_345,
        energy_mj=9_876_543_210,
        temp_gpu_c=67,
        temp_mem_c=74,
        clock_sm_mhz=1980,
        clock_mem_mhz=2619,
        clocks_event_reasons=0x04 | 0x40,
        ecc=ecc(corrected_volatile=5, uncorrected_volatile=1, corrected_aggregate=123, uncorrected_aggregate=2),
        remapped_rows=(3, 1, 1, 0),
        pcie_replay=17,
        nvlink_states={**dict.fromkeys(range(18), 1), 4: 0, 9: 0},
        nvlink_errors={
            (0, CRC_FLIT): 3,
            (0, CRC_DATA): 4,
            (5, CRC_FLIT): 10,
            (1, REPLAY): 6,
            (17, REPLAY): 1,
            (2, RECOVERY): 2,
        },
        process_pids=[1234, 5678],
        gpm_metrics={SM_UTIL: 45.5, TENSOR_UTIL: 30.25, DRAM_UTIL: 12.5},
    )
    collector = make_collector(FakeNvml([gpu]))
    expected = wire.GpuSample(
        index=0,
        uuid=UUID0,
        model="NVIDIA H100 80GB HBM3",
        util_gpu_ratio=0.87,
        util_mem_ratio=0.42,
        mem_used_bytes=42_949_672_960,  # the v2 call: excludes the 512 MiB reserved
        mem_total_bytes=85_520_809_984,  # 81559 MiB
        power_w=612.345,
        energy_j=9_876_543.21,
        temp_gpu_c=67.0,
        temp_mem_c=74.0,
        clock_sm_mhz=1980,
        clock_mem_mhz=2619,
        clock_event_reasons=68,
        ecc_corrected_volatile=5,
        ecc_uncorrected_volatile=1,
        ecc_corrected_aggregate=123,
        ecc_uncorrected_aggregate=2,
        remapped_rows_correctable=3,
        remapped_rows_uncorrectable=1,
        remap_pending=True,
        remap_failure=False,
        retired_pages=None,
        retired_pages_pending=None,
        pcie_replay_count=17,
        nvlink_crc_errors=17,  # 3 + 4 on link 0, 10 on link 5
        nvlink_replay_errors=7,  # 6 on link 1, 1 on link 17
        nvlink_recovery_errors=2,
        nvlink_links_down=2,  # links 4 and 9
        compute_processes=2,
    )

    first = collector.collect(NOW_MS)
    assert first == [expected]  # no previous GPM sample yet: GPM ratios are null
    assert collector.errors_last_interval == 0

    second = collector.collect(NOW_MS + 10_000)
    expected.sm_active_ratio, expected.tensor_active_ratio, expected.dram_active_ratio = 0.455, 0.3025, 0.125
    assert second == [expected]
    assert collector.errors_last_interval == 0


def test_pre_ampere_gpu_reports_retired_pages_and_nulls_what_it_lacks(
    make_collector: Callable[[FakeNvml], NvmlCollector],
) -> None:
    gpu = volta(
        retired_pages={SBE: [0x1000, 0x2000], DBE: [0x3000]},
        retired_pages_pending=pynvml.NVML_FEATURE_ENABLED,
        power_mw=250_000,
        energy_mj=1_000,
    )
    collector = make_collector(FakeNvml([gpu]))
    collector.collect(NOW_MS)
    (sample,) = collector.collect(NOW_MS + 10_000)
    assert sample == wire.GpuSample(
        index=0,
        uuid=UUID1,
        model="Tesla V100-PCIE-32GB",
        util_gpu_ratio=0.0,
        util_mem_ratio=0.0,
        mem_used_bytes=0,
        mem_total_bytes=34_359_738_368,
        power_w=250.0,
        energy_j=1.0,
        temp_gpu_c=30.0,
        clock_sm_mhz=1980,
        clock_mem_mhz=2619,
        clock_event_reasons=0,
        ecc_corrected_volatile=0,
        ecc_uncorrected_volatile=0,
        ecc_corrected_aggregate=0,
        ecc_uncorrected_aggregate=0,
        retired_pages=3,
        retired_pages_pending=True,
        pcie_replay_count=0,
        compute_processes=0,
    )
    assert sample.temp_mem_c is None
    assert sample.remapped_rows_correctable is None
    assert sample.nvlink_links_down is None
    assert sample.sm_active_ratio is None
    assert collector.errors_last_interval == 0


def test_values_change_between_intervals(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    fake = FakeNvml([hopper(power_mw=300_000, energy_mj=5_000_000, util_gpu_pct=10)])
    collector = make_collector(fake)
    (first,) = collector.collect(NOW_MS)
    fake.gpus[0].power_mw, fake.gpus[0].energy_mj, fake.gpus[0].util_gpu_pct = 700_500, 12_000_250, 99
    (second,) = collector.collect(NOW_MS + 10_000)
    assert (first.power_w, first.energy_j, first.util_gpu_ratio) == (300.0, 5000.0, 0.1)
    assert (second.power_w, second.energy_j, second.util_gpu_ratio) == (700.5, 12000.25, 0.99)


def test_samples_pass_wire_validation(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    fake = FakeNvml([hopper(gpm_metrics={SM_UTIL: 50.0}), volta()])
    collector = make_collector(fake)
    collector.collect(NOW_MS)
    gpus = collector.collect(NOW_MS + 10_000)
    report = wire.NodeReport(
        schema_version=wire.SCHEMA_VERSION, cluster="c", node="n", boot_id="b", seq=1,
        time_ms=NOW_MS, interval_ms=10_000, gpus=gpus,
    )  # fmt: skip
    assert wire.decode(wire.encode(report)).gpus == gpus


# -- the funnel: NotSupported, errors, fallbacks -----------------------------------------------


def test_not_supported_is_null_and_asked_only_once(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    gpu = hopper(errors={"nvmlDeviceGetPowerUsage": NOT_SUPPORTED}, temp_mem_c=None, nvlink_states={})
    fake = FakeNvml([gpu])
    collector = make_collector(fake)
    samples = [collector.collect(NOW_MS)[0], collector.collect(NOW_MS + 10_000)[0]]
    for sample in samples:
        assert sample.power_w is None
        assert sample.temp_mem_c is None
        assert (sample.nvlink_crc_errors, sample.nvlink_links_down) == (None, None)
        assert sample.energy_j == 0.0  # a supported counter is still read
    assert fake.calls_to("nvmlDeviceGetPowerUsage", 0) == 1
    assert fake.calls_to("nvmlDeviceGetFieldValues", 0) == 1
    assert fake.calls_to("nvmlDeviceGetNvLinkState", 0) == pynvml.NVML_NVLINK_MAX_LINKS  # each link probed once
    assert fake.calls_to("nvmlDeviceGetTotalEnergyConsumption", 0) == 2
    assert collector.errors_last_interval == 0


def test_other_errors_are_null_counted_and_retried(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    gpu = hopper(
        temp_gpu_c=55,
        ecc=ecc(corrected_volatile=9),
        errors={
            "nvmlDeviceGetTemperatureV": UNKNOWN,
            ("nvmlDeviceGetTotalEccErrors", CORRECTED, VOLATILE): pynvml.NVML_ERROR_TIMEOUT,
        },
    )
    fake = FakeNvml([gpu])
    collector = make_collector(fake)
    (sample,) = collector.collect(NOW_MS)
    assert (sample.temp_gpu_c, sample.ecc_corrected_volatile, sample.ecc_uncorrected_volatile) == (None, None, 0)
    assert sample.error is None
    assert collector.errors_last_interval == 2
    assert fake.calls_to("nvmlDeviceGetTemperature", 0) == 0  # a failure is not "unsupported": no fallback

    fake.gpus[0].errors = {}
    (sample,) = collector.collect(NOW_MS + 10_000)
    assert (sample.temp_gpu_c, sample.ecc_corrected_volatile) == (55.0, 9)
    assert collector.errors_last_interval == 0
    assert fake.calls_to("nvmlDeviceGetTemperatureV", 0) == 2


def test_nvlink_sums_are_null_when_a_link_read_fails(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    gpu = hopper(
        nvlink_states=dict.fromkeys(range(4), 1),
        nvlink_errors={(0, REPLAY): 2, (3, RECOVERY): 5},
        errors={("nvmlDeviceGetNvLinkErrorCounter", 2, CRC_DATA): UNKNOWN, ("nvmlDeviceGetNvLinkState", 1): UNKNOWN},
    )
    collector = make_collector(FakeNvml([gpu]))
    (sample,) = collector.collect(NOW_MS)
    assert sample.nvlink_crc_errors is None
    assert (sample.nvlink_replay_errors, sample.nvlink_recovery_errors) == (2, 5)
    assert sample.nvlink_links_down is None
    assert collector.errors_last_interval == 2


def test_older_driver_falls_back_to_older_calls(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    gpu = hopper(
        temp_gpu_c=61,
        clocks_event_reasons=0x08,
        mem_used=1_000_000_000,
        mem_reserved=500_000_000,
        errors={
            "nvmlDeviceGetTemperatureV": FUNCTION_NOT_FOUND,
            "nvmlDeviceGetCurrentClocksEventReasons": FUNCTION_NOT_FOUND,
            ("nvmlDeviceGetMemoryInfo", pynvml.nvmlMemory_v2): FUNCTION_NOT_FOUND,
        },
    )
    fake = FakeNvml([gpu])
    collector = make_collector(fake)
    for now in (NOW_MS, NOW_MS + 10_000):
        (sample,) = collector.collect(now)
        assert (sample.temp_gpu_c, sample.clock_event_reasons) == (61.0, 8)
        assert (sample.mem_used_bytes, sample.mem_total_bytes) == (1_500_000_000, H100_MEMORY_BYTES)  # v1: + reserved
    assert fake.calls_to("nvmlDeviceGetTemperatureV", 0) == 1
    assert fake.calls_to("nvmlDeviceGetTemperature", 0) == 2
    assert fake.calls_to("nvmlDeviceGetCurrentClocksThrottleReasons", 0) == 2
    assert collector.errors_last_interval == 0


def test_binding_without_a_function_falls_back(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    class OldBinding(FakeNvml):
        nvmlDeviceGetTemperatureV = None  # an nvidia-ml-py release that predates the call

    collector = make_collector(OldBinding([hopper(temp_gpu_c=48)]))
    assert collector.collect(NOW_MS)[0].temp_gpu_c == 48.0


# -- failures stay local ---------------------------------------------------------------------


def test_lost_gpu_is_reported_with_error_and_others_are_fine(
    make_collector: Callable[[FakeNvml], NvmlCollector],
) -> None:
    fake = FakeNvml([hopper(power_mw=400_000), volta(power_mw=200_000)])
    collector = make_collector(fake)
    assert [s.error for s in collector.collect(NOW_MS)] == [None, None]

    fake.gpus[0].lost = True
    fake.inject_xid(0, 79)
    assert fake.wait_for_event_consumer()
    lost, fine = collector.collect(NOW_MS + 10_000)
    assert lost == wire.GpuSample(
        index=0,
        uuid=UUID0,
        model="NVIDIA H100 80GB HBM3",
        error="GPU is lost (nvmlDeviceGetUtilizationRates)",
        xids=[79],
    )
    assert (fine.error, fine.power_w, fine.uuid) == (None, 200.0, UUID1)
    assert collector.errors_last_interval == 1

    fake.gpus[0].lost = False  # back after a reset: GPM restarts from a fresh sample
    (back, _) = collector.collect(NOW_MS + 20_000)
    assert (back.error, back.power_w, back.sm_active_ratio) == (None, 400.0, None)


def test_gpu_lost_from_the_start_is_reported_then_attached(
    make_collector: Callable[[FakeNvml], NvmlCollector],
) -> None:
    fake = FakeNvml([hopper(lost=True), volta(power_mw=123_000)])
    collector = make_collector(fake)
    lost, fine = collector.collect(NOW_MS)
    assert lost == wire.GpuSample(index=0, uuid="unknown-gpu-0", error="GPU is lost (nvmlDeviceGetHandleByIndex)")
    assert (fine.uuid, fine.power_w) == (UUID1, 123.0)

    fake.gpus[0].lost = False
    (found, _) = collector.collect(NOW_MS + 10_000)
    assert (found.uuid, found.model, found.error) == (UUID0, "NVIDIA H100 80GB HBM3", None)


def test_gpu_failing_every_read_is_in_error(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    reads = [
        "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetRemappedRows", "nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetNvLinkState",
        "nvmlDeviceGetComputeRunningProcesses", "nvmlGpmQueryDeviceSupport", "nvmlDeviceGetRetiredPages",
        "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlDeviceGetNvLinkErrorCounter",
    ]  # fmt: skip
    fake = FakeNvml([hopper(errors=dict.fromkeys(reads, UNKNOWN)), volta()])
    collector = make_collector(fake)
    broken, fine = collector.collect(NOW_MS)
    assert broken.error is not None
    assert broken.error.startswith("nvmlDeviceGetUtilizationRates: Unknown Error (and ")
    assert (broken.uuid, broken.power_w, broken.util_gpu_ratio, broken.mem_used_bytes) == (UUID0, None, None, None)
    assert fine.error is None


def test_unexpected_failure_in_one_gpu_does_not_stop_the_others(
    make_collector: Callable[[FakeNvml], NvmlCollector],
) -> None:
    class GarbledBinding(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
            value = super().nvmlDeviceGetPowerUsage(handle)
            return "garbage" if value == 1 else value  # type: ignore[return-value]

    fake = GarbledBinding([hopper(power_mw=1), volta(power_mw=2_000)])
    broken, fine = make_collector(fake).collect(NOW_MS)
    assert broken.error is not None
    assert broken.error.startswith("collector failure: TypeError(")
    assert (fine.error, fine.power_w) == (None, 2.0)


# -- XID events ------------------------------------------------------------------------------


def test_xids_are_delivered_once_each(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake)
    collector.open()
    fake.inject_xid(0, 43)
    fake.inject_xid(1, 79)
    fake.inject_xid(0, 13)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in collector.collect(NOW_MS)] == [[43, 13], [79]]
    assert [s.xids for s in collector.collect(NOW_MS + 10_000)] == [[], []]

    fake.inject_xid(1, 48)
    fake.inject_xid(1, 70_000)  # beyond the wire's XID range: dropped, not a poisoned message
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in collector.collect(NOW_MS + 20_000)] == [[], [48]]


def test_xids_only_where_events_are_supported(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    no_xid_events = pynvml.nvmlEventTypePState | pynvml.nvmlEventTypeClock
    fake = FakeNvml([hopper(), volta(supported_events=no_xid_events)])
    collector = make_collector(fake)
    collector.open()
    assert fake.calls_to("nvmlDeviceRegisterEvents", 0) == 1
    assert fake.calls_to("nvmlDeviceRegisterEvents", 1) == 0
    fake.inject_xid(0, 31)
    fake.inject_xid(1, 31)  # nobody registered: NVML drops it
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in collector.collect(NOW_MS)] == [[31], []]


def test_no_event_support_means_no_thread_and_no_xids(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    before = _event_threads()
    fake = FakeNvml([hopper(supported_events=0)])
    collector = make_collector(fake)
    fake.inject_xid(0, 79)
    (sample,) = collector.collect(NOW_MS)
    assert sample.xids == []
    assert _event_threads() == before
    assert fake.calls_to("nvmlDeviceRegisterEvents", 0) == 0


# -- GPM -------------------------------------------------------------------------------------


def test_gpm_ratios_from_the_second_interval(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    fake = FakeNvml([hopper(gpm_metrics={SM_UTIL: 80.0, TENSOR_UTIL: 64.0, DRAM_UTIL: 25.0}), volta()])
    collector = make_collector(fake)

    def ratios() -> list[tuple[float | None, ...]]:
        return [(s.sm_active_ratio, s.tensor_active_ratio, s.dram_active_ratio) for s in collector.collect(NOW_MS)]

    assert ratios() == [(None, None, None), (None, None, None)]
    assert ratios() == [(0.8, 0.64, 0.25), (None, None, None)]
    fake.gpus[0].gpm_metrics = {SM_UTIL: 100.4, TENSOR_UTIL: -0.5, DRAM_UTIL: 50.0}  # sampling overshoot
    fake.gpus[0].gpm_metric_returns = {DRAM_UTIL: UNKNOWN}
    assert ratios() == [(1.0, 0.0, None), (None, None, None)]
    assert collector.errors_last_interval == 1
    assert fake.calls_to("nvmlGpmSampleGet", 1) == 0  # the V100 answered "not a GPM device" once
    assert fake.calls_to("nvmlGpmQueryDeviceSupport", 1) == 1
    assert fake.live_gpm_samples == 2  # two per GPM GPU, reused


# -- lifecycle -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED]
)  # fmt: skip
def test_init_failure_says_no_driver_and_suggests_simulated(code: int) -> None:
    fake = FakeNvml([hopper()], init_error=code)
    collector = NvmlCollector(nvml=fake)
    with pytest.raises(NvmlUnavailable, match="no NVIDIA driver was found") as info:
        collector.collect(NOW_MS)
    assert "--backend simulated" in str(info.value)
    collector.close()
    assert fake.shutdown_count == 0


def test_init_refused_names_the_permission_problem() -> None:
    collector = NvmlCollector(nvml=FakeNvml(init_error=pynvml.NVML_ERROR_NO_PERMISSION))
    with pytest.raises(NvmlUnavailable, match=r"Insufficient Permissions.*--backend simulated"):
        collector.open()


def test_real_pynvml_without_a_driver_raises_nvml_unavailable() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(NvmlUnavailable, match="--backend simulated"):
        NvmlCollector().open()


def test_close_stops_the_thread_frees_everything_and_is_idempotent() -> None:
    before = _event_threads()
    fake = FakeNvml([hopper(), volta()])
    collector = NvmlCollector(nvml=fake, event_wait_ms=20)
    assert isinstance(collector, Collector)
    collector.collect(NOW_MS)
    assert (_event_threads(), fake.live_event_sets, fake.live_gpm_samples) == (before + 1, 1, 2)
    collector.close()
    assert (_event_threads(), fake.live_event_sets, fake.live_gpm_samples) == (before, 0, 0)
    assert (fake.initialized, fake.shutdown_count) == (False, 1)
    collector.close()
    assert fake.shutdown_count == 1
    with pytest.raises(RuntimeError, match="closed"):
        collector.collect(NOW_MS)


def test_context_manager_opens_once_and_closes() -> None:
    fake = FakeNvml([hopper()])
    with NvmlCollector(nvml=fake, event_wait_ms=20) as collector:
        collector.collect(NOW_MS)
        collector.collect(NOW_MS + 10_000)
    assert (fake.init_count, fake.shutdown_count, fake.initialized) == (1, 1, False)


def _event_threads() -> int:
    return sum(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


# -- the fake must not drift from the real pynvml -------------------------------------------------


def _nvml_names_used_by_collector() -> set[str]:
    """Every pynvml name the collector uses: `nvml.X` / `self._nvml.X` attributes and function-name strings."""
    tree = ast.parse(Path(nvml_module.__file__).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "nvml") or (
                isinstance(owner, ast.Attribute) and owner.attr == "_nvml"
            ):
                names.add(node.attr)
        elif isinstance(node, ast.Constant) and str(node.value).startswith("nvml") and str(node.value).isidentifier():
            names.add(str(node.value))
    return names


def test_the_collector_reads_the_names_this_guard_checks() -> None:
    names = _nvml_names_used_by_collector()
    assert {"nvmlDeviceGetPowerUsage", "nvmlEventSetWait", "nvmlGpmMetricsGet", "NVMLError_NotSupported"} <= names
    assert len(names) > 50


def test_every_name_the_collector_uses_exists_in_real_pynvml_and_the_fake_alike() -> None:
    for name in sorted(_nvml_names_used_by_collector()):
        assert hasattr(pynvml, name), f"the collector uses {name}, which pynvml does not have"
        assert hasattr(FakeNvml, name), f"the fake lacks {name}"
        real, fake = getattr(pynvml, name), getattr(FakeNvml, name)
        if inspect.isfunction(real):
            real_params = [(p.name, p.kind, p.default) for p in inspect.signature(real).parameters.values()]
            fake_params = [
                (p.name, p.kind, p.default) for p in inspect.signature(getattr(FakeNvml(), name)).parameters.values()
            ]
            assert fake_params == real_params, f"{name}: fake {fake_params} != real {real_params}"
        elif isinstance(real, type):
            assert fake is real, f"the fake must re-export pynvml's own {name}"
        else:
            assert fake == real, f"{name}: fake {fake!r} != real {real!r}"


def test_gpu_uuids_in_index_order_after_open(make_collector: Callable[[FakeNvml], NvmlCollector]) -> None:
    collector = make_collector(FakeNvml([hopper(), volta()]))
    assert collector.gpu_uuids == []
    collector.open()
    assert collector.gpu_uuids == [UUID0, UUID1]
