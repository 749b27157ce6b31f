"""MIG instances of two tenants on one GPU, and shared GPUs, end to end: the pynvml fake -> the agent (with
the Kubernetes or the Slurm source) -> Kafka -> the ingester -> ClickHouse -> `gpufleet usage`.

A MIG instance is billed share x seconds (its compute slices over the GPU's 7); the parent's failing health
applies to every instance; a GPU two pods hold through time-slicing replicas is split evenly, one two Slurm
jobs share is split by their processes' SM utilization. Expected values are worked out by hand."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pynvml

from gpufleet.agents.allocation import build_source
from gpufleet.agents.collectors.nvml import NvmlCollector
from gpufleet.config import AllocationConfig
from gpufleet.pipeline.store.client import Target
from tests.agents.test_slurm_source import FakeNode
from tests.attribution.harness import T_HOUR, billed_seconds, close_all, deliver_and_ingest, node_agent, tick
from tests.fakes.fake_kubelet import FakeKubelet, gpu_devices
from tests.fakes.fake_pynvml import FakeMig, FakeNvml, h100

MINUTE = 60_000
ON = (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)
DBE = (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)


def collector_on(fake: FakeNvml) -> NvmlCollector:
    collector = NvmlCollector(nvml=fake, event_wait_ms=20, clock=lambda: fake.now_us / 1e6, interval_ms=MINUTE)
    collector.open()
    return collector


def seconds(x: Fraction) -> float:
    return float(x)


def test_mig_instances_of_two_tenants_and_a_time_sliced_gpu(broker, ch_target: Target, ch_client, topic,
                                                             tmp_path: Path) -> None:
    fake = FakeNvml([
        h100("GPU-m0", mig_mode=ON, power_mw=300_000, mig_instances=[
            FakeMig("MIG-acme", gpu_instance_id=9, profile="1g.10gb", process_pids=[10]),
            FakeMig("MIG-beta", gpu_instance_id=2, profile="3g.40gb", gi_slices=3, ci_slices=3, process_pids=[20]),
        ]),
        h100("GPU-ts", power_mw=500_000, util_gpu_pct=70, process_pids=[30, 40]),
    ])
    collector = collector_on(fake)
    sock = tmp_path / "kubelet.sock"
    kubelet = FakeKubelet(sock, {"nvidia.com/mig-1g.10gb": ["MIG-acme"], "nvidia.com/mig-3g.40gb": ["MIG-beta"],
                                 "nvidia.com/gpu": gpu_devices(["GPU-ts"], replicas=4)}).start()
    kubelet.schedule("acme", "notebook", {"nvidia.com/mig-1g.10gb": ["MIG-acme"]})
    kubelet.schedule("beta", "train", {"nvidia.com/mig-3g.40gb": ["MIG-beta"]})
    kubelet.schedule("gamma", "infer", {"nvidia.com/gpu": ["GPU-ts::0"]})
    kubelet.schedule("delta", "infer", {"nvidia.com/gpu": ["GPU-ts::2"]})
    source = build_source(AllocationConfig(source="kubernetes", kubelet_socket=str(sock), kubelet_timeout_s=2.0))
    agent = node_agent(tmp_path / "spool", "mig-node", collector, source)

    def world(t: int) -> None:
        fake.advance(60.0)
        if (t - T_HOUR) // MINUTE == 51:  # a double-bit ECC error on the MIG GPU: failing, for every instance
            fake.gpus[0].ecc[DBE] = 1

    try:
        sent = tick([agent], range(T_HOUR + MINUTE, T_HOUR + 61 * MINUTE, MINUTE), MINUTE, world)
        deliver_and_ingest(broker, ch_target, topic, [agent], sent)
    finally:
        close_all([agent])
        kubelet.stop()
    healthy = Fraction(50 * 60)  # minutes 1..50 healthy; 51..60 failing, not billed (billing.exclude_states)
    assert billed_seconds(ch_target) == {
        "acme": seconds(healthy / 7),       # 1g.10gb: 1 of 7 compute slices
        "beta": seconds(healthy * 3 / 7),   # 3g.40gb: 3 of 7
        "gamma": 30 * 60.0,                 # two pods on replicas of one GPU: an even split of its 60 minutes
        "delta": 30 * 60.0,
    }
    # MFU of an instance is measured against its share of the H100's peak (989 TFLOP/s dense BF16)
    peaks = ch_client.query(f"SELECT gpu_uuid, any(peak_flops), any(mig_profile), any(parent_uuid) "
                            f"FROM {ch_target.database}.gpu_samples GROUP BY gpu_uuid ORDER BY gpu_uuid").result_rows
    assert peaks == [("GPU-ts", 989e12, "", ""), ("MIG-acme", 989e12 / 7, "1g.10gb", "GPU-m0"),
                     ("MIG-beta", 989e12 * 3 / 7, "3g.40gb", "GPU-m0")]


def test_a_gpu_two_slurm_jobs_share_is_split_by_their_utilization(broker, ch_target: Target, topic,
                                                                   tmp_path: Path) -> None:
    node = FakeNode(tmp_path / "host")
    node.process(100, 42, "acme")
    node.process(200, 43, "beta")
    fake = FakeNvml([h100("GPU-sh", power_mw=400_000, util_gpu_pct=100, process_pids=[100, 200],
                          process_sm_util={100: 75, 200: 25})])
    collector = collector_on(fake)
    source = build_source(AllocationConfig(source="slurm", proc_root=str(node.proc), cgroup_root=str(node.cgroup)),
                          devices=collector.devices)
    agent = node_agent(tmp_path / "spool", "slurm-shared", collector, source)
    try:
        sent = tick([agent], range(T_HOUR + MINUTE, T_HOUR + 61 * MINUTE, MINUTE), MINUTE,
                    lambda t: fake.advance(60.0))
        deliver_and_ingest(broker, ch_target, topic, [agent], sent)
    finally:
        close_all([agent])
    # every interval the two jobs' SM samples weigh 75 : 25, so of each 60,000 ms acme gets 45,000 and beta 15,000
    assert billed_seconds(ch_target) == {"acme": 45 * 60.0, "beta": 15 * 60.0}
