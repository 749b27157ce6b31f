"""What a flood of FLOPs points costs the node agent (issue 18 item 7): samples kept, tick time, memory.

The real `NodeAgent` (8 simulated H100s, spool without fsync, no Kafka) ticks every second on the
real clock with its OTLP receiver; a child process posts `rate` one-FLOP delta points per second,
each covering 10 minutes of job time (two requests a second), for `seconds`, against a points budget
of 20,000 a second (twice the default), so the flood is accepted, not shed. Reported: intervals
expected and run, skipped-interval warnings, the slowest tick, requests by HTTP status, and the
agent's RSS before and after. `python -m bench.otlp_flood [--seconds 60] [--rate 18000]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import tempfile
import threading
import time
from typing import Any

U = [f"GPU-{i:08d}-flood" for i in range(8)]
H100 = "NVIDIA H100 80GB HBM3"


class EightH100:
    def collect(self, now_ms: int) -> list[Any]:
        from gpufleet.wire import GpuSample

        return [GpuSample(index=i, uuid=u, model=H100, util_gpu_ratio=0.9) for i, u in enumerate(U)]

    def close(self) -> None:
        pass


def _flood(port: int, per_request: int, seconds: float, out: Any) -> None:
    """Child process: post `per_request` points twice a second to the receiver; report statuses."""
    import http.client

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    kv = rm.resource.attributes.add(key="gpu.uuid")
    kv.value.string_value = U[0]
    metric = rm.scope_metrics.add().metrics.add(name="gpufleet.job.flops", unit="{flop}")
    metric.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    metric.sum.is_monotonic = True
    end_ns = time.time_ns()
    for k in range(per_request):
        metric.sum.data_points.add(start_time_unix_nano=end_ns - 600 * 10**9 - k, time_unix_nano=end_ns - k,
                                   as_double=1.0)
    body = req.SerializeToString()
    statuses: dict[int, int] = {}
    stop_at = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < stop_at:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/metrics", body=body, headers={"Content-Type": "application/x-protobuf"})
            r = conn.getresponse()
            r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1
        except OSError:
            statuses[0] = statuses.get(0, 0) + 1
        finally:
            conn.close()
        next_at += 0.5
        time.sleep(max(0.0, next_at - time.monotonic()))
    out.put(statuses)


class _Skips(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.skipped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "skipped" in record.getMessage():
            self.skipped += 1


def run(seconds: float = 60.0, rate: int = 18_000, budget: int = 20_000) -> dict[str, Any]:
    """`budget`: the receiver's `max_points_per_s` (default 10,000; 20,000 here, so the flood is accepted)."""
    import psutil

    from gpufleet.agents.otlp import OtlpReceiver, ReceiverSettings
    from gpufleet.agents.runner import NodeAgent, run_many
    from gpufleet.agents.spool import Spool

    skips = _Skips()
    logging.getLogger("gpufleet.agents.runner").addHandler(skips)
    me = psutil.Process()
    receiver = OtlpReceiver(ReceiverSettings(port=0, max_points_per_s=budget), gpus=dict(enumerate(U))).start()
    with tempfile.TemporaryDirectory() as spool_dir:
        agent = NodeAgent(cluster="bench", node="flood", collector=EightH100(),
                          spool=Spool(spool_dir, 256 * 1024 * 1024, fsync=False),
                          flops=receiver.flops_source, on_gpus=receiver.set_gpus)
        ticks_ms: list[float] = []
        original = agent.tick

        def timed(now_ms: int, interval_ms: int) -> Any:
            t = time.perf_counter()
            try:
                return original(now_ms, interval_ms)
            finally:
                ticks_ms.append((time.perf_counter() - t) * 1000)

        agent.tick = timed  # type: ignore[method-assign]
        rss_before = me.memory_info().rss / 2**20
        queue: Any = multiprocessing.get_context("spawn").Queue()
        child = multiprocessing.get_context("spawn").Process(
            target=_flood, args=(receiver.address[1], rate // 2, seconds, queue))
        child.start()
        ran = run_many([agent], interval_ms=1000, stop=threading.Event(), duration_s=seconds)
        statuses = queue.get(timeout=60)
        child.join(timeout=30)
        rss_after = me.memory_info().rss / 2**20
        receiver.close()
        agent.close()
    return {
        "seconds": seconds, "points_per_s": rate, "budget_points_per_s": budget,
        "intervals_expected": int(seconds), "intervals_run": ran,
        "skipped_warnings": skips.skipped, "slowest_tick_ms": round(max(ticks_ms), 1),
        "median_tick_ms": round(sorted(ticks_ms)[len(ticks_ms) // 2], 1), "requests_by_status": statuses,
        "agent_rss_mb": [round(rss_before, 1), round(rss_after, 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=18_000)
    parser.add_argument("--budget", type=int, default=20_000, help="the receiver's max_points_per_s")
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.rate, args.budget), indent=2))


if __name__ == "__main__":
    main()
