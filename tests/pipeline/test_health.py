"""Health rules on hand-built samples: each rule's state and reason, exactly."""

from __future__ import annotations

import pytest

from gpufleet.config import HealthConfig
from gpufleet.pipeline.ingest.health import Previous, State, classify
from tests.builders import gpu

CFG = HealthConfig()


@pytest.mark.parametrize(
    ("fields", "state", "reasons"),
    [
        ({}, State.OK, ()),
        ({"error": "GPU is lost", "util_gpu_ratio": None}, State.FAILING, ("unreachable",)),
        ({"xids": [79]}, State.FAILING, ("xid_79",)),
        ({"xids": [48, 48]}, State.FAILING, ("xid_48",)),
        ({"xids": [63]}, State.DEGRADED, ("xid_63",)),
        ({"xids": [94]}, State.DEGRADED, ("xid_94",)),
        ({"xids": [13, 31, 43]}, State.OK, ()),
        ({"ecc_uncorrected_volatile": 1}, State.FAILING, ("ecc_dbe",)),
        ({"ecc_uncorrected_volatile": 0, "ecc_corrected_volatile": 5}, State.OK, ()),
        ({"remap_failure": True}, State.FAILING, ("row_remap_failure",)),
        ({"remap_pending": True}, State.DEGRADED, ("row_remap_pending",)),
        ({"remapped_rows_uncorrectable": 512}, State.FAILING, ("remapped_rows_limit",)),
        ({"remapped_rows_uncorrectable": 511}, State.OK, ()),
        ({"retired_pages": 63}, State.FAILING, ("retired_pages_limit",)),
        ({"nvlink_links_down": 1}, State.FAILING, ("nvlink_down",)),
        ({"clock_event_reasons": 0x40}, State.DEGRADED, ("thermal_throttle",)),
        ({"clock_event_reasons": 0x20}, State.DEGRADED, ("thermal_throttle",)),
        ({"clock_event_reasons": 0x80}, State.DEGRADED, ("power_brake",)),
        ({"clock_event_reasons": 0x4 | 0x1}, State.OK, ()),  # SW power cap and idle are normal
        ({"temp_gpu_c": 87.0}, State.DEGRADED, ("temperature_high",)),
        ({"temp_gpu_c": 95.0}, State.FAILING, ("temperature_critical",)),
        ({"temp_mem_c": 96.0}, State.DEGRADED, ("temperature_high",)),
        ({"xids": [79], "clock_event_reasons": 0x40}, State.FAILING, ("xid_79", "thermal_throttle")),
    ],
)
def test_rules(fields, state, reasons) -> None:
    v = classify(gpu(0, **fields), None, CFG)
    assert (v.state, v.reasons) == (state, reasons)


def test_growth_rules_need_the_previous_sample() -> None:
    s = gpu(0, pcie_replay_count=10, nvlink_replay_errors=3, nvlink_recovery_errors=1)
    assert classify(s, None, CFG).state == State.OK
    assert classify(s, Previous(pcie_replay_count=10, nvlink_errors=4), CFG).state == State.OK
    v = classify(s, Previous(pcie_replay_count=9, nvlink_errors=2), CFG)
    assert (v.state, v.reasons) == (State.DEGRADED, ("nvlink_errors", "pcie_replay"))


def test_thresholds_are_configurable() -> None:
    cfg = HealthConfig(failing_xids=(13,), degrading_xids=(), temp_degraded_c=70.0)
    v = classify(gpu(0, xids=[13, 79], temp_gpu_c=75.0), None, cfg)
    assert (v.state, v.reasons) == (State.FAILING, ("xid_13", "temperature_high"))
