"""Item 2: what the node agent costs per collection interval, for one 8-GPU node.

The agent runs in a child process of its own (so its peak RSS is the agent's alone, without this
suite's chDB): the real `NodeAgent` (collect, stamp tenant/job, OpenTelemetry SDK instruments and
collection, the Kafka exporter's encoding, the on-disk spool with fsync) with its OTLP receiver
listening, and the real `Sender` producing to the embedded broker, over the simulated backend.
NVML itself is not measured (no GPU here): the simulated collector's own time is measured apart
and subtracted, and named as such.

Two phases: `ticks` intervals back to back (simulated time advancing one interval per tick; CPU
per interval is steady-state work), then `realtime_s` seconds at the real 1 s cadence (`run_one`),
which adds what an agent spends between intervals (timers, the sender's and receiver's threads).

Beside them, `nvml_calls` runs the real NVML collector on the pynvml fake (8 H100s, 18 NVLinks
each) and counts, from the fake's own call counters, the NVML queries per GPU per interval (event
waits excluded), and the collector's process CPU per interval there (the fake's Python stands in for
the driver's C, so that CPU is an upper bound of the collector's own share, not NVML's cost).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike `ru_maxrss`, it starts afresh at exec, so the
    pages of the (large, chDB-loaded) parent the child was forked from do not count."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(bootstrap: str, topic: str, ticks: int, realtime_s: float) -> dict[str, Any]:
    import resource
    import threading

    import psutil
    from kafka import KafkaProducer

    from gpufleet.agents.collectors.simulated import SimulatedFleet
    from gpufleet.agents.otlp.receiver import OtlpReceiver, ReceiverSettings
    from gpufleet.agents.runner import NodeAgent, run_one
    from gpufleet.agents.sender import Sender
    from gpufleet.agents.spool import Spool
    from gpufleet.config import KafkaConfig
    from gpufleet.kafka import producer_kwargs

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    start_ms = (time.time_ns() // 1_000_000 // 1000) * 1000
    fleet = SimulatedFleet(nodes=1, gpus_per_node=8, start_ms=start_ms, faults=[])
    node = fleet.nodes[0]
    collect_cpu = [0.0]
    inner_collect = node.collect

    def timed_collect(now_ms: int) -> Any:
        t = time.thread_time()
        try:
            return inner_collect(now_ms)
        finally:
            collect_cpu[0] += time.thread_time() - t

    node.collect = timed_collect  # type: ignore[method-assign]
    parts_cpu: dict[str, float] = {"otel_collect": 0.0, "export": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                parts_cpu[name] += time.thread_time() - t
        return wrapper
    kafka_kw = producer_kwargs(KafkaConfig(bootstrap_servers=bootstrap, topic=topic))
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-spool-") as spool_dir:
        spool = Spool(Path(spool_dir), 64 * 1024 * 1024)
        receiver = OtlpReceiver(ReceiverSettings(port=0), gpus=dict(enumerate(node.gpu_uuids))).start()
        sender = Sender(lambda: KafkaProducer(**kafka_kw), topic, [(node.name, spool)]).start()
        agent = NodeAgent(cluster="bench", node=node.name, collector=node, spool=spool,
                          allocation=node.allocation_source(), flops=receiver.flops_source,
                          on_gpus=receiver.set_gpus, send_errors=lambda: sender.errors_for(0))
        agent.meter.collect = timed("otel_collect", agent.meter.collect)  # type: ignore[method-assign]
        agent.exporter.export = timed("export", agent.exporter.export)  # type: ignore[method-assign]
        message_bytes = 0
        for i in range(20):  # warm-up: imports, first OTel collection, producer connection
            agent.tick(start_ms + (i + 1) * 1000, 1000)
            sender.notify()
        collect_cpu[0] = 0.0
        for k in parts_cpu:
            parts_cpu[k] = 0.0
        c0, w0, t0 = cpu(), time.perf_counter(), time.thread_time()
        for i in range(20, 20 + ticks):
            report = agent.tick(start_ms + (i + 1) * 1000, 1000)
            sender.notify()
            if report is not None:
                from gpufleet import wire

                message_bytes = len(wire.encode(report))
        deadline = time.monotonic() + 30
        while sender.acked_total < 20 + ticks and time.monotonic() < deadline:
            time.sleep(0.01)
        steady_cpu, steady_wall, steady_collect = cpu() - c0, time.perf_counter() - w0, collect_cpu[0]
        steady_main = time.thread_time() - t0
        steady_parts = dict(parts_cpu)
        acked = sender.acked_total
        collect_cpu[0] = 0.0
        c1 = cpu()
        intervals = run_one(agent, interval_ms=1000, stop=threading.Event(), duration_s=realtime_s)
        realtime_cpu, realtime_collect = cpu() - c1, collect_cpu[0]
        sender.stop(5.0)
        agent.close()
        receiver.close()
    peak_rss = _peak_rss_mb()
    return {
        "gpus": 8,
        "message_bytes": message_bytes,
        "ticks": ticks,
        "acked": acked,
        "steady_cpu_ms_per_interval": steady_cpu / ticks * 1000,
        "steady_collect_cpu_ms_per_interval": steady_collect / ticks * 1000,
        "steady_wall_ms_per_interval": steady_wall / ticks * 1000,
        "steady_breakdown_ms_per_interval": {
            "simulated_collector": steady_collect / ticks * 1000,
            "otel_sdk_collect": (steady_parts["otel_collect"] - steady_parts["export"]) / ticks * 1000,
            "exporter_encode_and_spool_fsync": steady_parts["export"] / ticks * 1000,
            "rest_of_tick": (steady_main - steady_parts["otel_collect"] - steady_collect) / ticks * 1000,
            "sender_and_other_threads": (steady_cpu - steady_main) / ticks * 1000,
        },
        "realtime_intervals": intervals,
        "realtime_cpu_ms_per_interval": realtime_cpu / max(1, intervals) * 1000,
        "realtime_collect_cpu_ms_per_interval": realtime_collect / max(1, intervals) * 1000,
        "peak_rss_mb": peak_rss,
        "rss_at_end_mb": psutil.Process().memory_info().rss / 2**20,
        "chdb_loaded": "chdb" in sys.modules,
    }


PREVIOUS_READER_CALLS_PER_GPU = 108.0
"""The reader before the field-value batches (commit c9fa212), on the same fake and GPUs: measured by
running its nvml.py against `nvml_calls`' fake (10 steady intervals, 8 H100s)."""


def nvml_calls(intervals: int = 200, gpus: int = 8) -> dict[str, Any]:
    """NVML queries per GPU per interval and the collector's CPU per interval, on the pynvml fake."""
    import resource

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpufleet.agents.collectors.nvml import NvmlCollector
    from tests.fakes.fake_pynvml import FakeNvml, h100

    fake = FakeNvml([h100(f"GPU-bench-{i}", pci=(0, 0x18 + i, 0), gpm_metrics={2: 50.0}) for i in range(gpus)])
    collector = NvmlCollector(nvml=fake, event_wait_ms=100, clock=lambda: fake.now_us / 1e6)

    def queries() -> int:
        return sum(n for (name, g), n in fake.calls.items() if g is not None and name != "nvmlEventSetWait")

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    try:
        collector.open()
        for _ in range(3):  # attach, first GPM pair
            fake.advance(1.0)
            collector.collect(0)
        q0, c0, reported = queries(), cpu(), 0
        for _ in range(intervals):
            fake.advance(1.0)
            collector.collect(0)
            reported += collector.stats.nvml_calls
        q1, c1 = queries(), cpu()
    finally:
        collector.close()
    per_gpu = (q1 - q0) / intervals / gpus
    return {
        "nvml_gpus": gpus,
        "nvml_intervals": intervals,
        "nvml_calls_per_gpu_per_interval": per_gpu,
        "nvml_calls_reported_per_gpu_per_interval": reported / intervals / gpus,
        "nvml_calls_previous_reader_per_gpu_per_interval": PREVIOUS_READER_CALLS_PER_GPU,
        "nvml_collector_cpu_ms_per_interval_on_fake": (c1 - c0) / intervals * 1000,
    }


def run(ticks: int = 500, realtime_s: float = 10.0) -> dict[str, Any]:
    """Start a broker, run the agent child, and derive the figures against the targets."""
    import uuid

    from gpufleet import kafka
    from gpufleet.config import KafkaConfig
    from gpufleet.embedded.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        topic = f"bench-agent-{uuid.uuid4().hex[:8]}"
        kafka.ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap, topic=topic),
                            [topic], partitions=1)
        out = subprocess.run(
            [sys.executable, "-m", "bench.agent", "--child", broker.bootstrap, topic, str(ticks), str(realtime_s)],
            capture_output=True, text=True, timeout=300, check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"agent child failed ({out.returncode}): {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for phase in ("steady", "realtime"):
        r[f"{phase}_cpu_ms_per_interval_excluding_collector"] = (
            r[f"{phase}_cpu_ms_per_interval"] - r[f"{phase}_collect_cpu_ms_per_interval"])
    r["cpu_ms_per_interval"] = r["realtime_cpu_ms_per_interval_excluding_collector"]
    r["target_cpu_ms_per_interval"] = 5.0
    r["target_peak_rss_mb"] = 80.0
    r["cpu_ratio_to_target"] = r["cpu_ms_per_interval"] / r["target_cpu_ms_per_interval"]
    r["rss_ratio_to_target"] = r["peak_rss_mb"] / r["target_peak_rss_mb"]
    r.update(nvml_calls())
    return r


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))))
    else:
        print(json.dumps(run(), indent=2))
