"""The ingester's consume loop: a Kafka consumer-group member that gathers one batch per partition for the writer.

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
from typing import TYPE_CHECKING, TypeVar

import tenacity

from gpufleet.config import Config
from gpufleet.liveness import Liveness
from gpufleet.pipeline.ingest import kafka_io
from gpufleet.pipeline.ingest.dead_letters import DeadLetter
from gpufleet.pipeline.ingest.kafka_io import Consumer, Producer, Record, TopicPartition
from gpufleet.pipeline.ingest.ledger import BatchTaken, Entry, resume
from gpufleet.pipeline.ingest.liveness import COMMIT, POLL, ingest_liveness
from gpufleet.pipeline.ingest.validation import validate, validate_for_staging
from gpufleet.pipeline.ingest.writer import Batch, BatchWriter
from gpufleet.pipeline.queries import usage
from gpufleet.pipeline.queries.window import HOUR_MS

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
FULL_GC_EVERY_S = 60.0
POLL_WARN_EVERY_S = 30.0
MAX_POLL_RECORDS = 5000
COMMIT_RETRY_S = 2.0
"""How often a refused commit of stored batches is retried while nothing else commits (each retry during a
rebalance is refused again, and the rebalance completes in `poll`)."""
USAGE_REFRESH_S = 10.0
"""How often, at most, the ingester refreshes the stored usage of the hours its batches stored
(`queries.usage.refresh`): the billing board reads the stored rows, at most this much behind."""
T = TypeVar("T")


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
    replays: int = 0
    """Batches repeated from the ledger (another consumer's, or an earlier run's, unfinished batch)."""
    batches_taken: int = 0
    """Batches another consumer entered in the ledger first (this ingester wrote theirs instead)."""
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
    ledger: bool = True
    """Record each batch in the batch ledger before writing it and repeat unfinished ones
    (pipeline/ingest/ledger.py). Off only to measure what it costs and what goes wrong without it."""


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
        self.writer = BatchWriter(cfg, store, dlq_producer, clock,
                                  json_staging=options.json_staging, ledger=options.ledger)
        self.stats = IngestStats()
        self.batches: dict[TopicPartition, Batch] = {}
        """Each partition's batch being gathered."""
        self.pending: dict[TopicPartition, Entry | None] = {}
        """Partitions whose ledger was read since their assignment: the recorded batch each must write next
        (None: none; a partition missing here has not been read yet)."""
        self.positions: dict[TopicPartition, int] = {}
        """Each owned partition's next offset to read: what this ingester has gathered or stored up to."""
        self.uncommitted: dict[TopicPartition, int] = {}
        """Stored batches whose commit was refused: the offset to commit for each partition, retried while owned."""
        self._stop = threading.Event()
        self._inflight: _InFlight | None = None
        self._writing: TopicPartition | None = None
        self._abandoned = False
        self._last_poll_warning = -float("inf")
        self._last_commit_retry = -float("inf")
        self._usage_span: tuple[int, int] | None = None
        """Earliest interval start and latest end (Unix ms) of the samples stored since the last usage refresh."""
        self._last_usage_refresh = time.monotonic()

    @property
    def dlq(self) -> Producer:
        return self.writer.dlq

    @property
    def store(self) -> Store:
        return self.writer.store

    # --- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Poll, batch and flush until `stop` is set; flushes what it holds before returning.

        Pipelined, the last batch's GPU-row insert of each flush proceeds in the writer's insert thread
        (ClickHouse works without the GIL) as the next messages are polled and validated; that batch's
        offsets are committed once its insert is acknowledged, before the next flush.
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
                if self.batches:
                    self.flush(final=True)
                self.refresh_usage(force=True)
        finally:
            self.writer.close()

    def _step(self) -> bool:
        """One poll; settle the insert in flight if it finished; flush when the batches are full or old
        (returns whether it flushed)."""
        ing = self.cfg.ingest
        if not self.batches and self._inflight is None and not self.uncommitted:
            self.liveness.beat(COMMIT)  # nothing read is left uncommitted
        self.poll_once(timeout_ms=min(200, ing.batch_ms))
        if self.uncommitted and time.monotonic() - self._last_commit_retry >= COMMIT_RETRY_S:
            self._commit_refused()
        if self._inflight is not None and self._inflight.future.done():
            self._settle()
        if self._due():
            self.flush(pipelined=True)
            self.refresh_usage()
            return True
        self.refresh_usage()
        return False

    def refresh_usage(self, force: bool = False) -> None:
        """Recompute the stored usage of the hours the batches stored since the last refresh touched (and
        those within `usage.NEAR_HOURS` of them), at most every `USAGE_REFRESH_S` unless `force`. A failure
        is logged and the hours kept for the next try: readers refresh what they read anyway."""
        span = self._usage_span
        if span is None or (not force and time.monotonic() - self._last_usage_refresh < USAGE_REFRESH_S):
            return
        self._last_usage_refresh = time.monotonic()
        reach = (usage.NEAR_HOURS + 1) * HOUR_MS  # a claim reaches an hour past its start
        try:
            usage.refresh(self.store, span[0] - reach, span[1] + reach)
        except Exception as exc:
            log.warning("refreshing the stored usage of %d..%d failed (retried after the next batch): %s",
                        span[0], span[1], str(exc)[:500])
            return
        if self._usage_span == span:
            self._usage_span = None

    def _due(self) -> bool:
        if not self.batches:
            return False
        ing = self.cfg.ingest
        rows = sum(b.gpu_rows for b in self.batches.values())
        oldest = min(b.started for b in self.batches.values())
        return rows >= ing.batch_rows or time.monotonic() - oldest >= ing.batch_ms / 1000

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self, timeout_ms: int = 200) -> int:
        polled = self._poll(timeout_ms)
        n = 0
        for tp, records in polled.items():
            for rec in records:
                self._add(tp, rec)
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

    def _add(self, tp: TopicPartition, rec: Record) -> None:
        batch = self.batches.get(tp)
        if batch is None:
            batch = self.batches[tp] = Batch(tp)
        path = self.writer.staging
        if path is not None:
            result, as_json = validate_for_staging(path.decoder, rec.key, rec.value)
        else:
            result, as_json = validate(rec.key, rec.value), False
        if isinstance(result, str):
            batch.add_dead(DeadLetter(tp.topic, tp.partition, rec.offset, rec.key, rec.value or b"", result))
        else:
            batch.add_report(rec.offset, result, rec.value or b"", as_json)  # not None: it decoded
        self.positions[tp] = rec.offset + 1

    # --- flushing --------------------------------------------------------------------------
    def flush(self, final: bool = False, pipelined: bool = False) -> bool:
        """Write every batch that is ready, each then committed; retries until done or stopped.

        `pipelined` (the run loop only) leaves the last batch's GPU-row insert running in the insert
        thread; its offsets are committed by `_settle`, which every flush calls first. A partition's
        recorded batch that is not yet read up to its last offset waits for the next flush.
        """
        settled = self._settle(final)
        ready = self._retry(self._take_ready, final)
        if ready is None:
            return False
        for i, batch in enumerate(ready):
            pipeline = pipelined and not final and i == len(ready) - 1
            if self._retry(lambda b=batch, p=pipeline: self._write_and_commit(b, p), final) is not None:
                continue
            if final or self._stop.is_set():
                log.error("%d batches of %d messages not written (offsets not committed, will be redelivered)",
                          len(ready) - i, sum(len(b) for b in ready[i:]))
                return False
            self._give_back(ready[i + 1:])  # this batch's partition moved on: the others are still to write
            return False
        return settled

    def _give_back(self, batches: list[Batch]) -> None:
        """Put batches not written back in front of what was gathered since, for the partitions still owned."""
        owned = self._owned()
        for batch in batches:
            if batch.tp in owned:
                if batch.replay:
                    self.pending[batch.tp] = batch.entry
                self.batches[batch.tp] = Batch(batch.tp).merge(batch).merge(self.batches.get(batch.tp))

    def _take_ready(self) -> list[Batch]:
        """The batches to write now, in partition order: each partition's whole batch, or, where the partition's
        ledger holds an unfinished batch, exactly that batch once it is read in full."""
        for tp, batch in self.batches.items():  # first everything that may fail, then nothing that may
            if tp not in self.pending:
                self.pending[tp] = self._unfinished(tp, batch.first)
        ready = []
        for tp in sorted(self.batches, key=lambda t: (t.topic, t.partition)):
            batch = self.batches.pop(tp)
            entry = self.pending[tp]
            if entry is None:
                ready.append(batch)
                continue
            batch.drop_before(entry.first)  # stored by earlier batches of the partition
            if batch and batch.last < entry.last:
                self.batches[tp] = batch  # read on until its last offset
                continue
            if batch:
                rest = batch.split(entry.last)
                batch.entry, batch.replay, self.pending[tp] = entry, True, None
                ready.append(batch)
                if rest:
                    self.batches[tp] = rest
        return ready

    def _unfinished(self, tp: TopicPartition, position: int) -> Entry | None:
        """The partition's recorded batch that is not known to be stored, if any (read once per assignment)."""
        ledger = self.writer.ledger
        if ledger is None:
            return None
        entry = resume(ledger.newest(tp.topic, tp.partition), position).pending
        if entry is not None:
            self.stats.replays += 1
            log.warning("partition %s/%d: repeating its unfinished batch [%d, %d] planned at %d (by gpufleet %s) "
                        "before anything else; ClickHouse keeps one copy of whatever of it had landed",
                        tp.topic, tp.partition, entry.first, entry.last, entry.planned_ms, entry.planner)
        return entry

    def _retry(self, fn: Callable[[], T], final: bool) -> T | None:
        """`fn()` under the retry policy: back off while ClickHouse (or the DLQ) refuses, until done, stopped,
        or the partitions were revoked meanwhile (None then)."""
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
            return retrying(fn)
        except Exception as exc:
            log.error("giving up for now (offsets not committed, will be redelivered): %s", exc)
            self.writer.deriver.claims.forget()  # it may have claimed time it did not store: read claims again
            return None
        finally:
            self._resume()

    def _write_and_commit(self, batch: Batch, pipelined: bool = False) -> bool:
        self._writing = batch.tp
        try:
            pending = self.writer.write(batch, pipelined)
        except BatchTaken as lost:
            self._taken_over(batch, lost.winner)
            return True
        finally:
            self._writing = None
        if pending is not None:
            self._inflight = _InFlight(batch, pending)
        else:
            self._done(batch)
        return True

    def _taken_over(self, batch: Batch, winner: Entry) -> None:
        """Another consumer recorded a batch at this one's first offset first: gather and write that batch
        instead (the next flush does), whoever it was."""
        assert batch.tp is not None
        tp = batch.tp
        self.stats.batches_taken += 1
        log.warning("partition %s/%d: batch at offset %d was entered first as [%d, %d] (by another consumer, "
                    "or by an attempt of this one whose answer was lost); writing that batch instead",
                    tp.topic, tp.partition, batch.first, winner.first, winner.last)
        self.pending[tp] = winner
        self.batches[tp] = Batch(tp).merge(batch).merge(self.batches.get(tp))

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
            self.writer.json_failed(inflight.batch, exc)
            return self._retry(lambda: self._write_and_commit(inflight.batch), final) is not None
        self._done(inflight.batch)
        return True

    def _done(self, batch: Batch) -> None:
        """The batch is stored: commit its offsets, count it."""
        committed = self._commit(batch)
        fresh = batch.plan or []
        s = self.stats
        s.messages += len(fresh)
        s.rows += sum(len(r.gpus) for r in fresh)
        s.duplicates += batch.skipped
        s.dead_letters += len(batch.dead) + len(batch.late)
        s.batches += 1
        s.last_flush_ms = batch.ingest_ms
        if fresh:
            s.last_sample_ms = max(s.last_sample_ms, *(r.time_ms for r in fresh))
            lo, hi = min(r.time_ms - r.interval_ms for r in fresh), max(r.time_ms for r in fresh)
            if self._usage_span is not None:
                lo, hi = min(lo, self._usage_span[0]), max(hi, self._usage_span[1])
            self._usage_span = (lo, hi)
        s.backing_off = False
        if committed:
            s.last_error = ""

    def _commit(self, batch: Batch) -> bool:
        """Commit the stored batch's offsets. A commit refused (the group rebalancing, the broker away), or not
        possible now (the partition is between owners), is reported, not raised, and retried while this consumer
        owns the partition; once it moved on, its next owner finds the batch in the ledger and repeats it (G18).
        Raising here used to end the loop."""
        tp, owned = batch.tp, self._owned()
        if tp is None:
            return True
        if tp not in owned:
            self.uncommitted[tp] = max(batch.next_offset, self.uncommitted.get(tp, 0))
            return False
        refused = {t: o for t, o in self.uncommitted.items() if t in owned}
        return self._commit_offsets({**refused, tp: max(batch.next_offset, refused.get(tp, 0))})

    def _commit_offsets(self, offsets: dict[TopicPartition, int]) -> bool:
        try:
            kafka_io.commit(self.consumer, offsets)
        except Exception as exc:
            for tp, offset in offsets.items():
                self.uncommitted[tp] = max(offset, self.uncommitted.get(tp, 0))
            self.stats.commit_errors += 1
            self.stats.last_error = f"Kafka commit: {type(exc).__name__}: {exc}"[:500]
            log.warning("offset commit refused; the batch is stored, the commit is retried while this ingester owns "
                        "the partition (else its next owner repeats the batch from the ledger): %s",
                        self.stats.last_error)
            return False
        for tp, offset in offsets.items():
            if self.uncommitted.get(tp, offset) <= offset:
                self.uncommitted.pop(tp, None)
        if not self.batches and self._inflight is None and not self.uncommitted:
            self.liveness.beat(COMMIT)
        return True

    def _commit_refused(self) -> None:
        """Commit again what was stored and not committed, for the partitions this consumer owns now (the
        assignment, not this, forgets the partitions that moved on)."""
        self._last_commit_retry = time.monotonic()
        owned = self._owned()
        offsets = {tp: o for tp, o in self.uncommitted.items() if tp in owned}
        if offsets and self._commit_offsets(offsets) and not self.stats.backing_off and not self.uncommitted:
            self.stats.last_error = ""

    def _owned(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

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
                raise _Abandon("the partition moved to another consumer during back-off")

    def _resume(self) -> None:
        self._abandoned = False
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    # --- rebalance (`kafka_io.RebalanceHandler`) ---------------------------------------------
    # kafka-python (3.x) runs these on its network thread while `poll` waits, and refuses any blocking call
    # there (a commit, a poll): they only rearrange what this ingester holds. The loop writes and commits.
    def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Nothing to do before the new assignment is known: what was stored and not committed is in the ledger
        (its next owner repeats it, G18), what was gathered is read again by whoever owns it next."""
        log.info("revoking %d partitions", len(revoked))

    def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        """Keep what was gathered for partitions this consumer still owns, and go on reading them where it was
        (some clients rewind a kept partition to its committed offset); forget everything of partitions that
        moved away (their next owner reads them from the committed offset); read the ledger of new ones before
        their first batch."""
        owned = self._owned() | set(assigned)
        for held in (self.batches, self.pending, self.positions, self.uncommitted):
            for tp in [tp for tp in held if tp not in owned]:
                del held[tp]
        for tp, offset in self.positions.items():
            self.consumer.seek(tp, offset)
        self.writer.deriver.claims.forget()  # another consumer may have claimed time meanwhile: read claims again
        if self._writing is not None and self._writing not in owned:
            self._abandoned = True  # the batch being retried during a back-off is no longer ours to write
        log.info("assigned %d partitions", len(owned))


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
