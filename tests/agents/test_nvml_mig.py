"""MIG on the pynvml fake: one sample per MIG instance with its identity, share, memory and processes; the
parent's GPU-wide readings on every instance; instances attributed on their own."""

from __future__ import annotations

import pynvml

from gpufleet.agents.allocation import Allocation
from gpufleet.agents.collectors.nvml_mig import profile_of
from gpufleet.agents.runner import stamp
from tests.fakes.fake_pynvml import FakeMig, FakeNvml, h100

ON = (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)
GIB = 1024**3


def mig_gpu() -> FakeNvml:
    return FakeNvml([
        h100("GPU-p0", mig_mode=ON, power_mw=350_000, temp_gpu_c=61, mig_instances=[
            FakeMig("MIG-a", gpu_instance_id=7, profile="1g.10gb", mem_used=2 * GIB, process_pids=[11]),
            FakeMig("MIG-b", gpu_instance_id=1, profile="3g.40gb", gi_slices=3, ci_slices=3, mem_total=40 * GIB),
        ]),
        h100("GPU-p1", power_mw=500_000, util_gpu_pct=90),
    ])


def test_profile_from_the_mig_device_name() -> None:
    assert profile_of("NVIDIA H100 80GB HBM3 MIG 1g.10gb") == "1g.10gb"
    assert profile_of("NVIDIA H100 80GB HBM3") is None


def test_a_mig_gpu_is_one_sample_per_instance_with_its_share(make_collector) -> None:
    fake = mig_gpu()
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    fake.advance(1.0)
    samples = collector.collect(0)
    assert [(s.index, s.uuid, s.parent_uuid) for s in samples] == [
        (0, "MIG-a", "GPU-p0"), (0, "MIG-b", "GPU-p0"), (1, "GPU-p1", None)]
    a, b, whole = samples
    assert (a.gpu_instance_id, a.compute_instance_id, a.mig_profile) == (7, 0, "1g.10gb")
    assert (a.slices, a.slices_total) == (1, 7)
    assert (b.mig_profile, b.slices, b.slices_total) == ("3g.40gb", 3, 7)
    assert (a.mem_used_bytes, a.compute_processes, b.mem_total_bytes, b.compute_processes) == (2 * GIB, 1, 40 * GIB, 0)
    assert a.temp_gpu_c == b.temp_gpu_c == 61.0  # GPU-wide readings are the parent's, on every instance
    assert a.power_w == 350.0 / 7
    assert b.energy_interval_j == 350.0 * 3 / 7  # one second at 350 W, its share
    assert (a.energy_j, a.util_gpu_ratio, a.tensor_active_ratio) == (None, None, None)
    assert (whole.slices, whole.parent_uuid, whole.util_gpu_ratio) == (None, None, 0.9)
    views = {v.uuid: v for v in collector.devices()}
    assert [p.pid for p in views["MIG-a"].processes] == [11]
    assert views["MIG-a"].parent_uuid == "GPU-p0"
    # instances are attributed on their own (by MIG UUID), a parent-wide answer reaches every instance
    got = stamp(samples, {"MIG-a": Allocation("acme", "1"), "GPU-p0": Allocation("beta"), 1: Allocation("c")}, {})
    assert [(s.uuid, s.tenant) for s in got] == [("MIG-a", "acme"), ("MIG-b", "beta"), ("GPU-p1", "c")]


def test_a_lost_mig_gpu_reports_each_instance_in_error(make_collector) -> None:
    fake = mig_gpu()
    collector = make_collector(fake)
    collector.open()
    collector.collect(0)
    fake.gpus[0].lost = True
    fake.advance(1.0)
    samples = collector.collect(0)
    assert [(s.uuid, s.slices, s.error is not None) for s in samples] == [
        ("MIG-a", 1, True), ("MIG-b", 3, True), ("GPU-p1", None, False)]


def test_the_call_budget_counts_mig_instances(make_collector) -> None:
    fake = mig_gpu()
    collector = make_collector(fake, call_budget_per_gpu=16)
    collector.open()
    collector.collect(0)
    fake.advance(1.0)
    collector.collect(0)
    assert collector.stats.nvml_call_budget == 2 * 16 + 2 * 3
