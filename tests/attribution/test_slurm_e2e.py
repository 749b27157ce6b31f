"""Slurm without a prolog, end to end: GPU processes on the pynvml fake -> their jobs from a fake /proc and
cgroup tree -> the agent -> Kafka -> the ingester -> ClickHouse -> `gpufleet usage`. One GPU changes jobs
mid-hour; another is held all hour by a job that runs nothing on it (seen in its cgroup v1 device list)."""

from __future__ import annotations

from pathlib import Path

from gpufleet.agents.allocation import build_source
from gpufleet.agents.collectors.nvml import NvmlCollector
from gpufleet.config import AllocationConfig
from gpufleet.pipeline.store.client import Target
from tests.agents.test_slurm_source import V1, FakeNode
from tests.attribution.harness import T_HOUR, billed_seconds, close_all, deliver_and_ingest, node_agent, tick
from tests.fakes.fake_pynvml import FakeNvml, h100

MINUTE = 60_000


def test_jobs_found_from_processes_and_device_lists_bill_exactly(broker, ch_target: Target, topic,
                                                                 tmp_path: Path) -> None:
    node = FakeNode(tmp_path / "host")
    node.process(4200, 42, "acme")
    node.process(5000, 50, "beta")
    node.process(900, 9, "gamma", cgroup=V1)  # job 9's batch shell: on no GPU
    node.job_cgroup_v1(9, [1], [900])
    fake = FakeNvml([h100("GPU-s0", process_pids=[4200], power_mw=400_000, util_gpu_pct=80), h100("GPU-s1")])
    collector = NvmlCollector(nvml=fake, event_wait_ms=20, clock=lambda: fake.now_us / 1e6, interval_ms=MINUTE)
    collector.open()
    source = build_source(AllocationConfig(source="slurm", proc_root=str(node.proc), cgroup_root=str(node.cgroup)),
                          devices=collector.devices)
    agent = node_agent(tmp_path / "spool", "slurm-node-1", collector, source)

    def world(t: int) -> None:
        fake.advance(60.0)
        if (t - T_HOUR) // MINUTE == 31:  # job 42 ended after 30 minutes; job 50 started on the GPU
            fake.gpus[0].process_pids = [5000]

    try:
        sent = tick([agent], range(T_HOUR + MINUTE, T_HOUR + 61 * MINUTE, MINUTE), MINUTE, world)
        deliver_and_ingest(broker, ch_target, topic, [agent], sent)
    finally:
        close_all([agent])
    assert billed_seconds(ch_target) == {"acme": 30 * 60, "beta": 30 * 60, "gamma": 60 * 60}
