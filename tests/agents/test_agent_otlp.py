"""The agent with its OTLP receiver wired in: real OTel SDK jobs -> receiver -> NodeReport on Kafka (tansu).

Covers the runner wiring (exact per-interval FLOPs on the right GPUs, null elsewhere, health counters),
`gpufleet agent` on NVML (fake pynvml) with the receiver on the configured port, the simulated fleet
with `--flops-jobs` (a real child process, stopped with the agent), and gpufleet.agents.flops_jobs' pure parts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from kafka import KafkaConsumer, KafkaProducer

from gpufleet.agents import flops_jobs
from gpufleet.agents.collectors import nvml as nvml_module
from gpufleet.agents.command import count_sources
from gpufleet.agents.flops_jobs import FleetSpec, JobsSpec, ReportingJob, Selection, gpu_flops, gpus_by_node
from gpufleet.agents.otlp import OtlpReceiver, ReceiverSettings
from gpufleet.agents.runner import NodeAgent
from gpufleet.agents.sender import Backoff, Sender
from gpufleet.agents.simulation.jobs import Job, Phase
from gpufleet.agents.spool import Spool
from gpufleet.cli import cli
from gpufleet.config import KafkaConfig
from gpufleet.embedded.broker import EmbeddedBroker, free_port, wait_for_port
from gpufleet.kafka import consumer_kwargs, ensure_topics, producer_kwargs
from gpufleet.report_flops import Reporter
from gpufleet.wire import GpuSample, NodeReport, decode, encode, max_counts
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml

MB = 1024 * 1024
WAIT_S = 60.0  # generous bound on waiting for something to happen; never a speed assertion
U0, U1, U2 = "GPU-11111111-0000", "GPU-22222222-0000", "GPU-33333333-0000"
H100 = "NVIDIA H100 80GB HBM3"


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class TinyCollector:
    """Three GPUs with fixed counters."""

    def collect(self, now_ms: int) -> list[GpuSample]:
        return [GpuSample(index=i, uuid=u, model=H100, util_gpu_ratio=0.5) for i, u in enumerate((U0, U1, U2))]

    def close(self) -> None:
        pass


@pytest.fixture
def kafka_topic(broker: EmbeddedBroker, topic: str) -> str:
    ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap), [topic], partitions=1, environ={})
    return topic


def producer_factory(bootstrap: str) -> Callable[[], KafkaProducer]:
    kw = producer_kwargs(KafkaConfig(bootstrap_servers=bootstrap), bootstrap_timeout_ms=1000, max_block_ms=3000,
                         delivery_timeout_ms=5000, environ={})
    return lambda: KafkaProducer(**kw)


class Reader:
    """Reads the topic from the start, decoding every report, until a condition holds (or WAIT_S passes)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.reports: list[NodeReport] = []
        self._consumer = KafkaConsumer(topic, **consumer_kwargs(KafkaConfig(bootstrap_servers=bootstrap),
                                                                group_id=None, environ={}))

    def until(self, condition: Callable[[list[NodeReport]], bool]) -> bool:
        deadline = time.monotonic() + WAIT_S
        while not condition(self.reports):
            if time.monotonic() > deadline:
                return False
            self.poll(300)
        return True

    def poll(self, timeout_ms: int) -> None:
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            self.reports.extend(decode(r.value) for r in records)

    def drain(self) -> list[NodeReport]:
        """Everything that is on the topic now (polls until a quiet second)."""
        before = -1
        while before != len(self.reports):
            before = len(self.reports)
            self.poll(1000)
        return self.reports

    def close(self) -> None:
        self._consumer.close()


def flops_of(reports: Sequence[NodeReport], uuid: str) -> list[float | None]:
    return [next(g.flops_measured for g in r.gpus if g.uuid == uuid) for r in reports]


# -- the runner with a receiver ------------------------------------------------------------------------


def test_sdk_reported_flops_reach_kafka_on_the_job_gpus_exactly(broker: EmbeddedBroker, kafka_topic: str,
                                                               tmp_path: Path) -> None:
    t0 = wall_ms()
    clock = [t0]  # the receiver's clock: the agent's intervals below, so proration is known exactly
    receiver = OtlpReceiver(ReceiverSettings(port=0), clock=lambda: clock[0]).start()
    agent = NodeAgent(cluster="lab", node="n1", collector=TinyCollector(), spool=Spool(tmp_path, MB),
                      flops=receiver.flops_source, on_gpus=receiver.set_gpus)
    train = Reporter("train-1", gpus=[U0, U1], endpoint=receiver.endpoint, export_interval_ms=3_600_000, environ={})
    stray = Reporter("stray", gpus=["GPU-not-here"], endpoint=receiver.endpoint, export_interval_ms=3_600_000,
                     environ={})
    try:
        agent.tick(t0 + 1000, 1000)  # the receiver learns the node's GPUs from this collection
        train.report_flops(6e14)
        stray.report_flops(1e14)
        clock[0] = t0 + 1500
        assert train.flush()
        assert stray.flush()  # 200 with partial success: the point names a GPU this node does not have
        # The report covers the few ms between the counter's start and its export; 5 minutes later all is due.
        agent.tick(t0 + 300_000, 1000)
        agent.tick(t0 + 301_000, 1000)  # nothing due: null again, never 0
        train.report_flops(2e14)  # cumulative 8e14: the increment is 2e14
        clock[0] = t0 + 301_500
        assert train.flush()
        agent.tick(t0 + 600_000, 1000)
    finally:
        train.shutdown()
        stray.shutdown()
        receiver.close()
    sender = Sender(producer_factory(broker.bootstrap), kafka_topic, [("n1", agent.spool)],
                    backoff=Backoff(initial_s=0.05, max_s=0.3)).start()
    reader = Reader(broker.bootstrap, kafka_topic)
    try:
        assert reader.until(lambda got: len(got) >= 4)
        reports = reader.drain()
    finally:
        sender.stop(5.0)
        agent.close()
        reader.close()
    assert [r.time_ms for r in reports] == [t0 + 1000, t0 + 300_000, t0 + 301_000, t0 + 600_000]
    # 6e14 over two GPUs, then 2e14 over the same two (below an H100's 989e12 FLOP/s); the third GPU never reported.
    assert flops_of(reports, U0) == [None, 3e14, None, 1e14]
    assert flops_of(reports, U1) == [None, 3e14, None, 1e14]
    assert flops_of(reports, U2) == [None, None, None, None]
    assert sum(f or 0.0 for u in (U0, U1) for f in flops_of(reports, u)) == 8e14
    assert [r.agent.otlp_points_accepted_total for r in reports] == [0, 1, 1, 2]  # counted when taken
    assert [r.agent.otlp_points_rejected_total for r in reports] == [0, 1, 1, 1]


def test_reported_tokens_and_samples_ride_in_the_gpu_samples_as_flops_do(tmp_path: Path) -> None:
    t0 = wall_ms()
    clock = [t0]
    receiver = OtlpReceiver(ReceiverSettings(port=0), clock=lambda: clock[0]).start()
    agent = NodeAgent(cluster="lab", node="n1", collector=TinyCollector(), spool=Spool(tmp_path, MB),
                      flops=receiver.flops_source, counts=count_sources(receiver), on_gpus=receiver.set_gpus)
    train = Reporter("train-1", gpus=[U0, U1], endpoint=receiver.endpoint, export_interval_ms=3_600_000, environ={})
    try:
        reports = [agent.tick(t0 + 1000, 1000)]
        train.report_flops(6e14)
        train.report_tokens(32_768)  # 8 sequences of 4096 tokens
        train.report_samples(8)
        clock[0] = t0 + 1500
        assert train.flush()
        reports += [agent.tick(t0 + 300_000, 1000), agent.tick(t0 + 301_000, 1000)]
    finally:
        train.shutdown()
        receiver.close()
        agent.close()
    assert all(r is not None for r in reports)
    by_gpu = {u: [next(g for g in r.gpus if g.uuid == u) for r in reports if r] for u in (U0, U1, U2)}
    for u in (U0, U1):  # split evenly over the job's two GPUs; null (not 0) where nothing is due
        assert [(g.tokens_measured, g.samples_measured) for g in by_gpu[u]] == [(None, None), (16_384, 4), (None, None)]
    assert [(g.tokens_measured, g.samples_measured) for g in by_gpu[U2]] == [(None, None)] * 3
    assert decode(encode(reports[1])) == reports[1]  # within the wire's bounds


class _Fixed:
    """A counts source that returns the same amounts every interval."""

    def __init__(self, amounts: dict[str, float]) -> None:
        self.amounts = amounts

    def take(self, now_ms: int, interval_ms: int) -> dict[str, float]:
        return dict(self.amounts)


def test_tokens_the_wire_would_refuse_are_sent_as_null(tmp_path: Path) -> None:
    limit = max_counts(1000)  # 1e10 tokens a second
    agent = NodeAgent(cluster="lab", node="n1", collector=TinyCollector(), spool=Spool(tmp_path, MB),
                      counts={"tokens_measured": _Fixed({U0: float(limit), U1: limit * 1.001, U2: float("nan")}),
                              "samples_measured": _Fixed({U0: -1.0, U1: 3.0})})
    try:
        report = agent.tick(wall_ms(), 1000)
    finally:
        agent.close()
    assert report is not None
    assert [(g.tokens_measured, g.samples_measured) for g in report.gpus] == [(limit, None), (None, 3.0),
                                                                               (None, None)]
    assert decode(encode(report)) == report


# -- gpufleet agent on NVML -----------------------------------------------------------------------------


def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """`gpufleet agent --backend nvml` builds its collector on this fake instead of the real pynvml."""
    fake = FakeNvml([FakeGpu(uuid=U0), FakeGpu(uuid=U1, pci=(0, 0x3B, 0))], real_time=True)
    real = nvml_module.NvmlCollector

    def collector(**kwargs: object) -> nvml_module.NvmlCollector:  # the agent's settings, on the fake
        kwargs.update(event_wait_ms=20, kmsg_path=None, kmsg_cursor=None, release_file=None)
        return real(nvml=fake, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nvml_module, "NvmlCollector", collector)
    return fake


def nvml_config(tmp_path: Path, bootstrap: str, topic: str, otlp_port: int) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps({  # YAML is a superset of JSON
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic},
        "agent": {"backend": "nvml", "cluster": "lab", "node": "gpu-node-7", "interval_s": 0.5,
                  "spool_dir": str(tmp_path / "spool"), "otlp_receiver_port": otlp_port},
    }))
    return path


def test_nvml_agent_receives_flops_on_its_configured_port(broker: EmbeddedBroker, kafka_topic: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_nvml(monkeypatch)
    port = free_port()
    config = nvml_config(tmp_path, broker.bootstrap, kafka_topic, port)
    total = 7e15
    seen: list[bool] = []

    def job() -> None:
        """A job on GPU index 0 (CUDA_VISIBLE_DEVICES=0): report, wait until Kafka shows it all, stop the agent."""
        if not wait_for_port("127.0.0.1", port, WAIT_S):
            return
        reporter = Reporter("nvml-job", gpus=["0"], endpoint=f"http://127.0.0.1:{port}", export_interval_ms=3_600_000,
                            environ={})
        reporter.report_flops(total)
        reporter.flush()
        reporter.shutdown()
        reader = Reader(broker.bootstrap, kafka_topic)
        try:
            seen.append(reader.until(lambda got: sum(f or 0.0 for f in flops_of(got, U0)) >= total))
        finally:
            reader.close()
            os.kill(os.getpid(), signal.SIGTERM)  # the agent's handler stops it (the --duration below is a backstop)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    result = CliRunner().invoke(cli, ["agent", "--config", str(config), "--duration", "90"],
                                env={"GPUFLEET_CONFIG": ""})
    thread.join(10)
    assert result.exit_code == 0, result.output
    assert seen == [True]
    reader = Reader(broker.bootstrap, kafka_topic)
    try:
        reports = reader.drain()
    finally:
        reader.close()
    assert {r.node for r in reports} == {"gpu-node-7"}
    assert sum(f or 0.0 for f in flops_of(reports, U0)) == total  # all of it, on GPU 0 only, once
    assert flops_of(reports, U1) == [None] * len(reports)
    assert reports[-1].agent.otlp_points_accepted_total >= 1
    assert fake.shutdown_count == fake.init_count  # NVML closed


def test_nvml_agent_says_which_setting_to_change_when_the_receiver_port_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_nvml(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = nvml_config(tmp_path, "127.0.0.1:1", "unused", port)
        result = CliRunner().invoke(cli, ["agent", "--config", str(config), "--duration", "1"],
                                    env={"GPUFLEET_CONFIG": ""})
    assert result.exit_code == 2
    assert f"OTLP receiver cannot listen on 127.0.0.1:{port}" in result.output
    assert "agent.otlp_receiver_port" in result.output
    assert (fake.init_count, fake.shutdown_count) == (1, 1)  # the collector was closed on the way out


def test_flops_jobs_need_the_simulated_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch)
    config = nvml_config(tmp_path, "127.0.0.1:1", "unused", free_port())
    result = CliRunner().invoke(cli, ["agent", "--config", str(config), "--flops-jobs", "2"],
                                env={"GPUFLEET_CONFIG": ""})
    assert result.exit_code == 2
    assert "--flops-jobs needs --backend simulated" in result.output


# -- gpufleet agent --backend simulated --flops-jobs ----------------------------------------------------


def test_simulated_flops_jobs_report_through_otlp_and_stop_with_the_agent(broker: EmbeddedBroker, kafka_topic: str,
                                                                         tmp_path: Path) -> None:
    truth_path = tmp_path / "truth.json"
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpufleet", "agent", "--backend", "simulated", "--nodes", "6", "--gpus", "1",
         "--faults", "none", "--interval", "0.5", "--flops-jobs", "1", "--bootstrap", broker.bootstrap,
         "--topic", kafka_topic, "--spool-dir", str(tmp_path / "spool"), "--ground-truth", str(truth_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "GPUFLEET_CONFIG": ""},
    )
    reader = Reader(broker.bootstrap, kafka_topic)
    try:
        measured = reader.until(lambda got: any(g.flops_measured is not None for r in got for g in r.gpus))
        children = psutil.Process(agent.pid).children()
        jobs = [p for p in children if "gpufleet.agents.flops_jobs" in " ".join(p.cmdline())]
        assert len(jobs) == 1
    finally:
        agent.send_signal(signal.SIGTERM)
        output = agent.communicate(timeout=WAIT_S)[0].decode()
    try:
        reports = reader.drain()
    finally:
        reader.close()
    assert agent.returncode == 0, output
    assert measured, output
    psutil.wait_procs(jobs, timeout=5)
    assert not any(p.is_running() for p in jobs)  # the jobs stopped with the agent
    truth = json.loads(truth_path.read_text())
    job_gpus: dict[str, set[tuple[str, str]]] = {}
    for a in truth["allocations"]:
        job_gpus.setdefault(a["job"], set()).add((a["node"], a["uuid"]))
    with_flops = {(r.node, g.uuid, g.job) for r in reports for g in r.gpus if g.flops_measured is not None}
    reporting_jobs = {job for _, _, job in with_flops}
    assert len(reporting_jobs) == 1  # one job reports, on its GPUs only (on every node it runs on)
    (job,) = reporting_jobs
    assert {(node, uuid) for node, uuid, _ in with_flops} == job_gpus[job]
    assert all(g.flops_measured >= 0 for r in reports for g in r.gpus if g.flops_measured is not None)
    assert max(r.agent.otlp_points_accepted_total for r in reports) >= 1


# -- gpufleet.agents.flops_jobs' parts --------------------------------------------------------------------------

T = 1_700_000_000_000
PEAK = 989e12


def job(number: int, start: int, end: int, gpus: tuple[tuple[int, int], ...] = ((0, 0),), *,
        process_end: int | None = None, phases: tuple[Phase, ...] = ()) -> Job:
    return Job(number, "tenant-a", start, end, gpus, 0, end if process_end is None else process_end, phases)


def test_gpu_flops_integrate_busy_phases_only() -> None:
    phases = (
        Phase(T, T + 60_000, False, 0.0, 0.0, 0.0),  # start-up: no model FLOPs
        Phase(T + 60_000, T + 120_000, True, 0.9, 0.5, 0.3),
        Phase(T + 120_000, T + 180_000, True, 0.8, 0.25, 0.3),
    )
    j = job(1, T, T + 180_000, phases=phases)
    # [T+30 s, T+150 s): 60 s at tensor 0.5, 30 s at tensor 0.25; 80 % of it model FLOPs
    assert gpu_flops(j, T + 30_000, T + 150_000, PEAK) == pytest.approx(0.8 * PEAK * (60 * 0.5 + 30 * 0.25))
    assert gpu_flops(j, T, T + 60_000, PEAK) == 0.0
    assert gpu_flops(j, T + 200_000, T + 300_000, PEAK) == 0.0


def test_selection_keeps_jobs_until_their_processes_end_then_refills_lowest_number_first() -> None:
    a = job(7, T, T + 10_000)
    b = job(3, T, T + 50_000, process_end=T + 5_000)  # crashes at T+5 s
    c = job(5, T + 2_000, T + 50_000)
    d = job(2, T + 6_000, T + 50_000)
    sel = Selection(2)
    assert sel.update([a, b, c, d], T) == ([b, a], [])  # c and d have not started
    assert sel.update([a, b, c, d], T + 3_000) == ([], [])  # c runs, but both places are taken
    assert sel.update([a, b, c, d], T + 6_000) == ([d], [b])  # b crashed; d (2) before c (5)
    assert sel.update([a, c, d], T + 10_000) == ([c], [a])
    assert sorted(sel.active) == [2, 5]


def test_a_pod_job_reports_from_each_node_its_gpus_share() -> None:
    spec = FleetSpec(cluster="c", nodes=3, gpus=2, tenants=1, seed=1, faults="none", start_ms=T, interval_ms=1000)
    fleet = spec.build()
    endpoints = {"c-node-000": "http://e0", "c-node-002": "http://e2"}  # node 1 has no receiver
    jspec = JobsSpec(fleet=spec, endpoints=endpoints, jobs=1, peak_flop_s=PEAK, step_ms=1000, export_interval_ms=2000)
    phases = (Phase(T, T + 100_000, True, 0.9, 0.5, 0.3),)
    pod = job(9, T, T + 100_000, ((0, 0), (0, 1), (1, 0), (1, 1), (2, 1)), process_end=T + 40_000, phases=phases)
    made: dict[str, FakeReporter] = {}

    def make(job_id: str, uuids: Sequence[str], endpoint: str) -> FakeReporter:
        made[endpoint] = FakeReporter(job_id, list(uuids))
        return made[endpoint]

    assert gpus_by_node(pod) == {0: [0, 1], 1: [0, 1], 2: [1]}
    rj = ReportingJob(pod, fleet, jspec, T + 10_000, make)
    rj.advance(T + 20_000)
    rj.advance(T + 60_000)  # the processes ended at T+40 s: nothing after
    rj.close()
    per_gpu_s = 0.8 * 0.5 * PEAK
    assert made["http://e0"].job_uuids == ("job-00009", [fleet.gpu_const(0, 0).uuid, fleet.gpu_const(0, 1).uuid])
    assert made["http://e2"].job_uuids == ("job-00009", [fleet.gpu_const(2, 1).uuid])
    assert made["http://e0"].added == pytest.approx([2 * 10 * per_gpu_s, 2 * 20 * per_gpu_s])
    assert made["http://e2"].added == pytest.approx([10 * per_gpu_s, 20 * per_gpu_s])
    assert all(r.closed for r in made.values())


class FakeReporter:
    def __init__(self, job_id: str, uuids: list[str]) -> None:
        self.job_uuids = (job_id, uuids)
        self.added: list[float] = []
        self.tokens: list[float] = []
        self.samples: list[float] = []
        self.closed = False

    def report_flops(self, n: float) -> None:
        self.added.append(n)

    def report_tokens(self, n: float) -> None:
        self.tokens.append(n)

    def report_samples(self, n: float) -> None:
        self.samples.append(n)

    def shutdown(self) -> None:
        self.closed = True


def test_jobs_process_refuses_a_bad_spec() -> None:
    assert flops_jobs.main(["{not json"]) == 2
    assert flops_jobs.main([]) == 2
