"""Item 5: how fresh the data is, sample timestamp to queryable row, and a GPU failure to its alert.

A load generator plays `nodes` simulated 8-GPU nodes in real time: on every 1 s boundary it
collects each node at that instant and produces its message as an agent does (the agents'
producer settings, keyed by node), so `time` is the sample's wall-clock timestamp. The real
ingester (default settings: `batch_ms` 1000) consumes through the embedded broker into chDB,
and the real alert evaluator (default rules, default `alerts.interval_s`) notifies a real
Alertmanager.

- Freshness: the moment each GPU row became queryable is when the insert carrying it returned
  (the ingester's inserts are timed here, keyed by the batch's `ingest_time`); freshness is that
  moment minus the row's `time`. `ingest_time - time` (what the fleet board's lag panel shows) is
  reported too. The first `warmup_s` are left out (the consumer group joining).
- Alert latency: after the warm-up, one GPU starts reporting XID 79 (fallen off the bus: failing
  on its first sample); the latency is from that sample's timestamp to the first time
  Alertmanager's `GET /api/v2/alerts` lists `GpuFailing` for it (polled every 20 ms).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import percentile


class _InsertClock:
    """Wraps the ingester's insert functions: when the insert stamped `ingest_ms` returned."""

    def __init__(self) -> None:
        self.done: dict[int, float] = {}
        self._lock = threading.Lock()

    def install(self) -> Any:
        from gpufleet.pipeline.ingest import staging, writer

        original_json, original_columns = staging.insert, writer.insert_columns
        clock = self

        def json_insert(store: Any, path: Any, block: Any, *args: Any, **kwargs: Any) -> None:
            original_json(store, path, block, *args, **kwargs)
            clock._stamp(bytes(block[-20:]))

        def columns_insert(store: Any, table: str, cols: Any, *args: Any, **kwargs: Any) -> None:
            original_columns(store, table, cols, *args, **kwargs)
            if table == "gpu_samples" and cols.rows:
                with clock._lock:
                    clock.done.setdefault(int(cols.data[2][0]), time.time() * 1000)

        staging.insert = json_insert
        writer.insert_columns = columns_insert

        def restore() -> None:
            staging.insert, writer.insert_columns = original_json, original_columns

        return restore

    def _stamp(self, tail: bytes) -> None:
        # every row of a block ends with ',"_t":<ingest_ms>}\n'
        ingest_ms = int(tail.rsplit(b'"_t":', 1)[1].rstrip(b"}\n"))
        with self._lock:
            self.done.setdefault(ingest_ms, time.time() * 1000)


def _load(cfg: Any, nodes: int, seconds: float, fail_at_ms: int, stop: threading.Event,
          sent: list[int]) -> None:
    """Produce one message per node per second, stamped with the boundary it was collected at."""
    import msgspec
    from kafka import KafkaProducer

    from gpufleet import kafka, wire
    from gpufleet.agents.collectors.simulated import SimulatedFleet

    start = (int(time.time() * 1000) // 1000 + 1) * 1000
    fleet = SimulatedFleet(nodes=nodes, start_ms=start, faults=[], cluster="fresh")
    producer = KafkaProducer(**kafka.producer_kwargs(cfg.kafka, client_id="bench-freshness"))
    seq = 0
    t = start
    try:
        while not stop.is_set() and t < start + seconds * 1000:
            delay = t / 1000 - time.time()
            if delay > 0:
                time.sleep(delay)
            for i, node in enumerate(fleet.nodes):
                gpus = node.collect(t)
                if i == 0 and t >= fail_at_ms:
                    gpus[3] = msgspec.structs.replace(gpus[3], xids=[79])
                report = wire.NodeReport(schema_version=wire.SCHEMA_VERSION, cluster="fresh", node=node.name,
                                         boot_id="boot-1", seq=seq, time_ms=t, interval_ms=1000, gpus=gpus)
                producer.send(cfg.kafka.topic, key=node.name.encode(), value=wire.encode(report))
            producer.flush()
            sent[0] += nodes
            seq += 1
            t += 1000
    finally:
        producer.close()


def run(workdir: Path, nodes: int = 128, seconds: float = 40.0, warmup_s: float = 10.0) -> dict[str, Any]:
    from gpufleet import kafka
    from gpufleet.config import parse
    from gpufleet.embedded.alertmanager import EmbeddedAlertmanager, find_binary
    from gpufleet.embedded.broker import EmbeddedBroker
    from gpufleet.pipeline.alerts.alertmanager import AlertmanagerClient
    from gpufleet.pipeline.alerts.evaluator import Evaluator
    from gpufleet.pipeline.ingest.consumer import build_ingester
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.client import Target, connect
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

    dsn = f"chdb://{(workdir / 'chdb').resolve()}"
    db = f"bench_fresh_{uuid.uuid4().hex[:8]}"
    client = connect(Target(dsn, db), create=True)
    migrate(client, SchemaOptions(database=db))
    clock = _InsertClock()
    restore = clock.install()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    result: dict[str, Any] = {"nodes": nodes, "gpus": nodes * 8, "seconds": seconds, "interval_ms": 1000}
    am = EmbeddedAlertmanager(workdir / f"am-{uuid.uuid4().hex[:6]}") if find_binary() else None
    try:
        with EmbeddedBroker() as broker:
            if am is not None:
                am.start()
            topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
            cfg = parse({"kafka": {"bootstrap_servers": broker.bootstrap, "topic": topic,
                                   "dlq_topic": f"{topic}-dlq"},
                         "clickhouse": {"dsn": dsn, "database": db},
                         "ingest": {"group_id": f"fresh-{topic}"}})
            kafka.ensure_topics(cfg.kafka)
            ing = build_ingester(cfg, Store(client, db))
            threads.append(threading.Thread(target=ing.run, args=(stop,), name="ingest", daemon=True))
            evaluator = None
            if am is not None:
                evaluator = Evaluator(cfg, Store.open(Target(dsn, db)), am.url)
                result["alerts_interval_s"] = cfg.alerts.interval_s
                threads.append(threading.Thread(target=evaluator.run, args=(stop,), name="alerts", daemon=True))
            fail_at = (int(time.time() * 1000) // 1000 + int(warmup_s) + 12) * 1000
            sent = [0]
            load = threading.Thread(target=_load, args=(cfg, nodes, seconds, fail_at, stop, sent), daemon=True)
            for th in threads:
                th.start()
            load.start()
            alert_seen = None
            if am is not None:
                watcher = AlertmanagerClient(am.url)
                deadline = time.time() + seconds + 20
                while time.time() < deadline and alert_seen is None:
                    for a in watcher.alerts(filters=['alertname="GpuFailing"']):
                        if a["labels"].get("node") == "fresh-node-000":
                            alert_seen = time.time() * 1000
                    time.sleep(0.02)
            load.join()
            deadline = time.time() + 30
            while ing.stats.messages < sent[0] and time.time() < deadline:
                time.sleep(0.1)
            stop.set()
            for th in threads:
                th.join(30)
            ing.consumer.close()
    finally:
        stop.set()
        restore()
        if am is not None:
            am.stop()
    rows = client.query(
        f"SELECT toUnixTimestamp64Milli(time), toUnixTimestamp64Milli(ingest_time), count() "
        f"FROM {db}.gpu_samples GROUP BY 1, 2").result_rows
    client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
    first = min((t for t, _, _ in rows), default=0)
    fresh: list[float] = []
    lag: list[float] = []
    missing = 0
    for t, ingest, n in rows:
        if t < first + warmup_s * 1000:
            continue
        done = clock.done.get(ingest)
        if done is None:
            missing += n
            continue
        fresh.extend([(done - t) / 1000] * n)
        lag.extend([(ingest - t) / 1000] * n)
    result.update({
        "messages_sent": sent[0], "messages_stored": ing.stats.messages, "rows_measured": len(fresh),
        "rows_without_insert_time": missing,
        "freshness_p50_s": statistics.median(fresh) if fresh else None,
        "freshness_p99_s": percentile(fresh, 99) if fresh else None,
        "freshness_max_s": max(fresh) if fresh else None,
        "ingest_lag_p50_s": statistics.median(lag) if lag else None,
        "ingest_lag_p99_s": percentile(lag, 99) if lag else None,
        "target_freshness_p99_s": 2.0,
        "alert": ({"status": "ok", "latency_s": (alert_seen - fail_at) / 1000} if alert_seen is not None else
                  {"status": "not run" if am is None else "not seen",
                   "reason": "Alertmanager not installed" if am is None else "no GpuFailing alert in time"}),
        "target_alert_s": 5.0,
    })
    return result
