"""The ingester's consume loop: a Kafka consumer-group member that batches messages for the batch writer.

Design notes: docs/design-notes.md#pipeline-ingest-ingester-py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tenacity

from gpufleet.config import Config
from gpufleet.liveness import Liveness
from gpufleet.pipeline.ingest import kafka_io
from gpufleet.pipeline.ingest.dead_letters import DeadLetter
from gpufleet.pipeline.ingest.kafka_io import Consumer, Producer, Record, TopicPartition
from gpufleet.pipeline.ingest.liveness import COMMIT, POLL, ingest_liveness
from gpufleet.pipeline.ingest.validation import TimeWindow, validate, validate_for_staging
from gpufleet.pipeline.ingest.writer import Batch, BatchWriter

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
FULL_GC_EVERY_S = 60.0
POLL_WARN_EVERY_S = 30.0
MAX_POLL_RECORDS = 5000


@dataclass
class IngestStats:
    """Counters the live view, the status API and the benchmarks read (one writer: the ingest thread)."""

    messages: int = 0
    rows: int = 0
    batches: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    insert_errors: int = 0
    commit_errors: int = 0
    last_flush_ms: int = 0
    last_sample_ms: int = 0
    last_error: str = ""
    backing_off: bool = False


@dataclass(frozen=True)
class IngestOptions:
    """How the ingester works; the shipped defaults are all on, and the benchmarks turn each off in turn."""

    json_staging: bool = True
    """Send GPU rows through the JSON staging path when it is available (else as columns)."""
    pipelined: bool = True
    """In `run`, let a batch's GPU-row insert overlap with polling the next batch."""
    pause_gc: bool = True
    """In `run`, collect cyclic garbage between batches only."""
    intent_log: bool = True
    """Keep the intent log of an embedded store (pipeline/ingest/intents.py)."""


DEFAULT_OPTIONS = IngestOptions()


@dataclass
class _InFlight:
    """A batch whose GPU-row insert runs in the writer's insert thread; committed by `Ingester._settle`."""

    batch: Batch
    future: Future[None]


class Ingester:
    """Consume `kafka.topic`, insert into `clickhouse.database`; call `run(stop)` in a thread.

    `consumer` must be subscribed with this ingester as its rebalance handler
    (`pipeline.ingest.consumer.build_ingester` does both).
    """

    def __init__(
        self,
        cfg: Config,
        store: Store,
        consumer: Consumer,
        dlq_producer: Producer,
        clock: Callable[[], float] = time.time,
        options: IngestOptions = DEFAULT_OPTIONS,
        liveness: Liveness | None = None,
    ) -> None:
        self.cfg = cfg
        self.liveness = liveness or ingest_liveness(cfg.ingest)
        """Heartbeats `/healthz` reads (pipeline/ingest/liveness.py)."""
        self.consumer = consumer
        self.clock = clock
        self.options = options
        self.window = TimeWindow.from_config(cfg)
        self.writer = BatchWriter(cfg, store, dlq_producer, clock,
                                  json_staging=options.json_staging, intent_log=options.intent_log)
        self.stats = IngestStats()
        self.batch = Batch()
        self._stop = threading.Event()
        self._inflight: _InFlight | None = None
        self._abandoned = False
        self._last_poll_warning = -float("inf")

    @property
    def dlq(self) -> Producer:
        return self.writer.dlq

    @property
    def store(self) -> Store:
        return self.writer.store

    # --- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Poll, batch and flush until `stop` is set; flushes what it holds before returning.

        Pipelined, each batch's GPU-row insert proceeds in the writer's insert thread (ClickHouse
        works without the GIL) as the next batch is polled and validated; the batch's offsets are
        committed once that insert is acknowledged, before the next batch is written.
        """
        if stop is not None:
            self._stop = stop
        self.writer.start(self.options.pipelined)
        pause_gc = self.options.pause_gc
        try:
            with gc_paused() if pause_gc else contextlib.nullcontext():
                last_full_gc = time.monotonic()
                while not self._stop.is_set():
                    if self._step() and pause_gc and time.monotonic() - last_full_gc >= FULL_GC_EVERY_S:
                        gc.collect()
                        last_full_gc = time.monotonic()
                self._settle(final=True)
                if self.batch:
                    self.flush(final=True)
        finally:
            self.writer.close()

    def _step(self) -> bool:
        """One poll; settle the insert in flight if it finished; flush when the batch is full or old
        (returns whether it flushed)."""
        ing = self.cfg.ingest
        if not self.batch and self._inflight is None:
            self.liveness.beat(COMMIT)  # nothing read is left uncommitted
        self.poll_once(timeout_ms=min(200, ing.batch_ms))
        if self._inflight is not None and self._inflight.future.done():
            self._settle()
        if self.batch and (self.batch.gpu_rows >= ing.batch_rows
                           or time.monotonic() - self.batch.started >= ing.batch_ms / 1000):
            self.flush(pipelined=True)
            return True
        return False

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self, timeout_ms: int = 200) -> int:
        polled = self._poll(timeout_ms)
        now_ms = int(self.clock() * 1000)
        n = 0
        for tp, records in polled.items():
            for rec in records:
                self._add(tp, rec, now_ms)
                n += 1
        return n

    def _poll(self, timeout_ms: int) -> Mapping[TopicPartition, Sequence[Record]]:
        """`consumer.poll` that outlives the broker going away (the consumer reconnects by itself).

        Raising here would end the loop (or, during a back-off, abandon a batch whose offsets later
        batches then commit past); instead the error is reported and the loop polls again.
        """
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=MAX_POLL_RECORDS)
        except Exception as exc:
            self.stats.last_error = f"Kafka: {type(exc).__name__}: {exc}"[:500]
            now = time.monotonic()
            if now - self._last_poll_warning >= POLL_WARN_EVERY_S:
                log.warning("polling Kafka failed, retrying; nothing is committed meanwhile: %s", self.stats.last_error)
                self._last_poll_warning = now
            self._stop.wait(min(1.0, timeout_ms / 1000))
            return {}
        self.liveness.beat(POLL)
        return polled

    def _add(self, tp: TopicPartition, rec: Record, now_ms: int) -> None:
        batch = self.batch
        if not batch:
            batch.started = time.monotonic()
        path = self.writer.staging
        if path is not None:
            result, as_json = validate_for_staging(path.decoder, rec.key, rec.value)
        else:
            result, as_json = validate(rec.key, rec.value), False
        if not isinstance(result, str):
            result = self.window.check(result.time_ms, now_ms) or result
        if isinstance(result, str):
            batch.dead.append(DeadLetter(tp.topic, tp.partition, rec.offset, rec.key, rec.value or b"", result))
        else:
            batch.reports.append(result)
            if as_json and rec.value is not None:  # not None: it decoded
                batch.raw[id(result)] = rec.value
            batch.gpu_rows += len(result.gpus)
        batch.offsets[tp] = rec.offset + 1

    # --- flushing --------------------------------------------------------------------------
    def flush(self, final: bool = False, pipelined: bool = False) -> bool:
        """Write the batch, then commit its offsets; retries until done or stopped.

        `pipelined` (the run loop only) leaves the batch's GPU-row insert running in the insert
        thread; its offsets are committed by `_settle`, which every flush calls first.
        """
        settled = self._settle(final)
        batch, self.batch = self.batch, Batch()
        return self._write_batch(batch, final, pipelined and not final) and settled

    def _write_batch(self, batch: Batch, final: bool, pipelined: bool) -> bool:
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
            retrying(self._write_and_commit, batch, pipelined)
        except Exception as exc:
            log.error("batch of %d messages not written (offsets not committed, will be redelivered): %s",
                      len(batch), exc)
            self.writer.deriver.claims.forget()  # it claimed time it did not store: read claims from the store again
            return False
        finally:
            self._resume()
        return True

    def _write_and_commit(self, batch: Batch, pipelined: bool = False) -> None:
        pending = self.writer.write(batch, pipelined)
        if pending is not None:
            self._inflight = _InFlight(batch, pending)
        else:
            self._done(batch)

    def _settle(self, final: bool = False) -> bool:
        """Wait for the batch whose insert is in flight, then commit it (or redo it here if it failed)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return True
        try:
            inflight.future.result()
        except Exception as exc:
            self.stats.insert_errors += 1
            self.stats.last_error = str(exc)[:500]
            log.warning("insert failed, retrying the batch, offsets held: %s", self.stats.last_error)
            self.writer.json_failed(inflight.batch)
            return self._write_batch(inflight.batch, final, pipelined=False)
        self._done(inflight.batch)
        return True

    def _done(self, batch: Batch) -> None:
        """The batch is stored: commit its offsets, forget its intent, count it."""
        committed = self._commit(batch)
        self.writer.done(batch)
        fresh = batch.plan or []
        s = self.stats
        s.messages += len(fresh)
        s.rows += sum(len(r.gpus) for r in fresh)
        s.duplicates += batch.skipped
        s.dead_letters += len(batch.dead)
        s.batches += 1
        s.last_flush_ms = batch.ingest_ms
        if fresh:
            s.last_sample_ms = max(s.last_sample_ms, *(r.time_ms for r in fresh))
        s.backing_off = False
        if committed:
            s.last_error = ""

    def _commit(self, batch: Batch) -> bool:
        """Commit the stored batch's offsets. A refused commit (the group rebalanced meanwhile, the broker
        away) is reported, not raised: the batch is stored, and its messages, redelivered to whoever owns
        their partition, are dropped as duplicates (G6). Raising here used to end the loop."""
        try:
            kafka_io.commit(self.consumer, batch.offsets)
            if batch.offsets:
                self.liveness.beat(COMMIT)
        except Exception as exc:
            self.stats.commit_errors += 1
            self.stats.last_error = f"Kafka commit: {type(exc).__name__}: {exc}"[:500]
            log.warning("offset commit refused; the batch is stored, and its messages will be redelivered and "
                        "dropped as duplicates: %s", self.stats.last_error)
            return False
        return True

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
            polled = self._poll(min(200, int((deadline - time.monotonic()) * 1000) + 1))
            for tp, records in polled.items():  # a partition assigned meanwhile is not paused: read it later
                if records:
                    self.consumer.seek(tp, records[0].offset)
            if self._abandoned:
                raise _Abandon("partitions were revoked during back-off")

    def _resume(self) -> None:
        self._abandoned = False
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    # --- rebalance (`kafka_io.RebalanceHandler`) ---------------------------------------------
    def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Rebalance: flush what we hold while we still own it; else let the new owner redo it."""
        if not self.batch and self._inflight is None:
            return
        if self.stats.backing_off:
            self._abandoned = True
            return
        self._settle(final=True)
        if self.batch:
            self.flush(final=True)

    def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        log.info("assigned %d partitions", len(assigned))
        self.writer.deriver.claims.forget()  # another consumer may have claimed time meanwhile: read claims again


class _Abandon(RuntimeError):
    """The batch can no longer be committed by this consumer."""


class _GcPause:
    """Process-wide: the cyclic collector is off while any ingester loop runs (each collects itself)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.restore = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.holders == 0:
                self.restore = gc.isenabled()
                gc.disable()
                gc.freeze()  # what exists before the loop is never garbage the loop makes: stop rescanning it
            self.holders += 1
        try:
            yield
        finally:
            with self.lock:
                self.holders -= 1
                if self.holders == 0:
                    gc.unfreeze()
                    if self.restore:
                        gc.enable()


gc_paused = _GcPause()
