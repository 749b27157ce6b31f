"""Health from node-side signals, on hand-built samples: NVML's recovery action, the GPU's own temperature
and power limits, the NVSwitch fabric. Each case's state and reasons are exact, and the ingester's batch
path (`classify_all`) agrees with the single-sample rules on every case."""

from __future__ import annotations

import pynvml
import pytest

from gpufleet import node_facts
from gpufleet.config import HealthConfig
from gpufleet.pipeline.ingest.health import State, classify, classify_all
from tests.builders import gpu

CFG = HealthConfig()

H100_LIMITS = {"temp_slowdown_c": 89.0, "temp_shutdown_c": 92.0, "temp_mem_max_c": 95.0}
"""What `nvidia-smi -q` reports as the H100 SXM's slowdown, shutdown and memory maximum temperatures."""
HEALTHY_FABRIC = {"fabric_state": 3, "fabric_status": 0, "fabric_clique_id": 1,
                  "fabric_health_mask": 0b0001_1010_1010}
"""Registered; each yes/no field of the mask says "false" (2), incorrect configuration says "none" (1)."""

CASES = [
    # recovery action: the GPU's own verdict, sticky until the remedy
    ({"recovery_action": 0}, State.OK, ()),
    ({"recovery_action": 1}, State.FAILING, ("recovery_gpu_reset",)),
    ({"recovery_action": 2}, State.FAILING, ("recovery_node_reboot",)),
    ({"recovery_action": 3}, State.DEGRADED, ("recovery_drain_p2p",)),
    ({"recovery_action": 4}, State.DEGRADED, ("recovery_drain_and_reset",)),
    ({"recovery_action": 5}, State.DEGRADED, ("recovery_recover_imex_domain",)),
    ({"recovery_action": 6}, State.FAILING, ("recovery_bus_reset",)),
    ({"recovery_action": 7}, State.FAILING, ("recovery_system_reboot",)),
    ({"recovery_action": 9}, State.DEGRADED, ("recovery_action_9",)),
    ({"recovery_action": 1, "xids": [154]}, State.FAILING, ("recovery_gpu_reset",)),
    # the GPU's own temperature limits: degraded from slowdown - 2 °C, failing at shutdown
    ({**H100_LIMITS, "temp_gpu_c": 86.0}, State.OK, ()),
    ({**H100_LIMITS, "temp_gpu_c": 87.0}, State.DEGRADED, ("temperature_high",)),
    ({**H100_LIMITS, "temp_gpu_c": 91.0}, State.DEGRADED, ("temperature_high",)),
    ({**H100_LIMITS, "temp_gpu_c": 92.0}, State.FAILING, ("temperature_critical",)),
    ({**H100_LIMITS, "temp_mem_c": 94.0}, State.OK, ()),
    ({**H100_LIMITS, "temp_mem_c": 95.0}, State.DEGRADED, ("temperature_high",)),
    # a cooler-rated part: the fleet constant (87 °C) would call 84 °C fine and 88 °C merely hot
    ({"temp_slowdown_c": 85.0, "temp_shutdown_c": 88.0, "temp_gpu_c": 84.0}, State.DEGRADED, ("temperature_high",)),
    ({"temp_slowdown_c": 85.0, "temp_shutdown_c": 88.0, "temp_gpu_c": 88.0}, State.FAILING,
     ("temperature_critical",)),
    # a hotter-rated part: 90 °C is 4 °C below its slowdown, not high
    ({"temp_slowdown_c": 96.0, "temp_shutdown_c": 100.0, "temp_gpu_c": 90.0}, State.OK, ()),
    ({"temp_mem_max_c": 85.0, "temp_mem_c": 85.0}, State.DEGRADED, ("temperature_high",)),
    ({"temp_mem_max_c": 85.0, "temp_mem_c": 84.0}, State.OK, ()),
    # NVML could not say: the configured fleet values (87 / 95 / 95 °C)
    ({"temp_gpu_c": 87.0}, State.DEGRADED, ("temperature_high",)),
    ({"temp_gpu_c": 95.0}, State.FAILING, ("temperature_critical",)),
    # power limit: enforced below 0.8 x the default
    ({"power_limit_w": 559.0, "power_limit_default_w": 700.0}, State.DEGRADED, ("power_limit_low",)),
    ({"power_limit_w": 560.0, "power_limit_default_w": 700.0}, State.OK, ()),
    ({"power_limit_w": 300.0}, State.OK, ()),
    # NVSwitch fabric
    (HEALTHY_FABRIC, State.OK, ()),
    ({**HEALTHY_FABRIC, "fabric_state": 0, "fabric_status": 3}, State.OK, ()),
    ({**HEALTHY_FABRIC, "fabric_state": 1}, State.FAILING, ("fabric_not_ready",)),
    ({**HEALTHY_FABRIC, "fabric_state": 2}, State.FAILING, ("fabric_not_ready",)),
    ({**HEALTHY_FABRIC, "fabric_status": 999}, State.FAILING, ("fabric_error",)),
    ({**HEALTHY_FABRIC, "fabric_health_mask": 0b0001_1010_1001}, State.DEGRADED, ("fabric_degraded_bw",)),
    ({**HEALTHY_FABRIC, "fabric_health_mask": 0b0001_1010_0110}, State.DEGRADED, ("fabric_route_recovery",)),
    ({**HEALTHY_FABRIC, "fabric_health_mask": 0b0001_1001_1010}, State.DEGRADED, ("fabric_route_unhealthy",)),
    ({**HEALTHY_FABRIC, "fabric_health_mask": 0b0001_0110_1010}, State.DEGRADED,
     ("fabric_access_timeout_recovery",)),
    ({**HEALTHY_FABRIC, "fabric_health_mask": 0b0101_1010_1010}, State.DEGRADED,
     ("fabric_incorrect_configuration",)),
    ({**HEALTHY_FABRIC, "fabric_health_mask": 0}, State.OK, ()),  # a driver whose mask says nothing
    ({**HEALTHY_FABRIC, "fabric_state": 2, "fabric_health_mask": 0b0001_1010_1001}, State.FAILING,
     ("fabric_not_ready", "fabric_degraded_bw")),
]


@pytest.mark.parametrize(("fields", "state", "reasons"), CASES)
def test_node_signal_rules(fields, state, reasons) -> None:
    v = classify(gpu(0, **fields), None, CFG)
    assert (v.state, v.reasons) == (state, reasons)


def test_the_batch_path_agrees_with_the_single_sample_rules() -> None:
    samples = [gpu(i, **fields) for i, (fields, _, _) in enumerate(CASES)]
    states, reasons = classify_all(samples, {}, CFG)
    assert states == [int(state) for _, state, _ in CASES]
    assert reasons == [list(r) for _, _, r in CASES]


def test_a_sample_needing_a_reset_is_failing_whatever_came_before_it() -> None:
    # Order independence: the verdict of each sample is its own, in any order of arrival.
    needs = gpu(0, recovery_action=1)
    fine = gpu(0, recovery_action=0)
    forward = classify_all([fine, needs, fine], {}, CFG)[0]
    backward = classify_all([needs, fine, fine], {}, CFG)[0]
    assert forward == [0, 2, 0]
    assert backward == [2, 0, 0]


def test_margins_and_the_power_ratio_are_configurable() -> None:
    cfg = HealthConfig(temp_slowdown_margin_c=0.0, temp_shutdown_margin_c=3.0, power_limit_low_ratio=0.0)
    hot = gpu(0, temp_gpu_c=88.0, **H100_LIMITS)
    near_shutdown = gpu(1, temp_gpu_c=89.0, **H100_LIMITS)
    capped = gpu(2, power_limit_w=100.0, power_limit_default_w=700.0)
    assert classify(hot, None, cfg).state == State.OK
    assert classify(near_shutdown, None, cfg).reasons == ("temperature_critical",)
    assert classify(capped, None, cfg).state == State.OK


def test_the_code_tables_match_nvml() -> None:
    for value, name in node_facts.RECOVERY_ACTIONS.items():
        assert getattr(pynvml, f"NVML_GPU_RECOVERY_ACTION_{name.upper()}") == value
    for name, shift in node_facts.FABRIC_MASK_FIELDS:
        assert getattr(pynvml, f"NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_{name.upper()}") == shift
        assert getattr(pynvml, f"NVML_GPU_FABRIC_HEALTH_MASK_{name.upper()}_TRUE") == node_facts.FABRIC_MASK_TRUE
    assert pynvml.NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_INCORRECT_CONFIGURATION == node_facts.FABRIC_CONFIG_SHIFT
    assert pynvml.NVML_GPU_FABRIC_HEALTH_MASK_INCORRECT_CONFIGURATION_NONE == 1
    assert pynvml.NVML_GPU_FABRIC_STATE_COMPLETED == node_facts.FABRIC_COMPLETED
    assert node_facts.FABRIC_MASK_TRUE_BITS == 0x55
