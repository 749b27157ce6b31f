"""End-to-end ingestion over a real broker (tansu) into real chDB: values, DLQ, dedup, back-off."""

from __future__ import annotations

import hashlib
import threading
import time

import msgspec
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from gpufleet import wire
from gpufleet.config import Config, parse
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.dead_letters import EXCERPT_BYTES
from gpufleet.pipeline.ingest.ingester import Ingester
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import connect
from tests.builders import T0_MS, clock_at, gpu, report


def _cfg(broker, ch_target, topic: str, **ingest: object) -> Config:
    return parse({
        "kafka": {"bootstrap_servers": broker.bootstrap, "topic": topic, "dlq_topic": f"{topic}-dlq"},
        "clickhouse": {"dsn": ch_target.dsn, "database": ch_target.database},
        "ingest": {"group_id": f"g-{topic}", "batch_ms": 200, "max_poll_interval_ms": 3000,
                   "session_timeout_ms": 3000, **ingest},
    })


def _create(broker, *topics: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(t, 2, 1) for t in topics])
    admin.close()


def _produce(broker, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    for key, value in items:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()


def _run_until(ing: Ingester, done, timeout_s: float = 60) -> None:
    stop = threading.Event()
    t = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not done() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(30)
    assert done(), f"ingester did not reach the expected state: {ing.stats}"


def _ingester(cfg: Config, client=None, clock=None) -> Ingester:
    return build_ingester(cfg, Store(client or connect_target(cfg), cfg.clickhouse.database), clock=clock or clock_at())


def connect_target(cfg: Config):
    from gpufleet.pipeline.store.client import Target

    return connect(Target(cfg.clickhouse.dsn, cfg.clickhouse.database), create=True)


def _enc(r) -> tuple[bytes, bytes]:
    return r.node.encode(), wire.encode(r)


def test_samples_arrive_with_exact_values(broker, ch_target, ch_client, topic) -> None:
    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    reports = [report(node=f"n{n}", seq=s, time_ms=T0_MS + 1000 * s) for n in range(3) for s in range(4)]
    reports.append(report(node="n9", seq=0, gpus=[gpu(0, "n9", util_gpu_ratio=None, power_w=123.5, xids=[79, 13],
                                                      tenant="acme", job="j1", error=None)]))
    _produce(broker, topic, [_enc(r) for r in reports])
    ing = _ingester(cfg)
    _run_until(ing, lambda: ing.stats.messages == 13)
    db = ch_target.database
    assert ch_client.query(f"SELECT count() FROM {db}.gpu_samples").result_rows == [(3 * 4 * 2 + 1,)]
    row = ch_client.query(
        f"SELECT util_gpu_ratio, power_w, xids, tenant, job, health, health_reasons, peak_flops, flops_estimated, "
        f"toUnixTimestamp64Milli(time), seq FROM {db}.gpu_samples WHERE node = 'n9'"
    ).result_rows[0]
    # XID 79 is a failing XID, 13 an application error that does not mark the GPU.
    # Estimate: 0.25 tensor activity x 989e12 FLOP/s (H100 SXM) x 1 s.
    assert row == (None, 123.5, [79, 13], "acme", "j1", "failing", ["xid_79"], 989e12, 0.25 * 989e12, T0_MS, 0)
    assert ch_client.query(f"SELECT count() FROM {db}.agent_reports FINAL").result_rows == [(13,)]


def test_bad_messages_go_to_the_dlq_and_neighbours_are_ingested(broker, ch_target, ch_client, topic) -> None:
    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    good = wire.encode(report(node="n1", seq=0))
    doc = msgspec.json.decode(good)
    wrong_type = msgspec.json.encode({**doc, "seq": "seven"})
    missing = msgspec.json.encode({k: v for k, v in doc.items() if k != "gpus"})
    future = msgspec.json.encode({**doc, "schema_version": 99})
    huge = msgspec.json.encode({**doc, "node": "x" * (wire.MAX_MESSAGE_BYTES + 10)})
    bad = [
        (b"n1", good[: len(good) // 2], "not valid JSON"),
        (b"n1", wrong_type, "Expected `int`, got `str` - at `$.seq`"),
        (b"n1", future, "unknown schema_version 99"),
        (b"n1", missing, "missing required field `gpus`"),
        (b"n1", huge, "over the"),
        (b"\xff\xfe", wire.encode(report(node="n1", seq=1)), "key is not UTF-8"),
    ]
    items = [(b"n1", good), *[(k, v) for k, v, _ in bad], (b"n2", wire.encode(report(node="n2", seq=0)))]
    _produce(broker, topic, items)
    ing = _ingester(cfg)
    _run_until(ing, lambda: ing.stats.messages == 2 and ing.stats.dead_letters == len(bad))
    db = ch_target.database
    assert ch_client.query(f"SELECT node, count() FROM {db}.gpu_samples GROUP BY node ORDER BY node").result_rows == [
        ("n1", 2), ("n2", 2)]
    stored = ch_client.query(f"SELECT key, payload, reason FROM {db}.dead_letters FINAL").result_rows
    assert len(stored) == len(bad)
    by_content = {(k, p): reason for k, p, reason in stored}
    for key, value, expected in bad:
        # Kept whole up to the excerpt bound (the oversized one: its first EXCERPT_BYTES, and its digest).
        kept = value[:EXCERPT_BYTES]
        reason = by_content[(key.decode("utf-8", "backslashreplace"), kept.decode("utf-8", "backslashreplace"))]
        assert expected in reason
        assert (hashlib.sha256(value).hexdigest() in reason) == (len(value) > EXCERPT_BYTES)
    # The DLQ topic holds the original bytes (up to the bound) with the reason, size and digest in headers.
    c = KafkaConsumer(cfg.kafka.dlq_topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=5000)
    got = sorted((m.value, dict(m.headers)["gpufleet-size"], dict(m.headers)["gpufleet-sha256"]) for m in c)
    c.close()
    assert got == sorted((v[:EXCERPT_BYTES], str(len(v)).encode(), hashlib.sha256(v).hexdigest().encode())
                         for _, v, _ in bad)


def test_redelivery_and_replay_leave_one_copy(broker, ch_target, ch_client, topic) -> None:
    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    reports = [report(node="n1", seq=s, time_ms=T0_MS + 1000 * s) for s in range(5)]
    # The same messages twice in one stream (agent replay after an unacknowledged send).
    _produce(broker, topic, [_enc(r) for r in reports + reports[2:]])
    ing = _ingester(cfg)
    _run_until(ing, lambda: ing.stats.messages + ing.stats.duplicates == 8)
    assert (ing.stats.messages, ing.stats.duplicates) == (5, 3)
    ing.consumer.close()
    # A second consumer group re-reads everything (redelivery after a crash before commit).
    cfg2 = msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(cfg.ingest, group_id=f"other-{topic}"))
    ing2 = _ingester(cfg2)
    _run_until(ing2, lambda: ing2.stats.duplicates == 8)
    assert ing2.stats.messages == 0
    db = ch_target.database
    assert ch_client.query(f"SELECT count(), uniqExact(seq) FROM {db}.gpu_samples").result_rows == [(10, 5)]


class FlakyClient:
    """Wraps the real chDB client; its first `fail` inserts raise as if ClickHouse were unreachable."""

    def __init__(self, real, fail: int) -> None:
        self.real, self.fail, self.calls = real, fail, 0

    def insert(self, *a, **k):
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError("ClickHouse unreachable (injected)")
        return self.real.insert(*a, **k)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_clickhouse_down_backs_off_and_loses_nothing(broker, ch_target, ch_client, topic) -> None:
    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    reports = [report(node="n1", seq=s, time_ms=T0_MS + 1000 * s) for s in range(3)]
    _produce(broker, topic, [_enc(r) for r in reports])
    flaky = FlakyClient(connect_target(cfg), fail=2)
    ing = _ingester(cfg, client=flaky)
    _run_until(ing, lambda: ing.stats.messages == 3)
    assert ing.stats.insert_errors == 2
    assert ch_client.query(f"SELECT count() FROM {ch_target.database}.gpu_samples").result_rows == [(6,)]


@pytest.mark.parametrize(("key", "reason"), [(None, "no key"), (b"n2", "does not match its node 'n1'")])
def test_key_must_name_the_node(key, reason) -> None:
    from gpufleet.pipeline.ingest.validation import validate

    assert reason in validate(key, wire.encode(report(node="n1")))


class RefusingFirstCommit:
    """Wraps the real consumer; its first commit is refused as after a rebalance (the group moved on)."""

    def __init__(self, real) -> None:
        self.real, self.commits = real, 0

    def commit(self, offsets):
        from kafka.errors import CommitFailedError

        self.commits += 1
        if self.commits == 1:
            raise CommitFailedError("the group has already rebalanced (injected)")
        return self.real.commit(offsets)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_refused_commit_does_not_end_the_loop(broker, ch_target, ch_client, topic) -> None:
    from gpufleet.pipeline.ingest.consumer import build_consumer

    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    consumer = RefusingFirstCommit(build_consumer(cfg))
    ing = build_ingester(cfg, Store(connect_target(cfg), cfg.clickhouse.database), clock=clock_at(), consumer=consumer)
    stop = threading.Event()
    t = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    t.start()
    try:
        _produce(broker, topic, [_enc(report(node="n1", seq=0))])
        deadline = time.monotonic() + 60
        while ing.stats.commit_errors < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        # The loop goes on: a later message is stored and committed.
        _produce(broker, topic, [_enc(report(node="n1", seq=1, time_ms=T0_MS + 1000))])
        while (ing.stats.messages < 2 or consumer.commits < 2) and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(30)
    assert (ing.stats.messages, ing.stats.commit_errors) == (2, 1), ing.stats
    assert consumer.commits >= 2
    assert ch_client.query(f"SELECT count() FROM {ch_target.database}.gpu_samples").result_rows == [(4,)]
