"""The NVML collector where a fleet needs it most, on the fake: a GPU lost mid-run while XIDs keep
arriving on the others, a failed event registration, a hung call on one GPU, NVML uninitialized under
the agent, the driver unloaded and reloaded (released by the operator first), MIG toggled, a GPU
reset, and an unprivileged agent."""

from __future__ import annotations

from pathlib import Path

import pynvml
import pytest

from gpufleet.agents.collectors.base import NodeDown, NodeReleased
from tests.agents.nvml_helpers import (
    NOT_SUPPORTED,
    PCI2,
    UNKNOWN,
    UUID0,
    UUID1,
    UUID2,
    Make,
    events_settled,
    eventually,
    hopper,
    tick,
    volta,
)
from tests.fakes.fake_pynvml import FakeNvml, h100

MIG_ON, MIG_OFF = pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_DISABLE


def three_gpus() -> FakeNvml:
    return FakeNvml([hopper(power_mw=400_000), volta(power_mw=200_000), h100(UUID2, pci=PCI2, power_mw=300_000)])


# -- a lost GPU ------------------------------------------------------------------------------


def test_a_lost_gpu_does_not_silence_xids_on_the_others(make_collector: Make) -> None:
    fake = three_gpus()
    collector = make_collector(fake)
    collector.open()
    assert events_settled(collector)
    assert [s.error for s in collector.collect(0)] == [None, None, None]

    fake.gpus[0].lost = True  # fell off the bus: its set's waits answer GPU_IS_LOST from now on
    lost, fine, also_fine = tick(fake, collector)
    assert lost.error == "GPU is lost (nvmlDeviceGetMigMode)"
    assert (fine.error, fine.power_w, also_fine.error) == (None, 200.0, None)
    assert eventually(lambda: collector.xid_watcher.status()[0] == "lost")

    for xid in (74, 79):  # the cascade on the healthy peers
        fake.inject_xid(1, xid)
        fake.inject_xid(2, xid)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in tick(fake, collector)] == [[], [74, 79], [74, 79]]
    assert collector.xid_watcher.status() == {0: "lost", 1: "registered", 2: "registered"}


def test_an_event_naming_its_gpu_by_another_handle_is_matched_by_uuid(make_collector: Make) -> None:
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake)
    collector.open()
    assert events_settled(collector)
    fake.inject_xid(1, 48, alias=True)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in collector.collect(0)] == [[], [48]]
    assert fake.calls_to("nvmlDeviceGetUUID", 1) == 2  # attach, then the event's handle


def test_a_failed_registration_is_freed_and_retried_without_harming_the_others(make_collector: Make) -> None:
    fake = FakeNvml([hopper(errors={"nvmlDeviceRegisterEvents": UNKNOWN}), volta()])
    collector = make_collector(fake)
    collector.open()
    assert events_settled(collector)
    assert collector.xid_watcher.status() == {0: "failed", 1: "registered"}
    assert fake.live_event_sets == 1  # the set left "in undefined state" was freed, never waited on
    fake.inject_xid(1, 31)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in collector.collect(0)] == [[], [31]]
    assert collector.errors_last_interval == 1  # the failed registration

    fake.gpus[0].errors = {}  # the next attempt (after a 1 s back-off) succeeds
    assert eventually(lambda: collector.xid_watcher.status()[0] == "registered")
    fake.inject_xid(0, 63)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in tick(fake, collector)] == [[63], []]


def test_xids_waiting_for_a_collection_are_bounded(make_collector: Make) -> None:
    fake = FakeNvml([hopper()])
    collector = make_collector(fake)
    collector.open()
    assert events_settled(collector)
    for _ in range(300):
        fake.inject_xid(0, 13)
    assert fake.wait_for_event_consumer()
    (sample,) = collector.collect(0)
    assert sample.xids == [13] * 256
    assert collector.stats.xids_dropped_total == 44


# -- deadlines -------------------------------------------------------------------------------


def test_a_hung_call_on_one_gpu_costs_only_that_gpu_its_interval(make_collector: Make) -> None:
    fake = FakeNvml([hopper(power_mw=400_000), volta(power_mw=200_000)])
    collector = make_collector(fake, deadline_s=0.3)
    collector.open()
    collector.collect(0)
    fake.gpus[1].hang = {"nvmlDeviceGetTemperatureV"}  # a GSP timeout: the call blocks
    fine, hung = tick(fake, collector)
    assert (fine.error, fine.power_w, fine.energy_interval_j) == (None, 400.0, 400.0)
    assert hung.uuid == UUID1
    assert hung.error is not None
    assert hung.error.startswith("NVML did not answer within the deadline (nvmlDeviceGetTemperatureV blocked for ")
    assert collector.stats.nvml_deadline_misses == 1

    fine, hung = tick(fake, collector)  # still blocked: no second read is queued behind it
    assert (fine.error, hung.error is not None) == (None, True)
    assert fake.calls_to("nvmlDeviceGetTemperatureV", 1) == 2  # the first read's and the hung one

    fake.release_hangs()
    fake.gpus[1].hang = set()
    assert eventually(lambda: not collector._pool.busy(1))
    fine, back = tick(fake, collector)
    assert back.error is None
    assert back.energy_interval_j == 600.0  # the late readings were dropped: 3 s x 200 W, none lost
    assert collector.stats.nvml_deadline_misses == 0


# -- NVML itself ---------------------------------------------------------------------------------


def test_nvml_uninitialized_under_the_agent_is_reinitialised(make_collector: Make) -> None:
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    fake.nvmlShutdown()  # another component in the process shut NVML down once too often
    down = tick(fake, collector)
    assert [s.uuid for s in down] == [UUID0, UUID1]
    assert all(s.error is not None and s.error.startswith("NVML unavailable (Uninitialized") for s in down)
    assert collector.state == "down"
    back = tick(fake, collector)  # 1 s later: the first retry is due
    assert [s.error for s in back] == [None, None]
    assert (collector.state, fake.init_count) == ("up", 2)
    assert events_settled(collector)
    fake.inject_xid(0, 94)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in tick(fake, collector)] == [[94], []]


def test_reinitialisation_backs_off_while_the_driver_is_mismatched(make_collector: Make) -> None:
    fake = FakeNvml([hopper()])
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    fake.init_error = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH  # library upgraded under a loaded module
    fake.nvmlShutdown()
    tick(fake, collector)  # goes down; next attempt in 1 s
    attempts = []
    for _ in range(8):
        (sample,) = tick(fake, collector, 0.5)
        attempts.append(fake.init_count)
    assert sample.error is not None
    assert "RM has detected an NVML/RM version mismatch" in sample.error
    assert attempts == [1, 2, 2, 2, 2, 3, 3, 3]  # tries 1 s after the failure, then 2 s later (then 4 s)
    fake.init_error = None
    for _ in range(8):
        tick(fake, collector, 0.5)
    assert collector.state == "up"


def test_the_driver_is_released_unloaded_reloaded_and_reacquired(make_collector: Make, tmp_path: Path) -> None:
    release = tmp_path / "nvml-release"
    fake = FakeNvml([hopper(power_mw=500_000), volta()])
    collector = make_collector(fake, release_file=release)
    collector.open()
    collector.collect(0)
    assert fake.unload_driver() is False  # held open: `rmmod nvidia` is refused

    release.touch()
    with pytest.raises(NodeDown, match="released"):
        tick(fake, collector)
    assert (fake.initialized, fake.live_event_sets, fake.live_gpm_samples, fake.leaked) == (False, 0, 0, 0)
    assert (tmp_path / "nvml-release.released").exists()
    assert fake.unload_driver() is True
    with pytest.raises(NodeDown):
        tick(fake, collector)

    release.unlink()  # the operator is done, but the new driver is not loaded yet
    down = tick(fake, collector)
    assert all(s.error is not None and "Driver Not Loaded" in s.error for s in down)
    assert not (tmp_path / "nvml-release.released").exists()
    fake.load_driver()  # new handles; the energy counter restarts at 0
    tick(fake, collector)  # the retry is due 1 s after the failure
    assert collector.state == "up"
    first, _ = tick(fake, collector)
    assert (first.error, first.energy_interval_j) == (None, 500.0)
    assert events_settled(collector)
    fake.inject_xid(1, 45)
    assert fake.wait_for_event_consumer()
    assert [s.xids for s in tick(fake, collector)] == [[], [45]]


def test_an_agent_started_during_maintenance_does_not_take_nvml(make_collector: Make, tmp_path: Path) -> None:
    release = tmp_path / "nvml-release"
    release.touch()  # the agent (re)started while the operator upgrades the driver
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake, release_file=release)
    collector.open()
    with pytest.raises(NodeReleased):
        collector.collect(0)
    assert (fake.init_count, fake.initialized, collector.state) == (0, False, "released")
    assert fake.reset_gpu(0) is True  # nothing holds NVML
    release.unlink()
    assert [s.error for s in tick(fake, collector)] == [None, None]
    assert collector.gpu_uuids == [UUID0, UUID1]


def test_a_lost_gpu_returns_only_through_a_reset_while_nvml_is_released(make_collector: Make, tmp_path: Path) -> None:
    unsupported = {("field", pynvml.NVML_FI_DEV_POWER_AVERAGE): NOT_SUPPORTED, "nvmlDeviceGetPowerUsage": NOT_SUPPORTED}
    fake = FakeNvml([hopper(power_mw=400_000, errors=unsupported), volta()])
    collector = make_collector(fake)
    collector.open()
    assert collector.collect(0)[0].power_w is None  # power said NotSupported in the GPU's state then
    fake.gpus[0].lost = True
    assert tick(fake, collector)[0].error is not None
    assert fake.reset_gpu(0) is False  # `nvidia-smi -r` is refused while the agent holds NVML

    collector.release()
    with pytest.raises(NodeDown):
        tick(fake, collector)
    fake.gpus[0].errors = {}
    assert fake.reset_gpu(0) is True
    collector.reacquire()
    back, _ = tick(fake, collector)
    assert (back.error, back.uuid) == (None, UUID0)
    assert back.power_w == 400.0  # asked again: the NotSupported answer was forgotten when NVML restarted


def test_a_gpu_lost_from_the_start_is_reported_then_attached_after_a_reset(make_collector: Make) -> None:
    fake = FakeNvml([hopper(lost=True), volta(power_mw=123_000)])
    collector = make_collector(fake)
    lost, fine = collector.collect(0)
    assert (lost.uuid, lost.error) == ("unknown-gpu-0", "GPU is lost (nvmlDeviceGetHandleByIndex)")
    assert (fine.uuid, fine.power_w) == (UUID1, 123.0)
    collector.release()
    with pytest.raises(NodeDown):
        tick(fake, collector)
    assert fake.reset_gpu(0)
    collector.reacquire()
    found, _ = tick(fake, collector)
    assert (found.uuid, found.model, found.error) == (UUID0, "NVIDIA H100 80GB HBM3", None)


# -- MIG -------------------------------------------------------------------------------------


def test_mig_toggled_clears_what_the_gpu_did_not_support(make_collector: Make) -> None:
    fake = FakeNvml([hopper(util_gpu_pct=70, resetless_mig=True)])
    collector = make_collector(fake)
    collector.open()
    assert collector.collect(0)[0].util_gpu_ratio == 0.7
    fake.set_mig_mode(0, MIG_ON)
    assert tick(fake, collector)[0].util_gpu_ratio is None  # utilization is not supported under MIG
    assert tick(fake, collector)[0].util_gpu_ratio is None
    fake.set_mig_mode(0, MIG_OFF)
    assert tick(fake, collector)[0].util_gpu_ratio == 0.7
    assert collector.errors_last_interval == 0
    assert fake.live_gpm_samples == 2  # GPM restarted on each change, its old buffers freed


def test_a_pending_mig_mode_takes_effect_at_the_reset(make_collector: Make) -> None:
    fake = FakeNvml([hopper(util_gpu_pct=70)])
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    fake.set_mig_mode(0, MIG_ON)
    assert tick(fake, collector)[0].util_gpu_ratio == 0.7  # pending: nothing changed yet
    assert fake.reset_gpu(0) is False
    collector.release()
    with pytest.raises(NodeDown):
        tick(fake, collector)
    assert fake.reset_gpu(0) is True
    collector.reacquire()
    assert tick(fake, collector)[0].util_gpu_ratio is None


# -- an unprivileged agent ---------------------------------------------------------------------


def test_no_permission_is_remembered_not_counted_every_interval(make_collector: Make) -> None:
    fake = FakeNvml([hopper(process_pids=[1234]), volta()], privileged=False)
    collector = make_collector(fake)
    collector.open()
    for _ in range(3):
        samples = tick(fake, collector)
        assert [s.compute_processes for s in samples] == [None, None]
        assert [s.error for s in samples] == [None, None]
        assert collector.errors_last_interval == 0
    assert fake.calls_to("nvmlDeviceGetComputeRunningProcesses", 0) == 1
