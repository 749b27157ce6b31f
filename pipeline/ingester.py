"""The ingester: a Kafka consumer-group member that validates, batches and inserts into ClickHouse.

Delivery contract (docs/reliability.md):
- offsets are committed only after ClickHouse acknowledged the batch (and the DLQ copies of
  its bad messages were acknowledged by the broker): at-least-once, never at-most-once;
- duplicates (redelivery, agent spool replay) are dropped before insert (pipeline/dedup.py),
  so queries and rollups see each sample once;
- a message that fails validation goes to the dead-letter topic with the reason and its original
  bytes, and to `dead_letters` in ClickHouse; its neighbours are ingested;
- ClickHouse unreachable: the consumer pauses (staying in its group), backs off with jitter up to
  `MAX_BACKOFF_S`, and retries the same batch; nothing is committed meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tenacity

from gpufleet import wire
from gpufleet.config import Config
from pipeline import dedup
from pipeline.rows import Deriver, agent_columns, insert_columns, sample_columns

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0


@dataclass
class IngestStats:
    """Counters the live view, the status API and the benchmarks read (one writer: the ingest thread)."""

    messages: int = 0
    rows: int = 0
    batches: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    insert_errors: int = 0
    last_flush_ms: int = 0
    last_sample_ms: int = 0
    last_error: str = ""
    backing_off: bool = False


@dataclass
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str


@dataclass
class Batch:
    reports: list[wire.NodeReport] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    offsets: dict[Any, int] = field(default_factory=dict)
    """TopicPartition -> next offset to commit."""
    started: float = 0.0
    gpu_rows: int = 0

    def __len__(self) -> int:
        return len(self.reports) + len(self.dead)


def validate(key: bytes | None, value: bytes | None) -> wire.NodeReport | str:
    """The report, or the reason it is dead-lettered."""
    if value is None:
        return "empty message (tombstone): agents never send one"
    try:
        report = wire.decode(value)
    except wire.WireError as exc:
        return str(exc)
    if key is None:
        return "message has no key: agents key each message by node name"
    try:
        node = key.decode("utf-8")
    except UnicodeDecodeError:
        return "message key is not UTF-8: agents key each message by node name"
    if node != report.node:
        return f"message key {node!r} does not match its node {report.node!r}"
    return report


class Ingester:
    """Consume `kafka.topic`, insert into `clickhouse.database`; call `run(stop)` in a thread."""

    def __init__(
        self,
        cfg: Config,
        client: Client,
        consumer: Any,
        dlq_producer: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.consumer = consumer
        self.dlq = dlq_producer
        self.clock = clock
        self.db = cfg.clickhouse.database
        self.stats = IngestStats()
        self.deriver = Deriver(cfg.health, cfg.peak_flops)
        self.batch = Batch()
        self._stop = threading.Event()

    # --- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Poll, batch and flush until `stop` is set; flushes what it holds before returning."""
        if stop is not None:
            self._stop = stop
        batch_s = self.cfg.ingest.batch_ms / 1000
        while not self._stop.is_set():
            self.poll_once(timeout_ms=min(200, self.cfg.ingest.batch_ms))
            if self.batch and (
                self.batch.gpu_rows >= self.cfg.ingest.batch_rows or time.monotonic() - self.batch.started >= batch_s
            ):
                self.flush()
        if self.batch:
            self.flush(final=True)

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self, timeout_ms: int = 200) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=5000)
        n = 0
        for tp, records in polled.items():
            for rec in records:
                self._add(tp, rec)
                n += 1
        return n

    def _add(self, tp: Any, rec: Any) -> None:
        if not self.batch:
            self.batch.started = time.monotonic()
        result = validate(rec.key, rec.value)
        if isinstance(result, str):
            self.batch.dead.append(DeadLetter(tp.topic, tp.partition, rec.offset, rec.key, rec.value or b"", result))
        else:
            self.batch.reports.append(result)
            self.batch.gpu_rows += len(result.gpus)
        self.batch.offsets[tp] = rec.offset + 1

    # --- flushing --------------------------------------------------------------------------
    def flush(self, final: bool = False) -> bool:
        """Write the batch, then commit its offsets; retries until done or stopped."""
        batch = self.batch
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: not isinstance(e, _Abandon)),
            wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=MAX_BACKOFF_S),
            stop=tenacity.stop_any(
                tenacity.stop_when_event_set(self._stop) if not final else tenacity.stop_after_attempt(3)
            ),
            sleep=self._sleep_while_paused,
            before_sleep=self._note_failure,
            reraise=True,
        )
        try:
            retrying(self._write_and_commit, batch)
        except Exception as exc:
            log.error("batch of %d messages not written (offsets not committed, will be redelivered): %s",
                      len(batch), exc)
            self.batch = Batch()
            return False
        finally:
            self._resume()
        self.batch = Batch()
        return True

    def _write_and_commit(self, batch: Batch) -> None:
        ingest_ms = int(self.clock() * 1000)
        unique, dup_in_batch = dedup.unique_in_batch(batch.reports)
        stored = dedup.already_stored(self.client, self.db, unique)
        fresh = [r for r in unique if dedup.identity(r) not in stored]
        if fresh:
            insert_columns(self.client, f"{self.db}.gpu_samples", sample_columns(fresh, ingest_ms, self.deriver))
            insert_columns(self.client, f"{self.db}.agent_reports", agent_columns(fresh, ingest_ms))
        if batch.dead:
            self._dead_letter(batch.dead, ingest_ms)
        self._commit(batch)
        s = self.stats
        s.messages += len(fresh)
        s.rows += sum(len(r.gpus) for r in fresh)
        s.duplicates += dup_in_batch + len(stored)
        s.dead_letters += len(batch.dead)
        s.batches += 1
        s.last_flush_ms = ingest_ms
        if fresh:
            s.last_sample_ms = max(s.last_sample_ms, *(r.time_ms for r in fresh))
        s.backing_off = False
        s.last_error = ""

    def _dead_letter(self, dead: list[DeadLetter], ingest_ms: int) -> None:
        futures = []
        for d in dead:
            log.warning("dead-lettered %s/%d@%d: %s", d.topic, d.partition, d.offset, d.reason)
            source = f"{d.topic}/{d.partition}/{d.offset}".encode()
            headers = [("gpufleet-error", d.reason.encode()), ("gpufleet-source", source)]
            futures.append(self.dlq.send(self.cfg.kafka.dlq_topic, key=d.key, value=d.value, headers=headers))
        self.dlq.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
        cols = [
            [ingest_ms] * len(dead), [d.topic for d in dead], [d.partition for d in dead], [d.offset for d in dead],
            [(d.key or b"").decode("utf-8", "backslashreplace") for d in dead], [d.reason for d in dead],
            [d.value.decode("utf-8", "backslashreplace") for d in dead],
        ]
        self.client.insert(
            f"{self.db}.dead_letters", cols, column_oriented=True,
            column_names=["ingest_time", "topic", "partition", "offset", "key", "reason", "payload"],
        )

    def _commit(self, batch: Batch) -> None:
        from kafka.structs import OffsetAndMetadata

        if batch.offsets:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in batch.offsets.items()})

    # --- back-off while ClickHouse (or the DLQ) is down --------------------------------------
    def _note_failure(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.stats.insert_errors += 1
        self.stats.backing_off = True
        self.stats.last_error = str(exc)[:500]
        log.warning("insert failed (attempt %d), retrying in %.1f s, offsets held: %s",
                    state.attempt_number, state.upcoming_sleep, self.stats.last_error)

    def _sleep_while_paused(self, seconds: float) -> None:
        """Back off without leaving the consumer group: pause partitions and keep polling."""
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(*assignment)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            self.consumer.poll(timeout_ms=min(200, int((deadline - time.monotonic()) * 1000) + 1))
            if self._abandoned:
                raise _Abandon("partitions were revoked during back-off")

    _abandoned = False

    def _resume(self) -> None:
        self._abandoned = False
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    def on_partitions_revoked(self, revoked: Any) -> None:
        """Rebalance: flush what we hold while we still own it; else let the new owner redo it."""
        if not self.batch:
            return
        if self.stats.backing_off:
            self._abandoned = True
            return
        self.flush(final=True)

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %d partitions", len(assigned))


class _Abandon(RuntimeError):
    """The batch can no longer be committed by this consumer."""
