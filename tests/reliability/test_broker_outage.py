"""The broker unreachable (partitioned, then refusing) while agents collect: spooled, replayed in order, once.

Agents and the ingester reach a real broker (tansu) only through `TcpProxy`: the broker advertises
the proxy, so every client connection crosses it. The outage the issue calls "a minute" is scaled
to 13 s here: 7 s black-holed (connections hang, as in a network partition) then 6 s cut (every
connection reset, as when the broker is down). Kafka client timeouts are scaled with it (a 6 s
delivery timeout instead of 60 s), so the agents notice within the outage, as production agents
notice within a real minute. Agents tick on synthetic 1 s intervals, ten per wall second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from gpufleet.agents.collectors.simulated import SimulatedFleet
from gpufleet.agents.runner import NodeAgent
from gpufleet.agents.sender import Backoff, Sender
from gpufleet.agents.spool import RECORD_OVERHEAD, Spool
from gpufleet.config import Config, KafkaConfig, parse
from gpufleet.kafka import consumer_kwargs, ensure_topics, producer_kwargs
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.ingester import Ingester
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from gpufleet.wire import decode
from tests.reliability.harness import broker_behind_proxy, wait_until
from tests.reliability.tcp_proxy import TcpProxy

MB = 1024 * 1024
NODES = 3
GPUS = 2
FAST = Backoff(initial_s=0.1, max_s=1.0)
STALL_S = 10.0
"""Longer than the 6 s delivery timeout below, as the agent's default (90 s) is longer than its 60 s one."""


def producer_factory(bootstrap: str) -> Callable[[], KafkaProducer]:
    kw = producer_kwargs(KafkaConfig(bootstrap_servers=bootstrap), bootstrap_timeout_ms=2000, max_block_ms=2000,
                         delivery_timeout_ms=6000, environ={})
    return lambda: KafkaProducer(**kw)


def ingest_cfg(bootstrap: str, target: Target, topic: str) -> Config:
    return parse({
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": f"{topic}-dlq"},
        "clickhouse": {"dsn": target.dsn, "database": target.database},
        "ingest": {"group_id": f"g-{topic}", "batch_ms": 200, "max_poll_interval_ms": 4000,
                   "session_timeout_ms": 3000},
    })


class IngestThread:
    """The real ingester on the test's database, in a thread, until stopped."""

    def __init__(self, cfg: Config) -> None:
        store = Store.open(Target(cfg.clickhouse.dsn, cfg.clickhouse.database), create=True)
        self.ingester = build_ingester(cfg, store)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.ingester.run, args=(self.stop_event,), daemon=True)

    def __enter__(self) -> Ingester:
        self.thread.start()
        return self.ingester

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)
        self.ingester.consumer.close()


@pytest.fixture
def proxied(tmp_path: Path, topic: str) -> Iterator[TcpProxy]:
    with broker_behind_proxy(tmp_path / "tansu.log") as proxy:
        ensure_topics(KafkaConfig(bootstrap_servers=proxy.address), [topic, f"{topic}-dlq"], partitions=4,
                      environ={})
        yield proxy


def fleet_agents(tmp_path: Path, base_ms: int, sender_errors: Callable[[int], int],
                 spool_bytes: int = MB) -> list[NodeAgent]:
    fleet = SimulatedFleet(nodes=NODES, gpus_per_node=GPUS, tenants=2, seed=3, start_ms=base_ms, cluster="out",
                           faults=[], interval_ms=1000)
    return [NodeAgent(cluster="out", node=node.name, collector=node, spool=Spool(tmp_path / node.name, spool_bytes),
                      allocation=node.allocation_source(), send_errors=lambda i=i: sender_errors(i))
            for i, node in enumerate(fleet.nodes)]


def topic_order(bootstrap: str, topic: str) -> dict[str, list[int]]:
    """Each node's seqs in the order they sit on the topic (a node's messages share one partition)."""
    c = KafkaConsumer(topic, **consumer_kwargs(KafkaConfig(bootstrap_servers=bootstrap), group_id=None, environ={},
                                               consumer_timeout_ms=3000))
    out: dict[str, list[int]] = {}
    try:
        for m in c:
            out.setdefault(m.key.decode(), []).append(decode(m.value).seq)
    finally:
        c.close()
    return out


def test_outage_spools_then_replays_in_order_exactly_once(proxied: TcpProxy, tmp_path: Path, topic: str,
                                                          ch_client, ch_target) -> None:
    base = (time.time_ns() // 1_000_000 // 60_000 - 60) * 60_000
    sender: Sender | None = None
    agents = fleet_agents(tmp_path, base, lambda i: sender.errors_for(i) if sender else 0)
    sender = Sender(producer_factory(proxied.address), topic, [(a.node, a.spool) for a in agents],
                    backoff=FAST, stall_s=STALL_S).start()
    ticks = 0
    deepest = 0

    def tick_for(seconds: float) -> None:
        nonlocal ticks, deepest
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ticks += 1
            for a in agents:
                a.tick(base + ticks * 1000, 1000)
            sender.notify()
            deepest = max(deepest, *(a.spool.depth for a in agents))
            time.sleep(0.1)

    db = ch_target.database
    try:
        with IngestThread(ingest_cfg(proxied.address, ch_target, topic)) as ing:
            tick_for(1.0)
            wait_until(lambda: ing.stats.messages > 0, "the first messages ingested before the outage")
            errors_before = sender.send_errors_total
            proxied.blackhole()
            tick_for(7.0)
            proxied.cut()
            tick_for(6.0)
            during = [a.spool.depth for a in agents]
            proxied.pass_through()
            tick_for(1.0)
            wait_until(lambda: all(a.spool.depth == 0 for a in agents), "the spools drained after the outage")
            assert sender.stop(5.0) == 0
            expected = ticks * NODES
            wait_until(lambda: ing.stats.messages == expected, f"{expected} messages ingested")
    finally:
        sender.stop(0.5)
        for a in agents:
            a.close()
    # The outage was real: the agents saw errors and held a backlog on disk.
    assert sender.send_errors_total > errors_before
    assert min(during) >= 60  # >= 13 s of 10 ticks/s minus what was in flight when it began
    # Nothing lost, nothing doubled in queries: every node's seqs 0..ticks-1, each GPU once.
    rows = ch_client.query(f"SELECT node, count(), uniqExact(seq), min(seq), max(seq), uniqExact(seq, gpu_index) "
                           f"FROM {db}.gpu_samples GROUP BY node ORDER BY node").result_rows
    assert rows == [(a.node, ticks * GPUS, ticks, 0, ticks - 1, ticks * GPUS) for a in agents]
    assert ch_client.query(f"SELECT sum(samples), sum(reported_ms) FROM {db}.gpu_usage_1m").result_rows == [
        (ticks * NODES * GPUS, ticks * NODES * GPUS * 1000)]
    assert ch_client.query(f"SELECT count(), max(spool_depth) >= 60 FROM {db}.agent_reports FINAL").result_rows == [
        (ticks * NODES, True)]
    # Replayed in order: on the topic each node's messages first appear in seq order (a resend of a
    # message whose acknowledgement was lost may repeat it; the ingester drops such copies).
    order = topic_order(proxied.address, topic)
    for a in agents:
        first_seen = list(dict.fromkeys(order[a.node]))
        assert first_seen == list(range(ticks)), a.node
    print(f"outage: {ticks} intervals x {NODES} nodes, deepest spool {deepest}, "
          f"copies on the topic {sum(map(len, order.values()))} for {ticks * NODES} messages")


def test_full_spool_drops_oldest_first_counted_and_logged(proxied: TcpProxy, tmp_path: Path, topic: str,
                                                          ch_client, ch_target, caplog) -> None:
    base = (time.time_ns() // 1_000_000 // 60_000 - 60) * 60_000
    proxied.cut()
    sizer = fleet_agents(tmp_path / "sizer", base, lambda i: 0)[0]  # the same node, to learn a record's size
    sizer.tick(base + 1000, 1000)
    sizer.tick(base + 2000, 1000)  # the first message also carries the GPUs' inventory: size the second
    size = len(sizer.spool.peek()[1].data) + RECORD_OVERHEAD
    sizer.close()
    keep = 10
    agent = fleet_agents(tmp_path / "real", base, lambda i: 0, spool_bytes=keep * size + size // 2)[0]
    sender = Sender(producer_factory(proxied.address), topic, [(agent.node, agent.spool)], backoff=FAST,
                    stall_s=STALL_S).start()
    caplog.set_level(logging.WARNING, logger="gpufleet.agents.spool")
    try:
        for k in range(1, 26):  # 25 intervals with the broker away: room for about 10 of them
            agent.tick(base + k * 1000, 1000)
        assert agent.spool.depth == keep
        assert agent.spool.dropped_total == 25 - keep
        assert [e.seq for e in agent.spool.peek()] == list(range(25 - keep, 25))  # the oldest went first
        warnings = [r.getMessage() for r in caplog.records if r.name == "gpufleet.agents.spool"]
        assert len(warnings) == 1  # rate-limited, never silent
        assert "is full" in warnings[0]
        assert "dropped the 1 oldest unsent messages" in warnings[0]
        assert "raise agent.spool_max_bytes" in warnings[0]
        proxied.pass_through()
        sender.notify()
        wait_until(lambda: agent.spool.depth == 0, "the spool drained after the outage")
        agent.tick(base + 26 * 1000, 1000)  # this message reports the drops in the agent's health
        sender.notify()
        wait_until(lambda: agent.spool.depth == 0, "the last message delivered")
    finally:
        sender.stop(5.0)
        agent.close()
    with IngestThread(ingest_cfg(proxied.address, ch_target, topic)) as ing:
        wait_until(lambda: ing.stats.messages == keep + 1, "the surviving messages ingested")
    db = ch_target.database
    assert ch_client.query(f"SELECT min(seq), max(seq), uniqExact(seq), count() FROM {db}.gpu_samples").result_rows \
        == [(25 - keep, 25, keep + 1, (keep + 1) * GPUS)]
    # The loss is visible where operators look: the agent's health in agent_reports.
    assert ch_client.query(f"SELECT seq, spool_dropped_total FROM {db}.agent_reports FINAL "
                           "ORDER BY seq DESC LIMIT 1").result_rows == [(25, 25 - keep)]


class _SilentFuture:
    """A record future that never completes, as kafka-python 3.0 left some after a partition."""

    exception = None

    def add_both(self, *_: object) -> None:
        pass


class _SilentProducer:
    def send(self, *_: object, **__: object) -> _SilentFuture:
        return _SilentFuture()

    def close(self, timeout: float | None = None) -> None:
        pass


def test_a_producer_that_never_answers_is_replaced_and_everything_resent(broker, tmp_path: Path, topic: str,
                                                                         caplog) -> None:
    ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap), [topic], partitions=2, environ={})
    real = producer_factory(broker.bootstrap)
    built: list[object] = []

    def factory() -> object:  # the first producer goes silent; its replacement is a real one
        built.append(_SilentProducer() if not built else real())
        return built[-1]

    caplog.set_level(logging.WARNING, logger="gpufleet.agents.sender")
    with Spool(tmp_path, MB) as spool:
        for seq in range(3):
            spool.append(seq, f"message-{seq}".encode())
        sender = Sender(factory, topic, [("n1", spool)], backoff=FAST, stall_s=0.5).start()
        try:
            wait_until(lambda: spool.depth == 0, "the spool drained by the replacement producer")
        finally:
            sender.stop(5.0)
    assert len(built) == 2
    assert sender.send_errors_total == 1
    assert any("Kafka producer stalled: 3 messages of 1 node(s) in flight" in r.getMessage() for r in caplog.records)
    c = KafkaConsumer(topic, **consumer_kwargs(KafkaConfig(bootstrap_servers=broker.bootstrap), group_id=None,
                                               environ={}, consumer_timeout_ms=3000))
    try:
        assert [m.value for m in c] == [b"message-0", b"message-1", b"message-2"]
    finally:
        c.close()
