"""The per-interval loop: OTel round trip (exact, nulls and XIDs kept), stamping, seq, aligned timing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import NamedTuple

import msgspec
import pytest
from click.testing import CliRunner
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gpufleet.agents.collectors.base import NodeDown, NodeReleased
from gpufleet.agents.kafka_exporter import KafkaMetricExporter
from gpufleet.agents.meter import AgentMeter, Frame, node_resource
from gpufleet.agents.runner import NodeAgent, run_many
from gpufleet.agents.spool import Spool
from gpufleet.cli import cli
from gpufleet.wire import SCHEMA_VERSION, AgentHealth, GpuSample, NodeReport, decode

MB = 1024 * 1024
H100 = "NVIDIA H100 80GB HBM3"

# GPU 0: every counter readable, including False booleans and zero counters (which are not null).
FULL = {
    "index": 0, "uuid": "GPU-aaaa", "model": H100,
    "util_gpu_ratio": 0.73, "util_mem_ratio": 0.41, "mem_used_bytes": 61_203_283_968,
    "mem_total_bytes": 85_520_809_984, "power_w": 512.25, "energy_j": 1_234_567.125, "temp_gpu_c": 61.0,
    "temp_mem_c": 70.5, "clock_sm_mhz": 1980, "clock_mem_mhz": 2619, "clock_event_reasons": 0x24,
    "ecc_corrected_volatile": 3, "ecc_uncorrected_volatile": 0, "ecc_corrected_aggregate": 17,
    "ecc_uncorrected_aggregate": 1, "remapped_rows_correctable": 2, "remapped_rows_uncorrectable": 0,
    "remap_pending": True, "remap_failure": False, "retired_pages": 0, "retired_pages_pending": False,
    "pcie_replay_count": 5, "nvlink_crc_errors": 7, "nvlink_replay_errors": 0, "nvlink_recovery_errors": 1,
    "nvlink_links_down": 0, "xids": [79, 48], "compute_processes": 2, "sm_active_ratio": 0.66,
    "tensor_active_ratio": 0.52, "dram_active_ratio": 0.31,
}
# GPU 1: fell off the bus: no counter at all, an error string and an XID.
LOST = {"index": 1, "uuid": "GPU-bbbb", "model": H100, "error": "GPU is lost (fallen off the bus)", "xids": [79]}
# GPU 2: an older GPU: no model name, few counters, utilization exactly 0.
PARTIAL = {"index": 2, "uuid": "GPU-cccc", "util_gpu_ratio": 0.0, "mem_used_bytes": 0, "temp_gpu_c": 35.5}


def samples() -> list[GpuSample]:
    return [GpuSample(**FULL), GpuSample(**LOST), GpuSample(**PARTIAL)]


class Alloc(NamedTuple):
    tenant: str
    job: str | None


class ScriptedCollector:
    """Returns `batch()` on each collect; raises NodeDown for the calls listed in `down`."""

    def __init__(self, batch=samples, down: frozenset[int] = frozenset()) -> None:
        self.batch = batch
        self.down = down
        self.calls: list[int] = []
        self.closed = False

    def collect(self, now_ms: int) -> list[GpuSample]:
        self.calls.append(now_ms)
        if len(self.calls) - 1 in self.down:
            raise NodeDown("scripted: not answering")
        return self.batch()

    def close(self) -> None:
        self.closed = True


class StaticAllocation:
    def __init__(self, mapping: dict[int, Alloc]) -> None:
        self.mapping = mapping

    def read(self) -> dict[int, Alloc]:
        return dict(self.mapping)


class Flops:
    points_accepted_total = 12
    points_rejected_total = 1

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def take(self, now_ms: int, interval_ms: int) -> dict[str, float]:
        self.asked.append((now_ms, interval_ms))
        return {"GPU-aaaa": 1.25e15, "GPU-not-here": 9.0}


class FakeClock:
    """Wall time that moves only when waited on (or when a test moves it)."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        self.now += round(seconds * 1000)
        return stop.is_set()


def make_agent(spool_dir: Path, collector=None, **kwargs) -> NodeAgent:
    return NodeAgent(cluster="c1", node=kwargs.pop("node", "node-7"), collector=collector or ScriptedCollector(),
                     spool=Spool(spool_dir, MB), **kwargs)


def spooled(agent: NodeAgent) -> list[NodeReport]:
    return [decode(e.data) for e in agent.spool.peek(limit=1000)]


def without_timing(report: NodeReport) -> NodeReport:
    return msgspec.structs.replace(report, agent=msgspec.structs.replace(report.agent, collect_seconds=0.0))


def test_one_interval_round_trips_through_otel_exactly(tmp_path: Path) -> None:
    flops = Flops()
    agent = make_agent(tmp_path, allocation=StaticAllocation({0: Alloc("acme", "train-7"), 2: Alloc("beta", None)}),
                       flops=flops, send_errors=lambda: 4)
    try:
        report = agent.tick(1_700_000_001_000, 1000)
        assert report is not None
        [on_disk] = spooled(agent)
        assert on_disk == report
        expected = NodeReport(
            schema_version=SCHEMA_VERSION, cluster="c1", node="node-7", boot_id=agent.spool.boot_id, seq=0,
            time_ms=1_700_000_001_000, interval_ms=1000,
            gpus=[
                GpuSample(**FULL, tenant="acme", job="train-7", flops_measured=1.25e15),
                GpuSample(**LOST),  # not allocated: no tenant
                GpuSample(**PARTIAL, tenant="beta"),
            ],
            agent=AgentHealth(nvml_errors=1, spool_depth=0, spool_dropped_total=0, send_errors_total=4,
                              otlp_points_accepted_total=12, otlp_points_rejected_total=1),
        )
        assert without_timing(on_disk) == expected
        assert on_disk.agent.collect_seconds >= 0.0
        # nulls stay null, zeros and False stay what they are
        full, lost, partial = on_disk.gpus
        assert (full.remap_failure, full.ecc_uncorrected_volatile, partial.util_gpu_ratio) == (False, 0, 0.0)
        assert (lost.power_w, lost.util_gpu_ratio, partial.model, partial.power_w) == (None, None, None, None)
        assert (full.xids, lost.xids, lost.error) == ([79, 48], [79], "GPU is lost (fallen off the bus)")
        assert flops.asked == [(1_700_000_001_000, 1000)]
    finally:
        agent.close()
    assert agent.collector.closed


def test_otel_points_follow_semantic_conventions(tmp_path: Path) -> None:
    memory = InMemoryMetricReader()
    out: list[tuple[int, bytes]] = []
    meter: AgentMeter | None = None
    exporter = KafkaMetricExporter(lambda: meter.frame, lambda seq, data: out.append((seq, data)))
    meter = AgentMeter(node_resource("c1", "node-7", "boot-1", host_id="machine-9"), exporter,
                       extra_readers=lambda: [memory])
    gpu0 = GpuSample(**FULL, tenant="acme", job="train-7")
    meter.observe(Frame(0, 1000, 1000, (gpu0, GpuSample(**PARTIAL)), AgentHealth(spool_depth=3)))
    data = memory.get_metrics_data()
    meter.shutdown()
    [rm] = data.resource_metrics
    res = dict(rm.resource.attributes)
    assert {k: res[k] for k in ("service.name", "host.name", "host.id", "service.instance.id", "gpufleet.cluster")} \
        == {"service.name": "gpufleet-agent", "host.name": "node-7", "host.id": "machine-9",
            "service.instance.id": "boot-1", "gpufleet.cluster": "c1"}
    metrics = {m.name: m for sm in rm.scope_metrics for m in sm.metrics}
    util = metrics["hw.gpu.utilization"]
    assert util.unit == "1"
    assert sorted(((dict(p.attributes), p.value) for p in util.data.data_points), key=str) == sorted([
        ({"hw.id": "GPU-aaaa", "hw.type": "gpu", "gpu.index": 0, "hw.model": H100, "tenant": "acme",
          "job": "train-7"}, 0.73),
        ({"hw.id": "GPU-cccc", "hw.type": "gpu", "gpu.index": 2}, 0.0),
    ], key=str)
    mem = metrics["hw.gpu.memory.usage"]
    assert (mem.unit, sorted(p.value for p in mem.data.data_points)) == ("By", [0, 61_203_283_968])
    assert [p.value for p in metrics["hw.gpu.memory.limit"].data.data_points] == [85_520_809_984]
    assert [p.value for p in metrics["hw.energy"].data.data_points] == [1_234_567.125]
    assert metrics["hw.energy"].data.is_monotonic
    assert [p.value for p in metrics["gpufleet.agent.spool.depth"].data.data_points] == [3]
    assert "gpufleet.gpu.flops.measured" not in metrics  # no FLOPs observed -> no point at all
    assert out == []  # the Kafka exporter only runs on the meter's own reader (collect())


def test_seq_increases_and_a_down_node_sends_nothing(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, ScriptedCollector(down=frozenset({1, 2})))
    try:
        results = [agent.tick(t, 1000) for t in (1000, 2000, 3000, 4000, 5000)]
        assert [r is None for r in results] == [False, True, True, False, False]
        assert [(r.seq, r.time_ms) for r in spooled(agent)] == [(0, 1000), (1, 4000), (2, 5000)]
        assert [r.agent.spool_depth for r in spooled(agent)] == [0, 1, 2]
    finally:
        agent.close()


def test_seq_and_boot_id_continue_after_a_restart(tmp_path: Path) -> None:
    first = make_agent(tmp_path)
    for t in (1000, 2000, 3000):
        first.tick(t, 1000)
    boot_id = first.spool.boot_id
    first.spool.remove([0, 1])  # as if the sender had delivered two of them
    first.close()
    again = make_agent(tmp_path)
    try:
        report = again.tick(4000, 1000)
        assert report is not None
        assert (report.boot_id, report.seq) == (boot_id, 3)
        assert [(r.seq, r.time_ms, r.boot_id) for r in spooled(again)] == [(2, 3000, boot_id), (3, 4000, boot_id)]
    finally:
        again.close()


def test_fleet_ticks_on_interval_boundaries_with_one_timer(tmp_path: Path) -> None:
    start = 1_700_000_000_300
    clock = FakeClock(start)
    agents = [make_agent(tmp_path / name, node=name) for name in ("n0", "n1")]
    try:
        ticks = run_many(agents, interval_ms=1000, stop=threading.Event(), clock=clock, duration_s=3.0)
        assert ticks == 3
        for agent in agents:
            assert agent.collector.calls == [start + 700, start + 1700, start + 2700]
            assert [(r.node, r.seq, r.time_ms) for r in spooled(agent)] == [
                (agent.node, 0, 1_700_000_001_000), (agent.node, 1, 1_700_000_002_000),
                (agent.node, 2, 1_700_000_003_000)]
    finally:
        for agent in agents:
            agent.close()


def test_a_slow_interval_skips_missed_boundaries(tmp_path: Path) -> None:
    clock = FakeClock(10_300)

    class Slow(ScriptedCollector):
        def collect(self, now_ms: int) -> list[GpuSample]:
            if not self.calls:
                clock.now += 2500  # the first collect overruns by 1.5 intervals
            return super().collect(now_ms)

    agent = make_agent(tmp_path, Slow())
    try:
        assert run_many([agent], interval_ms=1000, stop=threading.Event(), clock=clock, duration_s=4.0) == 3
        assert [r.time_ms for r in spooled(agent)] == [11_000, 13_000, 14_000]
    finally:
        agent.close()


def test_stop_event_ends_the_loop(tmp_path: Path) -> None:
    stop = threading.Event()
    clock = FakeClock(0)
    agent = make_agent(tmp_path, ScriptedCollector(batch=lambda: (stop.set(), samples())[1]))
    try:
        assert run_many([agent], interval_ms=500, stop=stop, clock=clock) == 1
    finally:
        agent.close()


def test_meter_rebuilds_after_attribute_churn_and_stays_exact(tmp_path: Path) -> None:
    out: list[bytes] = []
    meter: AgentMeter | None = None
    exporter = KafkaMetricExporter(lambda: meter.frame, lambda seq, data: out.append(data))
    meter = AgentMeter(node_resource("c1", "n", "b"), exporter, recycle_after=3)
    sent = []
    for i in range(6):
        gpu = GpuSample(**FULL, tenant="acme", job=f"job-{i}")  # a new attribute set every interval
        sent.append(gpu)
        meter.observe(Frame(i, 1000 * i, 1000, (gpu,), AgentHealth()))
        meter.collect()
    meter.shutdown()
    assert meter.rebuilds == 1  # the 4th distinct set crossed recycle_after=3
    assert [decode(b).gpus for b in out] == [[g] for g in sent]
    assert [decode(b).seq for b in out] == list(range(6))


@pytest.mark.parametrize("broken", ["allocation", "flops"])
def test_a_failing_source_does_not_stop_the_interval(tmp_path: Path, broken: str) -> None:
    class Broken:
        def read(self):
            raise OSError("allocation file unreadable")

        def take(self, now_ms: int, interval_ms: int):
            raise RuntimeError("receiver gone")

    agent = make_agent(tmp_path, **{broken: Broken()})
    try:
        report = agent.tick(1000, 1000)
        assert report is not None
        assert [(g.tenant, g.flops_measured) for g in report.gpus] == [(None, None)] * 3
    finally:
        agent.close()


def test_agent_without_nvml_says_to_use_the_simulated_backend(tmp_path: Path) -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    result = CliRunner().invoke(cli, ["agent", "--backend", "nvml", "--spool-dir", str(tmp_path),
                                      "--bootstrap", "127.0.0.1:1", "--duration", "1"], env={"GPUFLEET_CONFIG": ""})
    assert result.exit_code == 2
    assert "--backend simulated" in result.output
    assert "Traceback" not in result.output


@pytest.mark.integration
def test_otlp_export_endpoint_adds_an_otlp_http_reader(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    received: list[tuple[str, ExportMetricsServiceRequest]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportMetricsServiceRequest()
            request.ParseFromString(body)
            received.append((self.path, request))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        agent = make_agent(tmp_path, otlp_endpoint=f"http://127.0.0.1:{server.server_port}")
        agent.tick(1000, 1000)
        agent.close()  # shutting the provider down flushes the OTLP reader
    finally:
        server.shutdown()
        server.server_close()
    assert received, "no OTLP export arrived"
    path, request = received[-1]
    assert path == "/v1/metrics"
    [rm] = request.resource_metrics
    resource = {a.key: a.value.string_value for a in rm.resource.attributes}
    assert (resource["host.name"], resource["gpufleet.cluster"]) == ("node-7", "c1")
    names = {m.name for sm in rm.scope_metrics for m in sm.metrics}
    assert {"hw.gpu.utilization", "hw.gpu.memory.usage", "gpufleet.agent.spool.depth"} <= names


def test_flags_override_the_config_file_and_absent_flags_do_not() -> None:
    from gpufleet.agents.command import apply_overrides
    from gpufleet.config import parse

    cfg = parse({"kafka": {"bootstrap_servers": "k:9092", "topic": "file-topic"},
                 "agent": {"interval_s": 2.0, "spool_dir": "/file/spool", "backend": "nvml"}})
    out = apply_overrides(cfg, backend="simulated", bootstrap="", topic="flag-topic", interval=0.5, spool_dir=None)
    assert (out.kafka.bootstrap_servers, out.kafka.topic) == ("k:9092", "flag-topic")
    assert (out.agent.backend, out.agent.interval_s, out.agent.spool_dir) == ("simulated", 0.5, "/file/spool")
    assert out.kafka.compression == cfg.kafka.compression


def test_the_nvml_call_count_and_budget_ride_in_agent_health(tmp_path: Path) -> None:
    from gpufleet.agents.collectors.nvml import NvmlCollector
    from tests.agents.nvml_helpers import hopper, volta
    from tests.fakes.fake_pynvml import FakeNvml

    fake = FakeNvml([hopper(), volta()])
    collector = NvmlCollector(nvml=fake, event_wait_ms=20, clock=lambda: fake.now_us / 1e6)
    agent = make_agent(tmp_path, collector=collector)
    try:
        agent.tick(1_000, 1000)
        fake.advance(1.0)
        before = sum(n for (name, gpu), n in fake.calls.items() if gpu is not None and name != "nvmlEventSetWait")
        report = agent.tick(2_000, 1000)
        after = sum(n for (name, gpu), n in fake.calls.items() if gpu is not None and name != "nvmlEventSetWait")
    finally:
        agent.close()
    assert report is not None
    assert report.agent.nvml_calls == after - before == 12 + 9  # the H100: 12; the V100: no GPM, no MIG
    assert report.agent.nvml_call_budget == 2 * 16
    assert (report.agent.nvml_deadline_misses, report.agent.xids_dropped_total) == (0, 0)
    assert spooled(agent)[-1].agent == report.agent


def test_a_released_collector_sends_nothing_and_says_so(tmp_path: Path) -> None:
    class Releasing(ScriptedCollector):
        def collect(self, now_ms: int) -> list[GpuSample]:
            if len(self.calls) < 2:
                self.calls.append(now_ms)
                raise NodeReleased("NVML released for maintenance")
            return super().collect(now_ms)

    agent = make_agent(tmp_path, collector=Releasing())
    assert agent.tick(1_000, 1000) is None
    assert agent.released
    assert agent.tick(2_000, 1000) is None
    assert agent.tick(3_000, 1000) is not None
    assert not agent.released
    assert [r.seq for r in spooled(agent)] == [0]
    agent.close()


SIGNALS = {
    "index": 3, "uuid": "GPU-eeee", "model": H100, "recovery_action": 1, "temp_slowdown_c": 89.0,
    "temp_shutdown_c": 92.0, "temp_mem_max_c": 95.0, "power_limit_w": 650.0, "power_limit_default_w": 700.0,
    "fabric_state": 3, "fabric_status": 0, "fabric_clique_id": 4, "fabric_health_mask": 0b0001_1010_1001,
    "fabric_cluster_uuid": "00010203-0405-0607-0809-0a0b0c0d0e0f", "serial": "1321021034567",
    "vbios_version": "96.00.74.00.0C", "driver_version": "570.172.08", "persistence_mode": False, "ecc_mode": True,
}
"""The node-side signals of one GPU: numbers travel as points, text beside them, as the events do."""


def test_node_signals_round_trip_through_otel_exactly(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, collector=ScriptedCollector(lambda: [GpuSample(**SIGNALS), GpuSample(**PARTIAL)]))
    try:
        agent.tick(1_700_000_001_000, 1000)
        [report] = spooled(agent)
    finally:
        agent.close()
    assert report.gpus == [GpuSample(**SIGNALS), GpuSample(**PARTIAL)]
