"""The ingester killed with SIGKILL (repeatedly, at random moments and at chosen ones) loses and doubles nothing.

The ingester runs as a child process (`gpufleet ingest`, its own chDB store) fed by a producer in
this process; the store is read back by a probe process once no ingester owns it. Every message
is built here by hand, so the expected rows and billed seconds are computed independently:

- 8 nodes x 4 GPUs, one message per node per (1 s) interval;
- GPUs 0 and 1 belong to tenant `acme`, GPU 2 to `beta`, GPU 3 to no one;
- on every 7th interval GPU 1 reports XID 79 (fallen off the bus): failing, so not billed.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from gpufleet import wire
from gpufleet.config import KafkaConfig
from gpufleet.embedded.broker import EmbeddedBroker
from gpufleet.kafka import ensure_topics
from tests.builders import gpu, report
from tests.reliability.harness import Child, gpufleet, probe, wait_until, write_config

NODES = 8
PARTITIONS = 4
INTERVAL_MS = 1000


def _base_ms() -> int:
    return (time.time_ns() // 1_000_000 // 60_000 - 180) * 60_000  # three hours ago, on a minute


def message(node: int, seq: int, base_ms: int) -> wire.NodeReport:
    name = f"kn{node}"
    gpus = [gpu(0, name, tenant="acme", job="train"),
            gpu(1, name, tenant="acme", job="train", **({"xids": [79]} if seq % 7 == 0 else {})),
            gpu(2, name, tenant="beta", job="infer"),
            gpu(3, name)]
    return report(node=name, seq=seq, time_ms=base_ms + (seq + 1) * INTERVAL_MS, gpus=gpus, boot_id=f"boot-{name}")


def expected_billed_s(seqs_per_node: list[int]) -> dict[str, float]:
    """Billable GPU-seconds by hand: acme bills GPU 0 always and GPU 1 unless failing; beta bills GPU 2."""
    acme = beta = 0
    for count in seqs_per_node:
        for seq in range(count):
            acme += 1 + (seq % 7 != 0)
            beta += 1
    return {"acme": float(acme * INTERVAL_MS // 1000), "beta": float(beta * INTERVAL_MS // 1000)}


class Producer:
    """Sends one message per node every `every_s` until stopped; remembers how many it sent per node."""

    def __init__(self, bootstrap: str, topic: str, every_s: float, nodes: int = NODES) -> None:
        self.bootstrap, self.topic, self.every_s, self.nodes = bootstrap, topic, every_s, nodes
        self.sent = [0] * nodes
        self.base_ms = _base_ms()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        p = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        try:
            while not self._stop.is_set():
                futures = [p.send(self.topic, key=f"kn{n}".encode(), value=wire.encode(message(n, self.sent[n],
                                                                                               self.base_ms)))
                           for n in range(self.nodes)]
                for f in futures:
                    f.get(30)
                self.sent = [s + 1 for s in self.sent]
                self._stop.wait(self.every_s)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            p.close()

    def start(self) -> Producer:
        self._thread.start()
        return self

    def halt(self) -> None:
        self._stop.set()

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(60)
        assert self.error is None, f"producer failed: {self.error!r}"
        return self.sent


def committed(bootstrap: str, group: str, topic: str) -> int:
    """Messages the group has committed (sum of committed offsets over the topic's partitions)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({group: [TopicPartition(topic, p) for p in range(PARTITIONS)]})[group]
    finally:
        admin.close()
    return sum(o.offset for o in offsets.values() if o.offset > 0)


STORED = "SELECT uniqExact(node, seq) FROM {db}.gpu_samples"
CHECKS = [
    "SELECT count(), uniqExact(cluster, node, boot_id, seq, gpu_index) FROM {db}.gpu_samples",
    "SELECT node, count(DISTINCT seq), min(seq), max(seq) FROM {db}.gpu_samples GROUP BY node ORDER BY node",
    "SELECT count() FROM {db}.agent_reports FINAL",
    "SELECT tenant, sum(billable_gpu_seconds) FROM {db}.usage_hourly GROUP BY tenant ORDER BY tenant",
    "SELECT sum(samples) FROM {db}.gpu_usage_1m",
    "SELECT sum(samples) FROM {db}.gpu_usage_1h",
]


def check_store(dsn: str, db: str, sent: list[int]) -> None:
    """Every produced sample once, in every table, and billed exactly as computed by hand."""
    messages = sum(sent)
    (rows,), per_node, (reports,), billed, (m1,), (h1,) = probe(dsn, db, CHECKS)
    assert rows == [messages * 4, messages * 4]
    assert per_node == [[f"kn{n}", sent[n], 0, sent[n] - 1] for n in range(NODES)]
    assert reports == [messages]
    assert dict(map(tuple, billed)) == expected_billed_s(sent)
    assert m1 == [messages * 4]
    assert h1 == [messages * 4]


def _setup(broker: EmbeddedBroker, tmp_path: Path, topic: str) -> tuple[Path, str, str]:
    dsn, db = f"chdb://{tmp_path / 'store'}", "killed"
    cfg = write_config(tmp_path / "gpufleet.yaml", broker.bootstrap, topic, dsn, db)
    ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap), [topic, f"{topic}-dlq"], partitions=PARTITIONS,
                  environ={})
    return cfg, dsn, db


def test_sigkill_three_times_while_agents_send(broker: EmbeddedBroker, tmp_path: Path, topic: str) -> None:
    cfg, dsn, db = _setup(broker, tmp_path, topic)
    group = f"g-{topic}"
    rng = random.Random(8)
    producer = Producer(broker.bootstrap, topic, every_s=0.05).start()
    ingester = Child(gpufleet("ingest", "--config", str(cfg)), tmp_path / "ingest.log").start()
    kills: list[tuple[int, int]] = []
    try:
        for _ in range(3):
            before = committed(broker.bootstrap, group, topic)
            wait_until(lambda b=before: committed(broker.bootstrap, group, topic) > b,
                       "the ingester committing a batch since its (re)start", every_s=0.2)
            time.sleep(rng.uniform(0.0, 0.8))  # land anywhere in poll / insert / commit
            ingester.kill()
            done = committed(broker.bootstrap, group, topic)
            (stored,), = probe(dsn, db, [STORED])[0]
            kills.append((done, stored))
            ingester = Child(gpufleet("ingest", "--config", str(cfg)), tmp_path / "ingest.log").start()
        sent = producer.stop()
        total = sum(sent)
        wait_until(lambda: committed(broker.bootstrap, group, topic) == total, "the ingester catching up")
        assert ingester.stop() == 0, ingester.log()[-3000:]
    finally:
        producer.halt()
        if ingester.alive:
            ingester.kill()
    # Commit-after-store: at every kill the store held at least what was committed (the rest is
    # redelivered and dropped as duplicates).
    for done, stored in kills:
        assert stored >= done, kills
    print(f"kills (committed, stored): {kills}; produced {total} messages")
    check_store(dsn, db, sent)


@pytest.mark.parametrize("point", ["insert:2", "commit:1"])
def test_sigkill_at_the_worst_moments(broker: EmbeddedBroker, tmp_path: Path, topic: str, point: str) -> None:
    """insert:2 dies after agent_reports was written and before the GPU rows; commit:1 after the whole
    batch is stored and before its offsets are committed. Both are redelivered and stored once."""
    cfg, dsn, db = _setup(broker, tmp_path, topic)
    base = _base_ms()
    sent = [12] * NODES
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for seq in range(12):
        for n in range(NODES):
            p.send(topic, key=f"kn{n}".encode(), value=wire.encode(message(n, seq, base)))
    p.flush()
    p.close()
    crash = Child([sys.executable, "-m", "tests.reliability.crashing_ingester", str(cfg), point],
                  tmp_path / "crash.log").start()
    crash.proc.wait(120)  # type: ignore[union-attr]
    assert crash.proc.returncode == -9, crash.log()[-3000:]  # type: ignore[union-attr]
    assert committed(broker.bootstrap, f"g-{topic}", topic) == 0
    (samples,), (reports,) = (r[0] for r in probe(dsn, db, [STORED, "SELECT count() FROM {db}.agent_reports FINAL"]))
    if point == "insert:2":
        assert samples == 0
        assert reports > 0  # the first write of the batch landed, the second never started
    else:
        assert samples > 0
        assert samples == reports  # the batch is stored whole, its offsets are not committed
    ingester = Child(gpufleet("ingest", "--config", str(cfg)), tmp_path / "ingest.log").start()
    try:
        wait_until(lambda: committed(broker.bootstrap, f"g-{topic}", topic) == sum(sent), "the ingester catching up")
        assert ingester.stop() == 0, ingester.log()[-3000:]
    finally:
        if ingester.alive:
            ingester.kill()
    check_store(dsn, db, sent)


FULL = "min_free_disk_bytes_to_perform_insert = 1000000000000000000"


def test_a_batch_cut_short_by_a_crash_is_completed_on_restart(broker: EmbeddedBroker, tmp_path: Path,
                                                               topic: str) -> None:
    """The hour rollup refuses inserts (disk full), so the first batch's insert lands in gpu_samples and the
    minute rollup only; the ingester is then killed. Its restart finds that batch in the ledger, unfinished
    (its offsets not committed), and repeats it exactly before anything else (pipeline/ingest/ledger.py):
    ClickHouse drops the rows it has and completes the hour rollup."""
    cfg, dsn, db = _setup(broker, tmp_path, topic)
    sent = [10] * NODES
    assert Child(gpufleet("migrate", "--dsn", dsn, "--database", db), tmp_path / "migrate.log").start().wait() == 0
    probe(dsn, db, [], [f"ALTER TABLE {{db}}.gpu_usage_1h MODIFY SETTING {FULL}"])
    base = _base_ms()
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for seq in range(10):
        for n in range(NODES):
            p.send(topic, key=f"kn{n}".encode(), value=wire.encode(message(n, seq, base)))
    p.flush()
    p.close()
    first = Child(gpufleet("ingest", "--config", str(cfg)), tmp_path / "ingest1.log").start()
    try:
        wait_until(lambda: "insert failed" in first.log(), "the first insert to fail on the hour rollup")
    finally:
        first.kill()
    entries, (raw,), (hour,) = probe(
        dsn, db, ["SELECT partition, first_offset, last_offset FROM {db}.ingest_batches WHERE kind = 'batch'",
                  STORED, "SELECT count() FROM {db}.gpu_usage_1h"],
        ["ALTER TABLE {db}.gpu_usage_1h RESET SETTING min_free_disk_bytes_to_perform_insert"])
    assert len(entries) == 1  # batches are written one at a time: the first one is the one cut short
    assert raw[0] > 0
    assert hour == [0]  # cut short: raw rows in, hour rollup missing
    assert committed(broker.bootstrap, f"g-{topic}", topic) == 0
    second = Child(gpufleet("ingest", "--config", str(cfg)), tmp_path / "ingest2.log").start()
    try:
        wait_until(lambda: committed(broker.bootstrap, f"g-{topic}", topic) == sum(sent), "the ingester catching up")
        assert second.stop() == 0, second.log()[-3000:]
    finally:
        if second.alive:
            second.kill()
    check_store(dsn, db, sent)
    partition, first_offset, last_offset = entries[0]
    repeat = f"partition {topic}/{partition}: repeating its unfinished batch [{first_offset}, {last_offset}]"
    assert repeat in second.log()
