"""Input that used to stall ingest for good (issue 18, items 1 and 2) now lands or is dead-lettered, and ingest goes on.

- A 5 MB value that compresses under the broker's limit: the dead-letter producer checks the
  uncompressed size, refused to re-send it whole, and the batch was retried forever. Dead letters
  are now bounded (pipeline/ingest/dead_letters.py).
- 150 valid messages on 150 days in one batch: ClickHouse refuses an insert block that spans more
  than 100 partitions, and the batch was retried forever. Inserts now go in blocks of at most 50
  days (pipeline/ingest/writer.py `day_blocks`), the same blocks on every retry.

Real tansu broker, real chDB; each wait is bounded (`wait_for`), so the old stall fails the test.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import msgspec
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from gpufleet import kafka, wire
from gpufleet.pipeline.ingest.dead_letters import EXCERPT_BYTES, DeadLetter, dlq_record
from gpufleet.pipeline.ingest.writer import day_blocks
from gpufleet.pipeline.store.client import Target, connect
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import T0_MS, clock_at, gpu, report
from tests.security import ingest_config, running_ingester, wait_for

DAY_MS = 86_400_000
NOW_MS = T0_MS + 3_600_000


# --- pure parts -------------------------------------------------------------------------------

def test_a_dead_letter_carries_at_most_the_excerpt_and_says_what_it_cut() -> None:
    value, key = b"{" + b"x" * 5_000_000, b"k" * 5_000_000
    rec = dlq_record(DeadLetter("samples", 3, 17, key, value, "r" * 5000))
    assert rec.value == value[:65_536]
    assert rec.key == key[:1024]
    assert dict(rec.headers) == {
        "gpufleet-error": b"r" * 1021 + b"...",
        "gpufleet-source": b"samples/3/17",
        "gpufleet-size": b"5000001",
        "gpufleet-sha256": hashlib.sha256(value).hexdigest().encode(),
    }
    size = len(rec.value) + len(rec.key or b"") + sum(len(k) + len(v) for k, v in rec.headers)
    assert size < wire.MAX_MESSAGE_BYTES // 10  # far below what any broker carrying agent messages accepts


def test_a_small_dead_letter_travels_whole() -> None:
    value = wire.encode(report(node="n1"))
    rec = dlq_record(DeadLetter("samples", 0, 5, b"n2", value, "message key 'n2' does not match its node 'n1'"))
    assert (rec.key, rec.value) == (b"n2", value)
    assert dict(rec.headers)["gpufleet-error"] == b"message key 'n2' does not match its node 'n1'"


def _on_days(days: list[int]) -> list[wire.NodeReport]:
    return [report(seq=i, time_ms=d * DAY_MS + 1000) for i, d in enumerate(days)]


def test_insert_blocks_span_at_most_50_days() -> None:
    assert day_blocks(_on_days(list(range(150)))) == [0] * 50 + [1] * 50 + [2] * 50
    # Two messages a day for 51 days: the 51st day opens a second block.
    assert day_blocks(_on_days([d for d in range(51) for _ in range(2)])) == [0] * 100 + [1] * 2
    # 50 days (or fewer), however many messages: one block, as before blocks existed.
    assert day_blocks(_on_days([d for d in range(20_000, 20_050) for _ in range(3)])) == [0] * 150
    # Days with gaps count as the days there are, not the span.
    assert day_blocks(_on_days([0, 10, 100, 1000])) == [0, 0, 0, 0]
    assert day_blocks([]) == []


# --- through the real ingester -----------------------------------------------------------------

def _produce_large(cfg: Any, items: list[tuple[bytes, bytes]]) -> None:
    """Send as an agent's producer does (lz4), allowing values far larger than the agent ever sends."""
    producer = KafkaProducer(**kafka.producer_kwargs(cfg.kafka, client_id="test-agent"),
                             max_request_size=16 * 1024 * 1024)
    try:
        futures = [producer.send(cfg.kafka.topic, key=k, value=v) for k, v in items]
        producer.flush(timeout=60)
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close(timeout=10)


def _committed(cfg: Any) -> int | None:
    c = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=cfg.ingest.group_id,
                      enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(cfg.kafka.topic, 0))
    finally:
        c.close()


def test_an_oversized_message_that_compresses_well_is_dead_lettered_and_ingest_goes_on(
        broker, ch_target, ch_client, topic) -> None:
    doc = msgspec.to_builtins(report(node="big", seq=0))
    doc["cluster"] = "x" * 5_000_000  # 5 MB of JSON; lz4 makes it a few KB on the wire
    big = msgspec.json.encode(doc)
    good = wire.encode(report(node="n1", seq=0, time_ms=T0_MS))
    cfg = ingest_config(broker.bootstrap, ch_target, topic)
    with running_ingester(cfg, clock=clock_at(NOW_MS)) as ing:
        _produce_large(cfg, [(b"big", big), (b"n1", good)])
        wait_for(ing, lambda: ing.stats.messages == 1 and ing.stats.dead_letters == 1,
                 "the oversized message dead-lettered and its neighbour stored", timeout_s=60)
    db = ch_target.database
    assert ch_client.query(f"SELECT node, count() FROM {db}.gpu_samples GROUP BY node").result_rows == [("n1", 2)]
    digest = hashlib.sha256(big).hexdigest()
    assert ch_client.query(f"SELECT offset, key, reason, payload FROM {db}.dead_letters FINAL").result_rows == [(
        0, "big",
        f"message is {len(big)} bytes, over the 1000000-byte limit [kept the first 65536 of {len(big)} bytes, "
        f"sha256 {digest}; the whole message is at {topic}/0/0 while that topic retains it]",
        big[:EXCERPT_BYTES].decode(),
    )]
    c = KafkaConsumer(cfg.kafka.dlq_topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=5000)
    got = [(m.key, m.value, dict(m.headers)) for m in c]
    c.close()
    assert got == [(b"big", big[:EXCERPT_BYTES], {
        "gpufleet-error": f"message is {len(big)} bytes, over the 1000000-byte limit".encode(),
        "gpufleet-source": f"{topic}/0/0".encode(),
        "gpufleet-size": str(len(big)).encode(),
        "gpufleet-sha256": digest.encode(),
    })]
    assert _committed(cfg) == 2  # both messages committed: nothing held back


class FailingRawInsert:
    """The real chDB client, except that its `raw_insert` number `fail` (a JSON block) fails once: refused
    before anything is written (`landed=False`: that block then goes as columns), or carried out and
    reported as failed, the acknowledgement lost (`landed=True`: the block is repeated as it was)."""

    def __init__(self, real: Any, fail: int, landed: bool) -> None:
        self.real, self.fail, self.landed, self.calls = real, fail, landed, 0

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail and not self.landed:
            raise ConnectionError("insert refused (injected)")
        out = self.real.raw_insert(*args, **kwargs)
        if self.calls == self.fail:
            raise ConnectionError("acknowledgement lost (injected)")
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("landed", [True, False], ids=["ack-lost", "refused"])
def test_a_batch_on_150_days_lands_in_blocks_and_a_retry_repeats_the_same_blocks(
        broker, ch_client, chdb_dsn, topic, landed: bool) -> None:
    # ClickHouse applies the raw TTL by its own clock, so the store keeps 400 days and the days are real ones.
    db = f"t_{uuid.uuid4().hex[:12]}"
    migrate(ch_client, SchemaOptions(database=db, raw_ttl_days=400))
    cfg = ingest_config(broker.bootstrap, Target(chdb_dsn, db), topic)
    cfg = msgspec.structs.replace(cfg, clickhouse=msgspec.structs.replace(cfg.clickhouse, raw_ttl_days=400),
                                  ingest=msgspec.structs.replace(cfg.ingest, batch_ms=3000,
                                                                 max_poll_interval_ms=20_000))
    # (A generous poll interval: a busy machine's slow retry must not cost the group membership here.)
    # One message a day for 150 days, each 2 GPUs of tenant acme; all produced before the group joins.
    base = (time.time_ns() // 1_000_000 // 60_000 - 1) * 60_000
    reports = [report(node="n1", seq=d, time_ms=base - d * DAY_MS,
                      gpus=[gpu(i, "n1", tenant="acme", job="j") for i in range(2)]) for d in range(150)]
    client = FailingRawInsert(connect(Target(cfg.clickhouse.dsn, cfg.clickhouse.database)), fail=2, landed=landed)
    with running_ingester(cfg, client=client, start=False) as ing:
        _produce_large(cfg, [(b"n1", wire.encode(r)) for r in reports])
        ing.thread.start()  # type: ignore[attr-defined]
        wait_for(ing, lambda: ing.stats.messages == 150, "150 messages on 150 days stored", timeout_s=60)
    assert (ing.stats.batches, ing.stats.insert_errors) == (1, 1)  # one batch, retried once after block 2 of 3
    one = lambda sql: ch_client.query(sql).result_rows  # noqa: E731
    assert one(f"SELECT count(), uniqExact(seq), uniqExact(toDate(time)) FROM {db}.gpu_samples") == [(300, 150, 150)]
    assert one(f"SELECT count() FROM {db}.agent_reports FINAL") == [(150,)]
    # Every day's hour billed once: 2 GPUs x 1 s, in 150 distinct hours, in both rollups.
    assert one(f"SELECT sum(samples), sum(reported_ms), uniqExact(minute) FROM {db}.gpu_usage_1m") == [
        (300, 300_000, 150)]
    assert one(f"SELECT sum(s), sum(r), count(), min(r), max(r) FROM (SELECT hour, sum(samples) AS s, "
               f"sum(reported_ms) AS r FROM {db}.gpu_usage_1h GROUP BY hour)") == [(300, 300_000, 150, 2000, 2000)]
    ch_client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
