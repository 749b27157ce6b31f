"""Delivery through a real broker (tansu): exact content, order, nothing lost while the broker is away."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from kafka import KafkaConsumer, KafkaProducer

from gpufleet.agents.runner import NodeAgent
from gpufleet.agents.sender import Backoff, Sender
from gpufleet.agents.spool import Spool
from gpufleet.cli import cli
from gpufleet.config import KafkaConfig
from gpufleet.embedded.broker import EmbeddedBroker, free_port
from gpufleet.kafka import consumer_kwargs, ensure_topics, producer_kwargs
from gpufleet.wire import SCHEMA_VERSION, AgentHealth, GpuSample, NodeReport, decode

pytestmark = pytest.mark.integration  # starts a server or a process

MB = 1024 * 1024
FAST = Backoff(initial_s=0.05, max_s=0.3)
WAIT_S = 60.0  # generous bound on waiting for the broker; never a speed assertion


class CountingCollector:
    """Two GPUs whose counters encode the call number, so every message is different and checkable."""

    def __init__(self) -> None:
        self.n = 0

    def collect(self, now_ms: int) -> list[GpuSample]:
        n, self.n = self.n, self.n + 1
        return [
            GpuSample(index=0, uuid="GPU-0000", model="NVIDIA A100-SXM4-80GB", util_gpu_ratio=n / 1000,
                      energy_j=1000.5 + n, ecc_corrected_volatile=n, xids=[48] if n == 2 else []),
            GpuSample(index=1, uuid="GPU-0001", error="GPU is lost"),
        ]

    def close(self) -> None:
        pass


def expected_gpus(n: int) -> list[GpuSample]:
    """What call `n` of CountingCollector must look like on Kafka (written out independently)."""
    return [
        GpuSample(index=0, uuid="GPU-0000", model="NVIDIA A100-SXM4-80GB", util_gpu_ratio=n / 1000,
                  energy_j=1000.5 + n, ecc_corrected_volatile=n, xids=[48] if n == 2 else []),
        GpuSample(index=1, uuid="GPU-0001", error="GPU is lost"),
    ]


def producer_factory(bootstrap: str, **overrides: object) -> Callable[[], KafkaProducer]:
    kw = producer_kwargs(KafkaConfig(bootstrap_servers=bootstrap), bootstrap_timeout_ms=1000, max_block_ms=3000,
                         delivery_timeout_ms=5000, environ={})
    kw.update(overrides)
    return lambda: KafkaProducer(**kw)


def consume(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of the first `count` messages of the topic (fails if fewer arrive), then checks for extras."""
    consumer = KafkaConsumer(topic, **consumer_kwargs(KafkaConfig(bootstrap_servers=bootstrap), group_id=None,
                                                      environ={}))
    out: list[tuple[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + WAIT_S
        while len(out) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend((r.key, r.value) for r in records)
        for records in consumer.poll(timeout_ms=1000).values():  # anything beyond `count` is a duplicate
            out.extend((r.key, r.value) for r in records)
    finally:
        consumer.close()
    return out


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def make_topic(topic: str) -> Callable[[str], str]:
    def create(bootstrap: str) -> str:
        ensure_topics(KafkaConfig(bootstrap_servers=bootstrap), [topic], partitions=2, environ={})
        return topic

    return create


def agent_on(spool_dir: Path, sender_errors: Callable[[], int] = lambda: 0) -> NodeAgent:
    return NodeAgent(cluster="lab", node="gpu-node-1", collector=CountingCollector(), spool=Spool(spool_dir, MB),
                     send_errors=sender_errors)


def test_messages_arrive_with_exact_content_keyed_by_node(broker: EmbeddedBroker, make_topic, tmp_path: Path) -> None:
    topic = make_topic(broker.bootstrap)
    agent = agent_on(tmp_path)
    for n in range(4):  # spooled before the sender starts, so each message's spool_depth is known: n
        agent.tick(1_700_000_000_000 + 1000 * n, 1000)
    sender = Sender(producer_factory(broker.bootstrap), topic, [("gpu-node-1", agent.spool)], backoff=FAST).start()
    try:
        wait_until(lambda: agent.spool.depth == 0)
    finally:
        assert sender.stop(5.0) == 0
        agent.close()
    got = consume(broker.bootstrap, topic, 4)
    assert [key for key, _ in got] == [b"gpu-node-1"] * 4
    reports = [decode(value) for _, value in got]
    for n, report in enumerate(reports):
        assert report.agent.collect_seconds >= 0.0
        assert report == NodeReport(
            schema_version=SCHEMA_VERSION, cluster="lab", node="gpu-node-1", boot_id=agent.spool.boot_id, seq=n,
            time_ms=1_700_000_000_000 + 1000 * n, interval_ms=1000, gpus=expected_gpus(n),
            agent=AgentHealth(collect_seconds=report.agent.collect_seconds, nvml_errors=1, spool_depth=n),
        )
    assert sender.acked_total == 4


def test_unreachable_broker_spools_then_delivers_everything_in_order_once(make_topic, topic: str,
                                                                          tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    agent = agent_on(tmp_path, sender_errors=lambda: sender.errors_for(0))
    sender = Sender(producer_factory(bootstrap), topic, [("gpu-node-1", agent.spool)], backoff=FAST)
    late = None
    try:
        # nothing listens on the port: collection goes on, messages wait in the spool
        sender.start()
        for n in range(10):
            agent.tick(1000 * (n + 1), 1000)
            sender.notify()
        wait_until(lambda: sender.send_errors_total >= 2)
        assert agent.spool.depth == 10
        spooled = [e.data for e in agent.spool.peek()]
        assert [decode(d).seq for d in spooled] == list(range(10))
        later = agent.tick(11_000, 1000)
        assert later is not None
        assert later.agent.spool_depth == 10
        assert later.agent.send_errors_total >= 2
        # the broker appears on that port (topic created first); the sender connects by itself
        late = EmbeddedBroker(port=port).start()
        make_topic(bootstrap)
        wait_until(lambda: agent.spool.depth == 0)
        assert sender.stop(5.0) == 0
        got = consume(bootstrap, topic, 11)
        assert [decode(v).seq for _, v in got] == list(range(11))  # in order, exactly once
        assert [v for _, v in got[:10]] == spooled  # byte for byte what was spooled
    finally:
        sender.stop(0.5)
        agent.close()
        if late is not None:
            late.stop()


def test_shutdown_with_the_broker_away_keeps_messages_for_the_next_start(broker: EmbeddedBroker, make_topic,
                                                                        tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    agent = agent_on(tmp_path)
    sender = Sender(producer_factory(dead), "unused", [("gpu-node-1", agent.spool)], backoff=FAST).start()
    for n in range(3):
        agent.tick(1000 * (n + 1), 1000)
        sender.notify()
    assert sender.stop(0.5) == 3
    boot_id = agent.spool.boot_id
    agent.close()
    # next start, broker reachable: the three spooled messages go first, then new ones continue the seq
    topic = make_topic(broker.bootstrap)
    agent = agent_on(tmp_path)
    sender = Sender(producer_factory(broker.bootstrap), topic, [("gpu-node-1", agent.spool)], backoff=FAST).start()
    try:
        agent.tick(4000, 1000)
        sender.notify()
        wait_until(lambda: agent.spool.depth == 0)
    finally:
        sender.stop(5.0)
        agent.close()
    got = [decode(v) for _, v in consume(broker.bootstrap, topic, 4)]
    assert [(r.boot_id, r.seq, r.time_ms) for r in got] == [(boot_id, 0, 1000), (boot_id, 1, 2000), (boot_id, 2, 3000),
                                                            (boot_id, 3, 4000)]


def test_broker_restart_that_forgets_everything_is_survived(make_topic, topic: str, tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    kafka = EmbeddedBroker(port=port).start()
    agent = agent_on(tmp_path)
    sender = Sender(producer_factory(bootstrap), topic, [("gpu-node-1", agent.spool)], backoff=FAST)
    try:
        make_topic(bootstrap)
        sender.start()
        for n in range(3):
            agent.tick(1000 * (n + 1), 1000)
        sender.notify()
        wait_until(lambda: agent.spool.depth == 0)
        kafka.stop()  # tansu keeps messages in memory: the restarted broker knows no producer, no topic
        for n in range(3, 6):
            agent.tick(1000 * (n + 1), 1000)
        sender.notify()
        assert agent.spool.depth == 3
        kafka = EmbeddedBroker(port=port).start()
        make_topic(bootstrap)
        wait_until(lambda: agent.spool.depth == 0)  # the sender replaces its producer and resends
        assert sender.stop(5.0) == 0
        assert [decode(v).seq for _, v in consume(bootstrap, topic, 3)] == [3, 4, 5]
    finally:
        sender.stop(0.5)
        agent.close()
        kafka.stop()


def test_a_message_the_broker_refuses_for_good_is_dropped_without_blocking_the_rest(
        broker: EmbeddedBroker, make_topic, tmp_path: Path) -> None:
    topic = make_topic(broker.bootstrap)
    with Spool(tmp_path, MB) as spool:
        spool.append(0, b"small-0")
        spool.append(1, b"x" * 5000)  # larger than the producer's max_request_size below
        spool.append(2, b"small-2")
        sender = Sender(producer_factory(broker.bootstrap, max_request_size=2000), topic, [("n", spool)],
                        backoff=FAST).start()
        try:
            wait_until(lambda: spool.depth == 0)
        finally:
            sender.stop(5.0)
        assert (spool.dropped_total, sender.errors_for(0), sender.acked_total) == (1, 1, 2)
    assert [v for _, v in consume(broker.bootstrap, topic, 2)] == [b"small-0", b"small-2"]


def test_gpufleet_agent_runs_a_simulated_fleet_until_its_duration(broker: EmbeddedBroker, make_topic,
                                                                    tmp_path: Path) -> None:
    topic = make_topic(broker.bootstrap)
    truth = tmp_path / "truth.json"
    result = CliRunner().invoke(cli, [
        "agent", "--backend", "simulated", "--nodes", "2", "--gpus", "2", "--faults", "none", "--interval", "0.5",
        "--duration", "2", "--bootstrap", broker.bootstrap, "--topic", topic, "--spool-dir", str(tmp_path / "spool"),
        "--ground-truth", str(truth),
    ], env={"GPUFLEET_CONFIG": ""})
    assert result.exit_code == 0, result.output
    intervals = int(result.output.split("gpufleet agent: ")[1].split(" intervals")[0])
    assert intervals >= 1
    assert f"{2 * intervals} messages delivered, 0 left spooled" in result.output
    reports = [decode(v) for _, v in consume(broker.bootstrap, topic, 2 * intervals)]
    by_node: dict[str, list[NodeReport]] = {}
    for r in reports:
        by_node.setdefault(r.node, []).append(r)
    assert sorted(by_node) == ["default-node-000", "default-node-001"]
    for node_reports in by_node.values():
        assert [r.seq for r in node_reports] == list(range(intervals))
        times = [r.time_ms for r in node_reports]
        assert all(t % 500 == 0 for t in times)
        assert times == sorted(set(times))
        assert all(len(r.gpus) == 2 and r.interval_ms == 500 for r in node_reports)
    assert truth.exists()
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["default-node-000", "default-node-001"]
