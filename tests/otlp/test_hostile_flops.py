"""Hostile or broken FLOPs reporters on a shared node (issue 18 items 5, 6, 7, 9): a real agent and receiver.

A `NodeAgent` with three H100s (peak 989e12 FLOP/s) and its OTLP receiver over real HTTP; the
receiver's clock is pinned, the agent ticks at chosen times, and every expected amount is
computed by hand. Each test reproduces what the adversarial probe did to the agent before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from gpufleet.agents.allocation import Allocation
from gpufleet.agents.otlp import AttributionSettings, OtlpReceiver, ReceiverSettings
from gpufleet.agents.runner import NodeAgent, run_many
from gpufleet.agents.spool import Spool
from gpufleet.wire import NodeReport, decode, encode
from tests.otlp.otlp_builders import DELTA, Dp, Response, post, request

pytestmark = pytest.mark.integration  # starts a server or a process

MB = 1024 * 1024
H100 = "NVIDIA H100 80GB HBM3"
PEAK = 989e12
U0, U1, U2 = "GPU-00000000-aaaa", "GPU-11111111-bbbb", "GPU-22222222-cccc"
T0 = 1_900_000_000_000  # agent clock, ms (after the receiver started: counters count)


class ThreeH100:
    def collect(self, now_ms: int) -> list:
        from gpufleet.wire import GpuSample

        return [GpuSample(index=i, uuid=u, model=H100, util_gpu_ratio=0.9) for i, u in enumerate((U0, U1, U2))]

    def close(self) -> None:
        pass


class FixedAllocation:
    def __init__(self, by_index: Mapping[int, Allocation]) -> None:
        self.by_index = dict(by_index)

    def read(self) -> dict[int, Allocation]:
        return dict(self.by_index)


@dataclass
class Node:
    agent: NodeAgent
    receiver: OtlpReceiver
    clock: list[int]

    def tick(self, at_ms: int, interval_ms: int = 1000) -> NodeReport:
        self.clock[0] = at_ms
        report = self.agent.tick(at_ms, interval_ms)
        assert report is not None
        return decode(encode(report))  # what the ingester would accept

    def post(self, dps: list[Dp], resource: dict[str, object], *, delta: bool = True) -> Response:
        body = request(dps, resource=resource, temporality=DELTA if delta else 1).SerializeToString()  # type: ignore[arg-type]
        return post(self.receiver.address, body)


def node(tmp_path: Path, allocation: Mapping[int, Allocation] | None = None, **settings: object) -> Node:
    clock = [T0 - 1000]
    receiver = OtlpReceiver(ReceiverSettings(port=0, **settings), clock=lambda: clock[0]).start()  # type: ignore[arg-type]
    agent = NodeAgent(cluster="lab", node="n1", collector=ThreeH100(), spool=Spool(tmp_path, MB, fsync=False),
                      allocation=FixedAllocation(allocation) if allocation is not None else None,
                      flops=receiver.flops_source, on_gpus=receiver.set_gpus)
    n = Node(agent, receiver, clock)
    n.tick(T0 - 1000)  # the receiver learns the GPUs, their jobs and ceilings
    return n


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Node]:
    """GPU 0 runs acme's job train-1, GPU 1 beta's job infer-2, GPU 2 is unallocated."""
    n = node(tmp_path, {0: Allocation("acme", "train-1"), 1: Allocation("beta", "infer-2")})
    yield n
    n.receiver.close()
    n.agent.close()


def one_second(value: float, **attrs: object) -> Dp:
    """A delta point covering the second before T0 (job clock = agent clock here)."""
    return Dp(value, start_s=(T0 - 1000) / 1000, time_s=T0 / 1000, attrs=attrs or None)  # type: ignore[arg-type]


def flops(report: NodeReport) -> dict[str, float | None]:
    return {g.uuid: g.flops_measured for g in report.gpus}


def partial(r: Response) -> tuple[int, str]:
    assert r.status == 200
    p = ExportMetricsServiceResponse.FromString(r.body).partial_success
    return p.rejected_data_points, p.error_message


# -- item 5: bounds and whose GPUs ----------------------------------------------------------------------


def test_a_job_cannot_report_flops_on_another_jobs_gpu(shared: Node) -> None:
    shared.clock[0] = T0 - 1000
    honest = shared.post([one_second(5e14)], {"gpu.uuid": U0, "job.id": "train-1"})
    assert partial(honest) == (0, "")
    # The probe: 1e20 FLOPs on another tenant's GPU showed MFU 101,000x.
    hostile = shared.post([one_second(1e20)], {"gpu.uuid": U0, "job.id": "infer-2"})
    rejected, message = partial(hostile)
    assert rejected == 1
    assert f"GPU {U0} is allocated to another job, not to job 'infer-2'" in message
    anonymous = shared.post([one_second(1e12)], {"gpu.uuid": U0})
    assert partial(anonymous)[0] == 1  # the GPU's job is known: a point must name it
    wandering = shared.post([one_second(1e12)], {"gpu.uuid": U2, "job.id": "train-1"})
    assert f"GPU {U2} is not allocated to job 'train-1'" in partial(wandering)[1]
    # A job the allocation does not know may use a GPU whose job it does not know.
    assert partial(shared.post([one_second(2e14)], {"gpu.uuid": U2, "job.id": "side-job"})) == (0, "")
    report = shared.tick(T0)
    assert flops(report) == {U0: 5e14, U1: None, U2: 2e14}
    assert report.agent.otlp_points_rejected_total == 3


def test_many_reporters_together_are_clamped_at_the_gpus_peak_and_the_rest_follows(
    shared: Node, caplog: pytest.LogCaptureFixture
) -> None:
    # The probe: 200 concurrent clients pushed a GPU to MFU 1.11. Here 200 series of 5.5e12 each
    # (1.1e15 in all, 1.112x the H100's 989e12 FLOP/s) over one second, from 8 threads at once.
    shared.clock[0] = T0 - 1000
    statuses: list[tuple[int, str]] = []

    def client(first: int) -> None:
        for i in range(first, 200, 8):
            statuses.append(partial(shared.post([one_second(5.5e12)], {"gpu.uuid": U0, "job.id": "train-1",
                                                                          "rank": i})))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert statuses == [(0, "")] * 200
    first = shared.tick(T0)
    assert flops(first)[U0] == PEAK  # MFU 1.0 at most, never 1.11
    assert first.agent.flops_clamped_total == 1
    assert "jobs reported more FLOPs than their GPUs' peak x interval in 1 GPU-interval(s)" in caplog.text
    # The excess is carried, not lost (a job whose steps outlast its export interval reports in lumps).
    second = shared.tick(T0 + 1000)
    assert flops(second)[U0] == 1.1e15 - PEAK
    assert second.agent.flops_clamped_total == 1
    assert flops(shared.tick(T0 + 2000))[U0] is None


def test_a_point_claiming_more_than_its_gpus_can_do_in_ten_minutes_is_rejected(tmp_path: Path) -> None:
    n = node(tmp_path)
    try:
        n.clock[0] = T0 - 1000
        # 600 s at peak on one H100 is 5.934e17: 1e18 cannot be real, whatever its span says.
        r = n.post([one_second(1e18)], {"gpu.uuid": U1})
        rejected, message = partial(r)
        assert rejected == 1
        assert "is more than its 1 GPU(s) can execute at peak (5.934e+17)" in message
        assert flops(n.tick(T0)) == {U0: None, U1: None, U2: None}
    finally:
        n.receiver.close()
        n.agent.close()


# -- item 6: overflow never spreads -------------------------------------------------------------------------


def test_two_huge_points_cost_only_themselves(tmp_path: Path) -> None:
    n = node(tmp_path)  # no allocation source: any GPU of the node is allowed (docs/measured-mfu.md)
    try:
        n.clock[0] = T0 - 1000
        assert partial(n.post([one_second(3e14)], {"gpu.uuid": U1, "job.id": "honest"})) == (0, "")
        first = n.tick(T0 - 500)  # half of the honest job's second is released
        assert flops(first) == {U0: None, U1: 1.5e14, U2: None}
        n.clock[0] = T0 - 400
        # The probe: two points of 1.7e308 on one GPU made every GPU's FLOPs null for good.
        r = n.post([Dp(1.7e308, start_s=(T0 - 1400) / 1000, time_s=(T0 - 400) / 1000, attrs={"k": k})
                    for k in ("a", "b")], {"gpu.uuid": U0})
        assert partial(r)[0] == 2
        second = n.tick(T0)
        assert flops(second) == {U0: None, U1: 1.5e14, U2: None}  # the rest of the honest second
    finally:
        n.receiver.close()
        n.agent.close()


class BrokenSource:
    """A FLOPs source that returns what no GPU could have done."""

    def take(self, now_ms: int, interval_ms: int) -> dict[str, float]:
        return {U0: float("inf"), U1: 1e300, U2: 2e14}


def test_the_agent_never_sends_a_non_finite_or_impossible_flops_value(tmp_path: Path) -> None:
    agent = NodeAgent(cluster="lab", node="n1", collector=ThreeH100(), spool=Spool(tmp_path, MB, fsync=False),
                      flops=BrokenSource())
    try:
        report = agent.tick(T0, 1000)
        assert report is not None
        assert flops(report) == {U0: None, U1: None, U2: 2e14}
        assert report.agent.flops_clamped_total == 2
        assert decode(encode(report)) == report
    finally:
        agent.close()


# -- item 9: the series table -----------------------------------------------------------------------------------


def test_a_full_series_table_answers_every_dropped_point_with_partial_success(tmp_path: Path) -> None:
    n = node(tmp_path, attribution=AttributionSettings(max_series=20, max_series_per_job=20))
    try:
        n.clock[0] = T0 - 1000
        filler = [one_second(1.0, **{"gpu.uuid": U2, "junk": i}) for i in range(20)]
        assert partial(n.post(filler, {})) == (0, "")
        # The probe: a new job's points answered 200 OK with no notice, and dropped.
        late = n.post([one_second(4e14)], {"gpu.uuid": U1, "job.id": "late"})
        rejected, message = partial(late)
        assert rejected == 1
        assert "this agent already tracks 20 series" in message
        assert n.receiver.stats().points_rejected_total == 1
    finally:
        n.receiver.close()
        n.agent.close()


def test_one_job_filling_its_series_quota_leaves_room_for_the_others(tmp_path: Path) -> None:
    n = node(tmp_path, attribution=AttributionSettings(max_series=30, max_series_per_job=20))
    try:
        n.clock[0] = T0 - 1000
        filler = [one_second(1.0, junk=i) for i in range(30)]
        rejected, message = partial(n.post(filler, {"gpu.uuid": U2, "job.id": "noisy"}))
        assert rejected == 10
        assert "job 'noisy' already has 20 series" in message
        assert partial(n.post([one_second(4e14)], {"gpu.uuid": U1, "job.id": "late"})) == (0, "")
        assert flops(n.tick(T0)) == {U0: None, U1: 4e14, U2: 20.0}
    finally:
        n.receiver.close()
        n.agent.close()


# -- item 7: a flood of pending spans never costs a sample ---------------------------------------------------


class WorkClock:
    """Simulated time: it jumps over each wait (nothing sleeps) and advances by the CPU time the agent's
    loop (this thread) spends working, so a slow interval is slow whatever else the machine runs.

    `between(at_ms)` runs inside each wait with the clock stopped at `at_ms`: the flood arrives from other
    processes in parallel, so its cost is not the agent's, but the agent's own work is timed for real.
    """

    def __init__(self, start_ms: int, between: Callable[[int], None]) -> None:
        self._base = start_ms
        self._loop = threading.get_ident()  # the thread that runs the agent's loop (and constructs this)
        self._t0 = time.thread_time()
        self._between = between
        self._stopped = False

    def now_ms(self) -> int:
        if self._stopped or threading.get_ident() != self._loop:
            return self._base  # the receiver's handlers read the arrival time while the clock stands
        return self._base + int((time.thread_time() - self._t0) * 1000)

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        self._base, self._stopped = self.now_ms() + round(seconds * 1000), True
        self._between(self._base)
        self._t0, self._stopped = time.thread_time(), False
        return stop.is_set()


def test_a_flood_of_long_spans_costs_no_sample(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The probe: 20,000 one-FLOP points per second, each spread over 10 minutes, made every interval walk
    # all pending entries: intervals skipped, 25 of 60 samples stored. Here 10,000 such points arrive
    # before each of 15 intervals of 600 ms (16,667 per second), all accepted.
    interval, batch, n = 600, 10_000, 15
    job_end_s = T0 / 1000
    flood = request([Dp(1.0, start_s=job_end_s - 600 - k / 1000, time_s=job_end_s - k / 1000) for k in range(batch)],
                    resource={"gpu.uuid": U0}, temporality=DELTA).SerializeToString()
    statuses: list[int] = []
    clock = WorkClock(T0 - T0 % interval, lambda _at: statuses.append(post(receiver.address, flood).status))
    receiver = OtlpReceiver(ReceiverSettings(port=0, max_points_per_s=20_000), clock=clock.now_ms,
                            gpus={0: U0, 1: U1, 2: U2}).start()
    agent = NodeAgent(cluster="lab", node="n1", collector=ThreeH100(), spool=Spool(tmp_path, MB, fsync=False),
                      flops=receiver.flops_source, on_gpus=receiver.set_gpus)
    reports: list[NodeReport] = []
    try:
        ticks = run_many([agent], interval_ms=interval, stop=threading.Event(), clock=clock,
                         duration_s=n * interval / 1000, after_tick=lambda: reports.append(agent.exporter.last_report))
        stats = receiver.attribution_stats()
    finally:
        receiver.close()
        agent.close()
    assert "skipped" not in caplog.text
    assert (ticks, len(reports)) == (n, n)
    assert [r.time_ms - reports[0].time_ms for r in reports] == [k * interval for k in range(n)]
    assert statuses == [200] * n  # every interval waited for its time: none started late
    # Each batch releases 10,000 FLOPs over 600 s: 10 per 600 ms interval, from the interval after it came.
    # A tick reads the FLOPs a few ms of the loop's own CPU time after its nominal instant (that is what the
    # WorkClock measures), and that drift varies with the machine's load: 1 FLOP is 60 ms of it.
    got = [flops(r)[U0] for r in reports]
    assert all(abs(g - 10.0 * k) < 1.0 for k, g in enumerate(got)), got
    assert stats.changes <= 2 * n  # one begin and one end instant per batch, not one entry per point
