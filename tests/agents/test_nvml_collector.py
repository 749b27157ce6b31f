"""NvmlCollector against the pynvml fake: field mapping and units, interval averages and counter deltas,
NotSupported caching, batching and the call budget, XID events, GPM and its 100 ms guard, init failure
and shutdown; plus a guard that the fake matches the real pynvml. Failure paths: test_nvml_failures.py."""

from __future__ import annotations

import ast
import inspect
import threading
from pathlib import Path

import msgspec
import pynvml
import pytest

from gpufleet import wire
from gpufleet.agents.collectors import Collector
from gpufleet.agents.collectors.nvml import NvmlCollector, NvmlUnavailable
from tests.agents.nvml_helpers import (
    DRAM_UTIL,
    NOT_SUPPORTED,
    SM_UTIL,
    TENSOR_UTIL,
    UNKNOWN,
    UUID0,
    UUID1,
    UUID2,
    Make,
    events_settled,
    hopper,
    tick,
    volta,
)
from tests.fakes.fake_pynvml import H100_MEMORY_BYTES, FakeNvml, b200

FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
CORRECTED, UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
VOLATILE, AGGREGATE = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
SBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
DBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
CRC_FLIT, CRC_DATA = pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA
REPLAY, RECOVERY = pynvml.NVML_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY
FI_POWER = pynvml.NVML_FI_DEV_POWER_AVERAGE
FI_SBE_VOL = pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL
FI_DL_CRC, FI_LINK_STATE = pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC, pynvml.NVML_FI_DEV_NVLINK_GET_STATE
FI_SYMBOL = pynvml.NVML_FI_DEV_NVLINK_COUNT_SYMBOL_ERRORS
FI_EFFECTIVE = pynvml.NVML_FI_DEV_NVLINK_COUNT_EFFECTIVE_ERRORS
FI_LINK_RECOVERY = pynvml.NVML_FI_DEV_NVLINK_COUNT_LINK_RECOVERY_EVENTS
THREAD_NAME = "nvml-xid-events"
COLLECTOR_MODULES = ("nvml.py", "nvml_device.py", "nvml_fields.py", "nvml_funnel.py", "nvml_inventory.py",
                     "xid_events.py")


def ecc(cv: int = 0, uv: int = 0, ca: int = 0, ua: int = 0) -> dict[tuple[int, int], int]:
    """`FakeGpu.ecc` keyed as NVML keys its ECC totals."""
    return {(CORRECTED, VOLATILE): cv, (UNCORRECTED, VOLATILE): uv, (CORRECTED, AGGREGATE): ca,
            (UNCORRECTED, AGGREGATE): ua}


# -- field mapping and units -----------------------------------------------------------------


def test_every_field_is_mapped_in_its_base_unit(make_collector: Make) -> None:
    gpu = hopper(
        util_gpu_pct=87, util_mem_pct=42, mem_reserved=536_870_912, mem_used=42_949_672_960,
        power_mw=612_345, energy_mj=9_876_543_210, temp_gpu_c=67, temp_mem_c=74, clock_sm_mhz=1980,
        clock_mem_mhz=2619, clocks_event_reasons=0x04 | 0x40,
        ecc=ecc(cv=5, uv=1, ca=123, ua=2), remapped_rows=(3, 1, 1, 0), pcie_replay=17,
        nvlink_states={**dict.fromkeys(range(18), 1), 4: 0, 9: 0},
        nvlink_errors={(0, CRC_FLIT): 3, (0, CRC_DATA): 4, (5, CRC_FLIT): 10, (1, REPLAY): 6, (17, REPLAY): 1,
                       (2, RECOVERY): 2},
        process_pids=[1234, 5678], gpm_metrics={SM_UTIL: 45.5, TENSOR_UTIL: 30.25, DRAM_UTIL: 12.5},
        recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P, power_limit_mw=650_000,
        power_default_limit_mw=700_000, serial="1321021034567", vbios="96.00.74.00.0C",
        persistence_mode=pynvml.NVML_FEATURE_DISABLED,
        ecc_mode=(pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_DISABLED),  # ECC on; off after the next reset
        fabric=(pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, 0, 4, bytes(range(16)), 0b0001_1010_1001),
    )  # fmt: skip
    fake = FakeNvml([gpu])
    fake.driver_version = "570.172.08"
    collector = make_collector(fake)
    expected = wire.GpuSample(
        index=0, uuid=UUID0, model="NVIDIA H100 80GB HBM3",
        util_gpu_ratio=0.87, util_mem_ratio=0.42,
        mem_used_bytes=42_949_672_960,  # the v2 call: excludes the 512 MiB reserved
        mem_total_bytes=85_520_809_984,  # 81559 MiB
        power_w=612.345, energy_j=9_876_543.21, temp_gpu_c=67.0, temp_mem_c=74.0,
        clock_sm_mhz=1980, clock_mem_mhz=2619, clock_event_reasons=68,
        ecc_corrected_volatile=5, ecc_uncorrected_volatile=1, ecc_corrected_aggregate=123, ecc_uncorrected_aggregate=2,
        remapped_rows_correctable=3, remapped_rows_uncorrectable=1, remap_pending=True, remap_failure=False,
        pcie_replay_count=17,
        nvlink_crc_errors=17,  # 3 + 4 on link 0, 10 on link 5
        nvlink_replay_errors=7,  # 6 on link 1, 1 on link 17
        nvlink_recovery_errors=2,
        nvlink_links_down=2,  # links 4 and 9
        compute_processes=2,
        recovery_action=3,
        temp_shutdown_c=92.0, temp_slowdown_c=89.0, temp_mem_max_c=95.0,  # the H100's thresholds
        power_limit_w=650.0, power_limit_default_w=700.0,
        fabric_state=3, fabric_status=0, fabric_clique_id=4,
        fabric_cluster_uuid="00010203-0405-0607-0809-0a0b0c0d0e0f", fabric_health_mask=0b0001_1010_1001,
    )  # fmt: skip
    inventory = {"serial": "1321021034567", "vbios_version": "96.00.74.00.0C", "driver_version": "570.172.08",
                 "persistence_mode": False, "ecc_mode": True}
    collector.open()
    # first reading: no deltas, no GPM pair yet; the inventory, read at attach
    assert collector.collect(0) == [msgspec.structs.replace(expected, **inventory)]
    assert collector.errors_last_interval == 0

    (second,) = tick(fake, collector, 10.0)
    assert second == msgspec.structs.replace(
        expected,
        energy_j=9_882_666.66,  # + 612,345 mW x 10 s = 6,123,450 mJ
        energy_interval_j=6_123.45,
        throttle_power_ratio=1.0,  # the SW power cap bit was set for the whole 10 s
        throttle_thermal_ratio=1.0,  # so was HW thermal slowdown
        sm_active_ratio=0.455, tensor_active_ratio=0.3025, dram_active_ratio=0.125,
    )
    assert collector.errors_last_interval == 0


def test_pre_ampere_gpu_reports_retired_pages_and_nulls_what_it_lacks(make_collector: Make) -> None:
    gpu = volta(retired_pages={SBE: [0x1000, 0x2000], DBE: [0x3000]}, retired_pages_pending=pynvml.NVML_FEATURE_ENABLED,
                power_mw=250_000, energy_mj=1_000)
    fake = FakeNvml([gpu])
    collector = make_collector(fake)
    collector.open()
    assert collector.collect(0)[0].energy_interval_j is None  # the first reading is the baseline
    (sample,) = tick(fake, collector, 10.0)
    assert sample == wire.GpuSample(
        index=0, uuid=UUID1, model="Tesla V100-PCIE-32GB", util_gpu_ratio=0.0, util_mem_ratio=0.0,
        mem_used_bytes=0, mem_total_bytes=34_359_738_368, power_w=250.0, energy_j=2_501.0, energy_interval_j=2_500.0,
        temp_gpu_c=30.0, clock_sm_mhz=1980, clock_mem_mhz=2619, clock_event_reasons=0,
        ecc_corrected_volatile=0, ecc_uncorrected_volatile=0, ecc_corrected_aggregate=0, ecc_uncorrected_aggregate=0,
        retired_pages=3, retired_pages_pending=True, pcie_replay_count=0, compute_processes=0,
        temp_shutdown_c=90.0, temp_slowdown_c=87.0,  # no memory maximum, no recovery action, no fabric
        power_limit_w=250.0, power_limit_default_w=250.0,
    )  # fmt: skip
    assert collector.errors_last_interval == 0


def test_blackwell_reads_the_nvlink5_counters_and_stops_asking_the_dl_ones(make_collector: Make) -> None:
    gpu = b200(UUID2, nvlink5_errors={(0, FI_SYMBOL): 7, (3, FI_SYMBOL): 5, (1, FI_EFFECTIVE): 2,
                                      (17, FI_LINK_RECOVERY): 4})
    fake = FakeNvml([gpu])
    collector = make_collector(fake, slow_every_s=10.0)
    collector.open()
    first = collector.collect(0)[0]
    assert (first.nvlink_symbol_errors, first.nvlink_effective_errors, first.nvlink_recovery_errors) == (12, 2, 4)
    assert (first.nvlink_crc_errors, first.nvlink_replay_errors, first.nvlink_links_down) == (None, None, 0)
    fake.gpus[0].nvlink5_errors[(3, FI_SYMBOL)] = 9
    for _ in range(10):
        tick(fake, collector)
    (sample,) = collector.collect(0)
    assert sample.nvlink_symbol_errors == 16
    # the DL counters answered NotSupported once ("unsupported for Blackwell+") and were never asked again
    assert fake.field_requests[(0, FI_DL_CRC, 0)] == 1
    assert fake.field_requests[(0, FI_SYMBOL, 0)] == 2  # two slow reads in 10 s


# -- interval averages and counter deltas ------------------------------------------------------


def test_utilization_is_the_mean_of_the_driver_samples_over_the_interval(make_collector: Make) -> None:
    fake = FakeNvml([hopper(util_sample_period_us=100_000, util_gpu_pct=0, util_mem_pct=0)])
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    fake.gpus[0].util_gpu_pct, fake.gpus[0].util_mem_pct = 100, 40
    fake.advance(0.5)  # a burst: 5 samples at 100 %
    fake.gpus[0].util_gpu_pct, fake.gpus[0].util_mem_pct = 0, 0
    fake.advance(0.5)  # then idle: 5 samples at 0 %, the last one at the moment of the read
    (sample,) = collector.collect(0)
    assert (sample.util_gpu_ratio, sample.util_mem_ratio) == (0.5, 0.2)  # a point reading would say 0 and 0


def test_an_interval_without_a_new_sample_keeps_the_latest_average(make_collector: Make) -> None:
    fake = FakeNvml([volta(util_gpu_pct=60)])  # the V100 samples once a second
    collector = make_collector(fake)
    collector.open()
    assert tick(fake, collector, 1.0)[0].util_gpu_ratio == 0.6
    fake.gpus[0].util_gpu_pct = 10
    assert tick(fake, collector, 0.5)[0].util_gpu_ratio == 0.6  # no sample since: the last one still holds
    assert tick(fake, collector, 0.5)[0].util_gpu_ratio == 0.1
    assert collector.errors_last_interval == 0


def test_energy_per_interval_is_the_counter_delta(make_collector: Make) -> None:
    fake = FakeNvml([hopper(power_mw=300_000, energy_mj=1_000_000)])
    collector = make_collector(fake)
    collector.open()
    assert collector.collect(0)[0].energy_interval_j is None  # no earlier reading
    fake.gpus[0].power_mw = 700_500
    fake.advance(0.25)  # 175.125 J
    fake.gpus[0].power_mw = 100_000
    fake.advance(0.75)  # 75 J
    (sample,) = collector.collect(0)
    assert sample.energy_interval_j == 250.125  # the power reading says 100 W: x 1 s would bill 100 J
    assert sample.power_w == 100.0
    fake.gpus[0].energy_mj = 40_000  # the counter restarted (driver reload): 40 J since then
    assert tick(fake, collector, 1.0)[0].energy_interval_j == 140.0  # + 100 J in the second that passed


def test_throttle_share_comes_from_the_cumulative_counters(make_collector: Make) -> None:
    fake = FakeNvml([hopper()])
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    fake.gpus[0].clocks_event_reasons = 0x04  # SW power cap
    fake.advance(0.25)
    fake.gpus[0].clocks_event_reasons = 0x20  # SW thermal
    fake.advance(0.5)
    fake.gpus[0].clocks_event_reasons = 0
    fake.advance(0.25)
    (sample,) = collector.collect(0)
    assert (sample.throttle_power_ratio, sample.throttle_thermal_ratio) == (0.25, 0.5)
    assert sample.clock_event_reasons == 0  # the snapshot bitmask saw none of it


def test_values_change_between_intervals(make_collector: Make) -> None:
    fake = FakeNvml([hopper(power_mw=300_000, energy_mj=5_000_000, util_gpu_pct=10)])
    collector = make_collector(fake)
    collector.open()
    (first,) = collector.collect(0)
    fake.gpus[0].power_mw, fake.gpus[0].util_gpu_pct = 700_500, 99
    (second,) = tick(fake, collector, 10.0)
    assert (first.power_w, first.energy_j, first.util_gpu_ratio) == (300.0, 5000.0, 0.1)
    assert (second.power_w, second.energy_j, second.util_gpu_ratio) == (700.5, 12005.0, 0.99)


def test_samples_pass_wire_validation(make_collector: Make) -> None:
    fake = FakeNvml([hopper(gpm_metrics={SM_UTIL: 50.0}), volta(), b200(UUID2, pci=(0, 0x90, 0))])
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    gpus = tick(fake, collector, 10.0)
    report = wire.NodeReport(
        schema_version=wire.SCHEMA_VERSION, cluster="c", node="n", boot_id="b", seq=1,
        time_ms=1_760_000_000_000, interval_ms=10_000, gpus=gpus,
    )  # fmt: skip
    assert wire.decode(wire.encode(report)).gpus == gpus


# -- fewer calls: field batches, slow counters, the budget -------------------------------------


def test_a_hopper_costs_twelve_calls_per_interval_and_error_counters_every_ten_seconds(make_collector: Make) -> None:
    fake = FakeNvml([hopper(gpm_metrics={SM_UTIL: 50.0})])
    collector = make_collector(fake, slow_every_s=10.0)
    collector.open()
    collector.collect(0)
    tick(fake, collector)  # first GPM pair
    before = fake.calls_for_gpu(0)
    for _ in range(10):
        tick(fake, collector)
    per_interval = (fake.calls_for_gpu(0) - before) / 10
    # MIG mode, fast fields, 2 x samples, memory, temperature, 2 x clock, clocks-event reasons, processes,
    # GPM sample + metrics = 12, plus one slow field batch and one fabric query in 10 intervals; the old reader
    # made 108. The inventory (7 queries) is read at attach and then every 300 s.
    assert per_interval == 12.2
    assert collector.stats.nvml_call_budget == 16
    assert fake.calls_to("nvmlDeviceGetNvLinkErrorCounter", 0) == fake.calls_to("nvmlDeviceGetTotalEccErrors", 0) == 0


def test_not_supported_is_null_and_asked_only_once(make_collector: Make) -> None:
    gpu = hopper(errors={("field", FI_POWER): NOT_SUPPORTED, "nvmlDeviceGetPowerUsage": NOT_SUPPORTED},
                 temp_mem_c=None, nvlink_states={})
    fake = FakeNvml([gpu])
    collector = make_collector(fake)
    collector.open()
    samples = [collector.collect(0)[0], tick(fake, collector, 10.0)[0]]
    for sample in samples:
        assert sample.power_w is None
        assert sample.temp_mem_c is None
        assert (sample.nvlink_crc_errors, sample.nvlink_links_down) == (None, None)
        assert sample.energy_j is not None  # a supported counter is still read
    assert fake.field_requests[(0, FI_POWER, 0)] == 1
    assert fake.calls_to("nvmlDeviceGetPowerUsage", 0) == 1  # the fallback, asked once too
    assert fake.field_requests[(0, pynvml.NVML_FI_DEV_MEMORY_TEMP, 0)] == 1
    assert fake.field_requests[(0, FI_LINK_STATE, 0)] == 0  # no NVLink: the link count said so
    assert collector.errors_last_interval == 0


def test_other_errors_are_null_counted_and_retried(make_collector: Make) -> None:
    gpu = hopper(temp_gpu_c=55, ecc=ecc(cv=9),
                 errors={"nvmlDeviceGetTemperatureV": UNKNOWN, ("field", FI_SBE_VOL): pynvml.NVML_ERROR_TIMEOUT})
    fake = FakeNvml([gpu])
    collector = make_collector(fake, slow_every_s=0.5)
    collector.open()
    (sample,) = collector.collect(0)
    assert (sample.temp_gpu_c, sample.ecc_corrected_volatile, sample.ecc_uncorrected_volatile) == (None, None, 0)
    assert sample.error is None
    assert collector.errors_last_interval == 2
    assert fake.calls_to("nvmlDeviceGetTemperature", 0) == 0  # a failure is not "unsupported": no fallback

    fake.gpus[0].errors = {}
    (sample,) = tick(fake, collector)
    assert (sample.temp_gpu_c, sample.ecc_corrected_volatile) == (55.0, 9)
    assert collector.errors_last_interval == 0


def test_nvlink_sums_are_null_when_a_link_read_fails(make_collector: Make) -> None:
    gpu = hopper(nvlink_states=dict.fromkeys(range(4), 1), nvlink_errors={(0, REPLAY): 2, (3, RECOVERY): 5},
                 errors={("field", FI_DL_CRC, 2): UNKNOWN, ("field", FI_LINK_STATE, 1): UNKNOWN})
    fake = FakeNvml([gpu])
    collector = make_collector(fake)
    collector.open()
    (sample,) = collector.collect(0)
    assert sample.nvlink_crc_errors is None  # a partial sum would look like a counter reset
    assert (sample.nvlink_replay_errors, sample.nvlink_recovery_errors) == (2, 5)
    assert sample.nvlink_links_down is None
    assert collector.errors_last_interval == 2


def test_older_driver_falls_back_to_older_calls(make_collector: Make) -> None:
    gpu = hopper(temp_gpu_c=61, clocks_event_reasons=0x08, mem_used=1_000_000_000, mem_reserved=500_000_000,
                 errors={"nvmlDeviceGetTemperatureV": FUNCTION_NOT_FOUND,
                         "nvmlDeviceGetCurrentClocksEventReasons": FUNCTION_NOT_FOUND,
                         ("nvmlDeviceGetMemoryInfo", pynvml.nvmlMemory_v2): FUNCTION_NOT_FOUND})
    fake = FakeNvml([gpu])
    collector = make_collector(fake)
    collector.open()
    for seconds in (0.0, 10.0):
        (sample,) = tick(fake, collector, seconds)
        assert (sample.temp_gpu_c, sample.clock_event_reasons) == (61.0, 8)
        assert (sample.mem_used_bytes, sample.mem_total_bytes) == (1_500_000_000, H100_MEMORY_BYTES)  # v1: + reserved
    assert fake.calls_to("nvmlDeviceGetTemperatureV", 0) == 1
    assert fake.calls_to("nvmlDeviceGetTemperature", 0) == 2
    assert fake.calls_to("nvmlDeviceGetCurrentClocksThrottleReasons", 0) == 2
    assert collector.errors_last_interval == 0


def test_binding_without_a_function_falls_back(make_collector: Make) -> None:
    class OldBinding(FakeNvml):
        nvmlDeviceGetTemperatureV = None  # an nvidia-ml-py release that predates the call

    collector = make_collector(OldBinding([hopper(temp_gpu_c=48)]))
    assert collector.collect(0)[0].temp_gpu_c == 48.0


def test_gpu_failing_every_read_is_in_error(make_collector: Make) -> None:
    reads = ["nvmlDeviceGetMigMode", "nvmlDeviceGetFieldValues", "nvmlDeviceGetSamples", "nvmlDeviceGetMemoryInfo",
             "nvmlDeviceGetTemperatureV", "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons",
             "nvmlDeviceGetComputeRunningProcesses", "nvmlGpmQueryDeviceSupport", "nvmlDeviceGetGpuFabricInfoV"]
    fake = FakeNvml([hopper(errors=dict.fromkeys(reads, UNKNOWN)), volta()])
    broken, fine = make_collector(fake).collect(0)
    assert broken.error is not None
    assert broken.error.startswith("nvmlDeviceGetMigMode: Unknown Error (and ")
    assert (broken.uuid, broken.power_w, broken.util_gpu_ratio, broken.mem_used_bytes) == (UUID0, None, None, None)
    assert fine.error is None


def test_unexpected_failure_in_one_gpu_does_not_stop_the_others(make_collector: Make) -> None:
    class GarbledBinding(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, handle: object, version: int | None = None) -> object:
            value = super().nvmlDeviceGetMemoryInfo(handle, version)
            return "garbage" if value.total == H100_MEMORY_BYTES else value

    fake = GarbledBinding([hopper(), volta(power_mw=2_000)])
    broken, fine = make_collector(fake).collect(0)
    assert broken.error is not None
    assert broken.error.startswith("collector failure: AttributeError(")
    assert (fine.error, fine.power_w) == (None, 2.0)


# -- XID events ------------------------------------------------------------------------------


def test_xids_are_delivered_once_each(make_collector: Make) -> None:
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake)
    collector.open()
    assert events_settled(collector)
    fake.inject_xid(0, 43)
    fake.inject_xid(1, 79)
    fake.inject_xid(0, 13)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in collector.collect(0)] == [[43, 13], [79]]
    assert [s.xids for s in tick(fake, collector)] == [[], []]

    fake.inject_xid(1, 48)
    fake.inject_xid(1, 70_000)  # beyond the wire's XID range: dropped, not a poisoned message
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in tick(fake, collector)] == [[], [48]]


def test_each_gpu_has_its_own_event_set(make_collector: Make) -> None:
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake)
    collector.open()
    assert events_settled(collector)
    assert fake.live_event_sets == 2
    assert collector.xid_watcher.status() == {0: "registered", 1: "registered"}


def test_xids_only_where_events_are_supported(make_collector: Make) -> None:
    no_xid_events = pynvml.nvmlEventTypePState | pynvml.nvmlEventTypeClock
    fake = FakeNvml([hopper(), volta(supported_events=no_xid_events)])
    collector = make_collector(fake)
    collector.open()
    assert events_settled(collector)
    assert fake.calls_to("nvmlDeviceRegisterEvents", 0) == 1
    assert fake.calls_to("nvmlDeviceRegisterEvents", 1) == 0
    assert collector.xid_watcher.status() == {0: "registered", 1: "unsupported"}
    fake.inject_xid(0, 31)
    fake.inject_xid(1, 31)  # nobody registered: NVML drops it
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in collector.collect(0)] == [[31], []]
    assert fake.live_event_sets == 1  # the unsupported GPU's set was freed, not kept


# -- GPM -------------------------------------------------------------------------------------


def test_gpm_ratios_from_the_second_interval(make_collector: Make) -> None:
    fake = FakeNvml([hopper(gpm_metrics={SM_UTIL: 80.0, TENSOR_UTIL: 64.0, DRAM_UTIL: 25.0}), volta()])
    collector = make_collector(fake)
    collector.open()

    def ratios() -> list[tuple[float | None, ...]]:
        return [(s.sm_active_ratio, s.tensor_active_ratio, s.dram_active_ratio) for s in tick(fake, collector)]

    assert ratios() == [(None, None, None), (None, None, None)]
    assert ratios() == [(0.8, 0.64, 0.25), (None, None, None)]
    fake.gpus[0].gpm_metrics = {SM_UTIL: 100.4, TENSOR_UTIL: -0.5, DRAM_UTIL: 50.0}  # sampling overshoot
    fake.gpus[0].gpm_metric_returns = {DRAM_UTIL: UNKNOWN}
    assert ratios() == [(1.0, 0.0, None), (None, None, None)]
    assert collector.errors_last_interval == 1
    assert fake.calls_to("nvmlGpmSampleGet", 1) == 0  # the V100 answered "not a GPM device" once
    assert fake.calls_to("nvmlGpmQueryDeviceSupport", 1) == 1
    assert fake.live_gpm_samples == 2  # two per GPM GPU, reused


def test_gpm_is_refused_for_intervals_under_100_ms(make_collector: Make) -> None:
    fake = FakeNvml([hopper(gpm_metrics={SM_UTIL: 80.0})])
    collector = make_collector(fake, interval_ms=50)
    collector.open()
    for _ in range(4):
        assert tick(fake, collector, 0.05)[0].sm_active_ratio is None
    assert fake.calls_to("nvmlGpmSampleGet", 0) == 0


def test_gpm_samples_closer_than_100_ms_are_not_taken(make_collector: Make) -> None:
    fake = FakeNvml([hopper(gpm_metrics={SM_UTIL: 80.0})])
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)  # first GPM sample
    assert tick(fake, collector, 0.05)[0].sm_active_ratio is None  # a late tick 50 ms on: NVML would say 0 %
    assert fake.calls_to("nvmlGpmSampleGet", 0) == 1
    assert tick(fake, collector, 1.0)[0].sm_active_ratio == 0.8  # over the 1.05 s since the first sample


# -- lifecycle -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_init_failure_says_no_driver_and_suggests_simulated(code: int) -> None:
    fake = FakeNvml([hopper()], init_error=code)
    collector = NvmlCollector(nvml=fake)
    with pytest.raises(NvmlUnavailable, match="no NVIDIA driver was found") as info:
        collector.collect(0)
    assert "--backend simulated" in str(info.value)
    collector.close()
    assert fake.shutdown_count == 0


def test_init_refused_names_the_permission_problem() -> None:
    collector = NvmlCollector(nvml=FakeNvml(init_error=pynvml.NVML_ERROR_NO_PERMISSION))
    with pytest.raises(NvmlUnavailable, match=r"Insufficient Permissions.*--backend simulated"):
        collector.open()
    collector.close()


def test_real_pynvml_without_a_driver_raises_nvml_unavailable() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    collector = NvmlCollector()
    with pytest.raises(NvmlUnavailable, match="--backend simulated"):
        collector.open()
    collector.close()


def test_close_stops_the_threads_frees_everything_and_is_idempotent() -> None:
    before = _event_threads()
    fake = FakeNvml([hopper(), volta()])
    collector = NvmlCollector(nvml=fake, event_wait_ms=20, clock=lambda: fake.now_us / 1e6)
    assert isinstance(collector, Collector)
    collector.collect(0)
    tick(fake, collector)
    assert events_settled(collector)
    assert (_event_threads(), fake.live_event_sets, fake.live_gpm_samples) == (before + 1, 2, 2)
    collector.close()
    assert (_event_threads(), fake.live_event_sets, fake.live_gpm_samples, fake.leaked) == (before, 0, 0, 0)
    assert (fake.initialized, fake.shutdown_count) == (False, 1)
    collector.close()
    assert fake.shutdown_count == 1
    with pytest.raises(RuntimeError, match="closed"):
        collector.collect(0)


def test_context_manager_opens_once_and_closes() -> None:
    fake = FakeNvml([hopper()])
    with NvmlCollector(nvml=fake, event_wait_ms=20) as collector:
        collector.collect(0)
        collector.collect(0)
    assert (fake.init_count, fake.shutdown_count, fake.initialized) == (1, 1, False)


def test_gpu_uuids_in_index_order_after_open(make_collector: Make) -> None:
    collector = make_collector(FakeNvml([hopper(), volta()]))
    assert collector.gpu_uuids == []
    collector.open()
    assert collector.gpu_uuids == [UUID0, UUID1]


def _event_threads() -> int:
    return sum(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


# -- the fake must not drift from the real pynvml -------------------------------------------------


def _nvml_names_used_by_collector() -> set[str]:
    """Every pynvml name the collector modules use: `nvml.X` / `self._nvml.X` / `self.nvml.X` attributes
    and function-name strings."""
    folder = Path(NvmlCollector.__module__.replace(".", "/")).name  # "nvml"
    root = Path(inspect.getfile(NvmlCollector)).parent
    assert folder == "nvml"
    names: set[str] = set()
    for module in COLLECTOR_MODULES:
        for node in ast.walk(ast.parse((root / module).read_text())):
            if isinstance(node, ast.Attribute):
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "nvml") or (
                    isinstance(owner, ast.Attribute) and owner.attr in ("_nvml", "nvml")
                ):
                    names.add(node.attr)
            elif (isinstance(node, ast.Constant) and str(node.value).startswith("nvml")
                  and str(node.value).isidentifier()):
                names.add(str(node.value))
    return names


def test_the_collector_reads_the_names_this_guard_checks() -> None:
    names = _nvml_names_used_by_collector()
    assert {"nvmlDeviceGetFieldValues", "nvmlEventSetWait", "nvmlGpmMetricsGet", "nvmlDeviceGetSamples",
            "NVMLError_NotSupported", "NVML_FI_DEV_NVLINK_COUNT_SYMBOL_ERRORS"} <= names
    assert len(names) > 70


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
