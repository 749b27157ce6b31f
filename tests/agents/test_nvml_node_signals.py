"""NvmlCollector's node-side signals against the pynvml fake: the recovery action in the batched fields, the
GPU's own limits, the NVSwitch fabric, the inventory cadence, and the expected and missing GPUs kept across
restarts and driver reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pynvml
import pytest

from gpufleet.agents.collectors.base import Enumeration, NodeDown
from gpufleet.agents.collectors.enumeration import EnumerationRecord
from tests.agents.nvml_helpers import NOT_SUPPORTED, UUID0, UUID1, UUID2, Make, hopper, tick, volta
from tests.fakes.fake_pynvml import FakeNvml, h100

FI_RECOVERY = pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
FI_LIMIT, FI_DEFAULT = pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT, pynvml.NVML_FI_DEV_POWER_DEFAULT_LIMIT


# -- recovery action ---------------------------------------------------------------------------


def test_the_recovery_action_rides_in_the_fast_field_batch_every_interval(make_collector: Make) -> None:
    fake = FakeNvml([hopper()])
    collector = make_collector(fake)
    collector.open()
    assert collector.collect(0)[0].recovery_action == 0
    batches = fake.calls_to("nvmlDeviceGetFieldValues", 0)
    fake.gpus[0].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET  # XID 154 time
    actions = [tick(fake, collector)[0].recovery_action for _ in range(3)]
    assert actions == [1, 1, 1]  # sticky until the remedy
    assert fake.field_requests[(0, FI_RECOVERY, 0)] == 4
    assert fake.calls_to("nvmlDeviceGetFieldValues", 0) - batches == 3  # no call of its own


def test_a_driver_without_the_recovery_field_reports_null_and_is_not_asked_again(make_collector: Make) -> None:
    fake = FakeNvml([hopper(recovery_action=None)])
    collector = make_collector(fake)
    collector.open()
    assert [collector.collect(0)[0].recovery_action, tick(fake, collector)[0].recovery_action] == [None, None]
    assert fake.field_requests[(0, FI_RECOVERY, 0)] == 1
    assert collector.errors_last_interval == 0


def test_a_reset_clears_the_action_the_node_reports(make_collector: Make, tmp_path: Path) -> None:
    release = tmp_path / "nvml-release"
    fake = FakeNvml([hopper(recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET)])
    collector = make_collector(fake, release_file=release)
    collector.open()
    assert collector.collect(0)[0].recovery_action == 1
    assert fake.reset_gpu(0) is False  # NVML held open: the operator releases it first (docs/nvml-agent.md)
    release.touch()
    with pytest.raises(NodeDown):
        tick(fake, collector)
    assert fake.reset_gpu(0) is True
    release.unlink()
    tick(fake, collector)  # NVML starts again
    assert tick(fake, collector)[0].recovery_action == 0


# -- limits --------------------------------------------------------------------------------------


def test_thresholds_come_at_attach_and_ride_in_every_sample(make_collector: Make) -> None:
    fake = FakeNvml([hopper()])
    collector = make_collector(fake)
    collector.open()
    samples = [collector.collect(0)[0], *(tick(fake, collector)[0] for _ in range(3))]
    assert {(s.temp_shutdown_c, s.temp_slowdown_c, s.temp_mem_max_c) for s in samples} == {(92.0, 89.0, 95.0)}
    assert fake.calls_to("nvmlDeviceGetTemperatureThreshold", 0) == 3  # once each, at attach


def test_a_changed_power_limit_shows_at_the_next_slow_read(make_collector: Make) -> None:
    fake = FakeNvml([hopper(power_limit_mw=700_000, power_default_limit_mw=700_000)])
    collector = make_collector(fake, slow_every_s=10.0)
    collector.open()
    assert collector.collect(0)[0].power_limit_w == 700.0
    fake.gpus[0].power_limit_mw = 450_000  # `nvidia-smi -pl 450`, or the BMC capping the board
    assert tick(fake, collector, 5.0)[0].power_limit_w == 700.0  # the last reading repeats between slow reads
    sample = tick(fake, collector, 5.0)[0]
    assert (sample.power_limit_w, sample.power_limit_default_w) == (450.0, 700.0)
    assert fake.calls_to("nvmlDeviceGetEnforcedPowerLimit", 0) == 0  # the fields answered


def test_without_the_power_limit_fields_the_older_calls_answer(make_collector: Make) -> None:
    fake = FakeNvml([hopper(errors={("field", FI_LIMIT): NOT_SUPPORTED, ("field", FI_DEFAULT): NOT_SUPPORTED},
                            power_limit_mw=600_000, power_default_limit_mw=700_000)])
    collector = make_collector(fake, slow_every_s=1.0)
    collector.open()
    samples = [collector.collect(0)[0], tick(fake, collector)[0]]
    assert [(s.power_limit_w, s.power_limit_default_w) for s in samples] == [(600.0, 700.0)] * 2
    assert fake.field_requests[(0, FI_LIMIT, 0)] == 1  # unsupported: not asked again
    assert fake.calls_to("nvmlDeviceGetEnforcedPowerLimit", 0) == 2


def test_a_threshold_nvml_cannot_give_is_null(make_collector: Make) -> None:
    fake = FakeNvml([hopper(temp_thresholds={pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 92})])
    collector = make_collector(fake)
    collector.open()
    sample = collector.collect(0)[0]
    assert (sample.temp_shutdown_c, sample.temp_slowdown_c, sample.temp_mem_max_c) == (92.0, None, None)
    assert collector.errors_last_interval == 0


# -- fabric --------------------------------------------------------------------------------------


def test_fabric_health_is_read_with_the_slow_counters(make_collector: Make) -> None:
    fake = FakeNvml([hopper()])
    collector = make_collector(fake, slow_every_s=10.0)
    collector.open()
    first = collector.collect(0)[0]
    assert (first.fabric_state, first.fabric_status, first.fabric_clique_id, first.fabric_health_mask) == (
        3, 0, 1, 0b0001_1010_1010)
    assert first.fabric_cluster_uuid == "7c3a1f0e-9b2d-4c58-a6e1-f203b4c5d6e7"
    state, status, clique, cluster, _ = fake.gpus[0].fabric
    fake.gpus[0].fabric = (state, status, clique, cluster, 0b0001_1010_1001)  # bandwidth degraded
    assert tick(fake, collector, 5.0)[0].fabric_health_mask == 0b0001_1010_1010
    assert tick(fake, collector, 5.0)[0].fabric_health_mask == 0b0001_1010_1001
    assert fake.calls_to("nvmlDeviceGetGpuFabricInfoV", 0) == 2


def test_gpus_on_no_fabric_report_null_and_are_not_asked_again(make_collector: Make) -> None:
    pcie_hopper = h100(UUID2, pci=(0, 0x86, 0), fabric=(pynvml.NVML_GPU_FABRIC_STATE_NOT_SUPPORTED, 0, 0, bytes(16), 0))
    fake = FakeNvml([volta(), pcie_hopper])
    collector = make_collector(fake, slow_every_s=1.0)
    collector.open()
    for samples in (collector.collect(0), tick(fake, collector), tick(fake, collector)):
        assert [(s.fabric_state, s.fabric_cluster_uuid) for s in samples] == [(None, None), (None, None)]
    assert [fake.calls_to("nvmlDeviceGetGpuFabricInfoV", i) for i in (0, 1)] == [1, 1]
    assert collector.errors_last_interval == 0


# -- inventory -----------------------------------------------------------------------------------


def test_inventory_is_sent_when_read_at_attach_then_every_period_one_gpu_an_interval(make_collector: Make) -> None:
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake, inventory_every_s=60.0)
    collector.open()

    def sent() -> list[bool]:
        samples = tick(fake, collector)
        return [s.serial is not None for s in samples]

    first = collector.collect(0)
    assert [(s.serial, s.vbios_version, s.driver_version, s.persistence_mode, s.ecc_mode) for s in first] == [
        ("1654922007431", "96.00.89.00.01", "580.95.05", True, True),
        ("1654922007431", "88.00.4F.00.09", "580.95.05", True, True),
    ]
    between = [sent() for _ in range(59)]
    assert between == [[False, False]] * 59
    assert [sent(), sent(), sent()] == [[True, False], [False, True], [False, False]]
    for call in ("nvmlDeviceGetSerial", "nvmlDeviceGetVbiosVersion", "nvmlDeviceGetPersistenceMode",
                 "nvmlDeviceGetEccMode"):
        assert [fake.calls_to(call, 0), fake.calls_to(call, 1)] == [2, 2]
    assert fake.calls_to("nvmlSystemGetDriverVersion") == 4  # asked with each GPU's inventory


def test_a_driver_upgrade_is_seen_in_the_inventory_after_the_reload(make_collector: Make, tmp_path: Path) -> None:
    release = tmp_path / "nvml-release"
    fake = FakeNvml([hopper()])
    collector = make_collector(fake, release_file=release)
    collector.open()
    assert collector.collect(0)[0].driver_version == "580.95.05"
    release.touch()
    with pytest.raises(NodeDown):
        tick(fake, collector)
    assert fake.unload_driver() is True
    fake.driver_version = "590.44.01"
    fake.load_driver()
    release.unlink()
    back = tick(fake, collector)  # NVML starts again, the GPU is attached afresh and its inventory read
    assert back[0].driver_version == "590.44.01"
    assert tick(fake, collector)[0].driver_version is None  # until the next inventory read


# -- expected and missing GPUs -------------------------------------------------------------------


def test_a_gpu_that_left_the_bus_is_missing_after_the_driver_reload(make_collector: Make, tmp_path: Path) -> None:
    record, release = tmp_path / "gpus.json", tmp_path / "nvml-release"
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake, enumeration_file=record, release_file=release)
    collector.open()
    collector.collect(0)
    assert collector.enumeration == Enumeration(2, ())
    assert json.loads(record.read_text()) == {"uuids": [UUID0, UUID1]}

    fake.gpus[0].present = False  # off the bus: NVML still counts it until the driver loads again
    assert len(tick(fake, collector)) == 2
    release.touch()
    with pytest.raises(NodeDown):
        tick(fake, collector)
    fake.unload_driver()
    fake.load_driver()
    release.unlink()
    tick(fake, collector)
    samples = tick(fake, collector)
    assert [s.uuid for s in samples] == [UUID1]  # indices close up
    assert collector.enumeration == Enumeration(2, (UUID0,))
    assert json.loads(record.read_text()) == {"uuids": [UUID0, UUID1]}  # fewer GPUs never replace the record


def test_a_restarted_agent_remembers_the_gpus_it_had(make_collector: Make, tmp_path: Path) -> None:
    record = tmp_path / "gpus.json"
    record.write_text(json.dumps({"uuids": [UUID0, UUID1, UUID2]}))
    fake = FakeNvml([hopper(), volta()])  # the node came back from a reboot with one GPU fewer
    collector = make_collector(fake, enumeration_file=record)
    collector.open()
    collector.collect(0)
    assert collector.enumeration == Enumeration(3, (UUID2,))


def test_a_configured_count_needs_no_record_and_names_no_gpu(make_collector: Make) -> None:
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake, gpus_expected=8)
    collector.open()
    collector.collect(0)
    assert collector.enumeration == Enumeration(8, ())


def test_a_swapped_gpu_becomes_the_new_normal(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    rec = EnumerationRecord(path)
    assert rec.observe([UUID0, UUID1]) == Enumeration(2, ())
    assert rec.observe([UUID0, UUID2]) == Enumeration(2, ())  # RMA: the new GPU replaces the old one
    assert rec.observe([UUID2]) == Enumeration(2, (UUID0,))
    assert rec.observe(["unknown-gpu-0", UUID2]) == Enumeration(2, ())  # enumerated, not yet attached
    assert EnumerationRecord(path).current == Enumeration(2, ())
    assert json.loads(path.read_text()) == {"uuids": [UUID0, UUID2]}


def test_an_incomplete_first_enumeration_records_nothing(tmp_path: Path) -> None:
    rec = EnumerationRecord(tmp_path / "gpus.json")
    assert rec.observe(["unknown-gpu-0", UUID1]) == Enumeration(None, ())
    assert not (tmp_path / "gpus.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert EnumerationRecord(bad).current == Enumeration(None, ())
