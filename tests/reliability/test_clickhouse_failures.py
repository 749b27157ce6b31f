"""ClickHouse refusing inserts: the ingester holds its offsets, backs off, says why, and catches up exactly.

The failure is ClickHouse's own "disk full" refusal (NOT_ENOUGH_SPACE, code 243), switched on per
table with the MergeTree setting `min_free_disk_bytes_to_perform_insert` set above the disk's size
and switched off with `RESET SETTING`: the engine's real check on a real store, no fake client.
(chDB runs in this process, so a full or read-only filesystem cannot be mounted under it here.)

- every table the ingester writes refuses: nothing is stored, nothing committed, then all of it;
- only the last rollup refuses (`gpu_usage_1h`, as when rollups live on their own volume): the
  insert has already put the raw rows and the minute rollup in, so a retry must complete the
  hour rollup without doubling the others. Billing reads the hour rollup.

An unreachable server DSN at start-up is refused before any data moves (the configuration checks,
docs/security.md); a server lost while running is the back-off in tests/pipeline/test_ingest.py.
"""

from __future__ import annotations

import threading
import time

from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from gpufleet import wire
from gpufleet.config import Config, KafkaConfig, parse
from gpufleet.embedded.broker import EmbeddedBroker
from gpufleet.kafka import ensure_topics
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.ingester import Ingester
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from tests.builders import gpu, report
from tests.reliability.harness import wait_until

FULL = "min_free_disk_bytes_to_perform_insert = 1000000000000000000"
WRITTEN = ("agent_reports", "gpu_samples", "gpu_usage_1m", "gpu_usage_1h", "gpu_latest", "gpu_claim_homes",
           "dead_letters")
PARTITIONS = 2


def _cfg(broker: EmbeddedBroker, target: Target, topic: str) -> Config:
    return parse({
        "kafka": {"bootstrap_servers": broker.bootstrap, "topic": topic, "dlq_topic": f"{topic}-dlq"},
        "clickhouse": {"dsn": target.dsn, "database": target.database},
        "ingest": {"group_id": f"g-{topic}", "batch_ms": 200, "max_poll_interval_ms": 4000,
                   "session_timeout_ms": 3000},
    })


def _produce(broker: EmbeddedBroker, topic: str, nodes: int, seqs: int) -> int:
    """`nodes` x `seqs` messages of 2 GPUs each (GPU 0 of tenant acme, GPU 1 unallocated)."""
    ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap), [topic, f"{topic}-dlq"], partitions=PARTITIONS,
                  environ={})
    base = (time.time_ns() // 1_000_000 // 60_000 - 90) * 60_000
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for n in range(nodes):
        for s in range(seqs):
            name = f"cf{n}"
            r = report(node=name, seq=s, time_ms=base + (s + 1) * 1000,
                       gpus=[gpu(0, name, tenant="acme", job="j"), gpu(1, name)])
            p.send(topic, key=name.encode(), value=wire.encode(r))
    p.flush()
    p.close()
    return nodes * seqs


def _committed(broker: EmbeddedBroker, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        group = f"g-{topic}"
        offsets = admin.list_group_offsets({group: [TopicPartition(topic, p) for p in range(PARTITIONS)]})[group]
    finally:
        admin.close()
    return sum(o.offset for o in offsets.values() if o.offset > 0)


class _Running:
    def __init__(self, cfg: Config) -> None:
        self.ing = build_ingester(cfg, Store.open(Target(cfg.clickhouse.dsn, cfg.clickhouse.database), create=True))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.ing.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Ingester:
        self.thread.start()
        return self.ing

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        self.ing.consumer.close()


def _counts(ch_client, db: str) -> tuple:
    return (
        ch_client.query(f"SELECT count(), uniqExact(node, seq, gpu_index) FROM {db}.gpu_samples").result_rows[0],
        ch_client.query(f"SELECT count() FROM {db}.agent_reports FINAL").result_rows[0][0],
        ch_client.query(f"SELECT sum(samples), sum(reported_ms) FROM {db}.gpu_usage_1m").result_rows[0],
        ch_client.query(f"SELECT sum(samples), sum(reported_ms) FROM {db}.gpu_usage_1h").result_rows[0],
        ch_client.query(f"SELECT tenant, sum(billable_gpu_seconds) FROM {db}.usage_hourly "
                        "GROUP BY tenant").result_rows,
    )


def _expected(messages: int) -> tuple:
    """By hand: 2 rows per message, 1 s each; only GPU 0 (acme) is billed."""
    return ((2 * messages, 2 * messages), messages, (2 * messages, 2000 * messages), (2 * messages, 2000 * messages),
            [("acme", float(messages))])


def test_disk_full_everywhere_holds_offsets_then_catches_up(broker, ch_client, ch_target, topic) -> None:
    db = ch_target.database
    for table in WRITTEN:
        ch_client.command(f"ALTER TABLE {db}.{table} MODIFY SETTING {FULL}")
    total = _produce(broker, topic, nodes=4, seqs=25)
    with _Running(_cfg(broker, ch_target, topic)) as ing:
        wait_until(lambda: ing.stats.insert_errors >= 2, "two failed insert attempts")
        assert ing.stats.backing_off
        assert "Could not perform insert" in ing.stats.last_error  # reported: status API and log
        assert ing.stats.messages == 0
        assert _committed(broker, topic) == 0  # offsets held while ClickHouse refuses
        assert ch_client.query(f"SELECT count() FROM {db}.gpu_samples").result_rows == [(0,)]
        for table in WRITTEN:
            ch_client.command(f"ALTER TABLE {db}.{table} RESET SETTING min_free_disk_bytes_to_perform_insert")
        wait_until(lambda: ing.stats.messages == total, "the ingester catching up")
        wait_until(lambda: _committed(broker, topic) == total, "the offsets committed")
        assert not ing.stats.backing_off
        assert ing.stats.last_error == ""
    assert _counts(ch_client, db) == _expected(total)


def test_a_rollup_refusing_after_the_raw_rows_landed_is_completed_not_doubled(broker, ch_client, ch_target,
                                                                               topic) -> None:
    db = ch_target.database
    ch_client.command(f"ALTER TABLE {db}.gpu_usage_1h MODIFY SETTING {FULL}")
    total = _produce(broker, topic, nodes=4, seqs=25)
    with _Running(_cfg(broker, ch_target, topic)) as ing:
        wait_until(lambda: ing.stats.insert_errors >= 1, "a failed insert attempt")
        # The first attempt got the raw rows and the minute rollup in before the hour rollup refused.
        raw, m1, h1 = (ch_client.query(f"SELECT count() FROM {db}.{t}").result_rows[0][0]
                       for t in ("gpu_samples", "gpu_usage_1m", "gpu_usage_1h"))
        assert raw > 0
        assert m1 > 0
        assert h1 == 0
        assert _committed(broker, topic) == 0
        ch_client.command(f"ALTER TABLE {db}.gpu_usage_1h RESET SETTING min_free_disk_bytes_to_perform_insert")
        wait_until(lambda: _committed(broker, topic) == total, "the offsets committed")
    assert _counts(ch_client, db) == _expected(total)
