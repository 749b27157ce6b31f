"""The ingester: a Kafka consumer-group member that validates, batches and inserts into ClickHouse.

Delivery contract (docs/reliability.md):
- offsets are committed only after ClickHouse acknowledged the batch (and the DLQ copies of
  its bad messages were acknowledged by the broker): at-least-once, never at-most-once;
- duplicates (redelivery, agent spool replay) are dropped before insert (pipeline/ingest/dedup.py),
  so queries and rollups see each sample once;
- a message that fails validation goes to the dead-letter topic with the reason and its original
  bytes, and to `dead_letters` in ClickHouse; its neighbours are ingested;
- ClickHouse unreachable: the consumer pauses (staying in its group), backs off with jitter up to
  `MAX_BACKOFF_S`, and retries the same batch; nothing is committed meanwhile;
- a batch is planned once (`_plan`) and every retry repeats exactly its inserts under its dedup
  token, so an insert cut short between `gpu_samples` and a rollup is completed, not lost or
  doubled; with an embedded store a restarted ingester repeats the batch it was writing
  (pipeline/ingest/intents.py);
- Kafka unreachable: `_poll` reports it and polls again until the consumer reconnects.

Hot path (BENCHMARKS.md has the measurements): messages are decoded and validated once; the
derived columns are computed once per batch (a retried batch reuses them, so the health growth
rules see each sample once); `agent_reports` is written first (a ReplacingMergeTree: a retry
cannot double it), then the GPU rows go as the validated message bytes through the JSON staging
path (pipeline/ingest/staging.py), or as Python columns where that path cannot take them. While `run`
owns the loop, Python's cyclic garbage collector does not run on its own (`gc_paused`): the loop
collects once a minute, between batches. The batch's objects hold no cycles, and letting the
collector walk them again and again cost more than decoding them (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import tenacity

from gpufleet import wire
from gpufleet.config import Config
from gpufleet.liveness import Liveness
from gpufleet.pipeline.ingest import dedup, intents, staging
from gpufleet.pipeline.ingest.liveness import COMMIT, POLL, ingest_liveness
from gpufleet.pipeline.ingest.rows import Derived, Deriver, agent_columns, derive, derived_columns, insert_columns

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
FULL_GC_EVERY_S = 60.0
STAGING_RETRY_S = 300.0
POLL_WARN_EVERY_S = 30.0
DEAD_LETTER_COLUMNS = ("ingest_time", "topic", "partition", "offset", "key", "reason", "payload")


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
    raw: dict[int, bytes] = field(default_factory=dict)
    """id(report) -> the bytes it was decoded from, for reports the JSON staging path may take."""
    dead: list[DeadLetter] = field(default_factory=list)
    offsets: dict[Any, int] = field(default_factory=dict)
    """TopicPartition -> next offset to commit."""
    started: float = 0.0
    gpu_rows: int = 0
    derived: Derived | None = None
    """Set by the first write attempt; retries reuse it."""
    columns_only: bool = False
    """Set when the JSON path failed for this batch: retries use the column path."""
    dead_written: bool = False
    """Its dead letters are in the DLQ and in ClickHouse (a retry does not send them again)."""
    plan: list[wire.NodeReport] | None = None
    """The messages it writes, fixed by its first attempt (`Ingester._plan`); retries repeat them."""
    skipped: int = 0
    """Duplicates dropped by the plan (in the batch, or already stored)."""
    ingest_ms: int = 0
    token: str = ""
    """Dedup token of the plan (`dedup.insert_token`): every repeat of its inserts carries it."""

    def __len__(self) -> int:
        return len(self.reports) + len(self.dead)


@dataclass
class _InFlight:
    """A batch whose GPU-row insert runs in the helper thread; committed by `Ingester._settle`."""

    batch: Batch
    future: Future[None]
    fresh: list[wire.NodeReport]
    duplicates: int
    ingest_ms: int


def validate_for_staging(
    decoder: msgspec.json.Decoder[wire.NodeReport], key: bytes | None, value: bytes | None
) -> tuple[wire.NodeReport | str, bool]:
    """`validate`, first trying the staging path's bounded decoder: (result, whether JSON may carry it).

    The bounded decoder admits a subset of what `wire.decode` admits, with the same values; the checks
    `wire.decode` and `validate` make after decoding are repeated here, and anything that fails any
    of them goes through `validate` itself, so dead-letter reasons are exactly `validate`'s.
    """
    if value is not None and key is not None and len(value) <= wire.MAX_MESSAGE_BYTES:
        try:
            report = decoder.decode(value)
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass
        else:
            gpus = report.gpus
            if (report.schema_version == wire.SCHEMA_VERSION and key == report.node.encode()
                    and len({g.uuid for g in gpus}) == len(gpus)):
                return report, True
    return validate(key, value), False


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

    json_staging = True
    """Send GPU rows through the JSON staging path when it is available (else as columns)."""
    pipelined = True
    """In `run`, let a batch's GPU-row insert overlap with polling the next batch."""
    pause_gc = True
    """In `run`, collect cyclic garbage between batches only (benchmarks switch these off to compare)."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        consumer: Any,
        dlq_producer: Any,
        clock: Callable[[], float] = time.time,
        liveness: Liveness | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.liveness = liveness or ingest_liveness(cfg.ingest)
        """Heartbeats `/healthz` reads (pipeline/ingest/liveness.py)."""
        self.consumer = consumer
        self.dlq = dlq_producer
        self.clock = clock
        self.stats = IngestStats()
        self.intents = intents.IntentLog.for_store(cfg.clickhouse.dsn, store.database)
        self.deriver = Deriver(cfg.health, cfg.peak_flops)
        self.batch = Batch()
        self._stop = threading.Event()
        self._staging: staging.Staging | None = None
        self._staging_next_try = 0.0
        self._splicer = staging.Splicer(self.deriver.peak)
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: _InFlight | None = None

    # --- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Poll, batch and flush until `stop` is set; flushes what it holds before returning.

        While the loop runs, each batch's GPU-row insert proceeds in a helper thread (ClickHouse
        works without the GIL) as the next batch is polled and validated; the batch's offsets are
        committed once that insert is acknowledged, before the next batch is written.
        """
        if stop is not None:
            self._stop = stop
        batch_s = self.cfg.ingest.batch_ms / 1000
        self._staging_path()
        self._replay_intents()
        if self.pipelined:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-insert")
        try:
            with gc_paused() if self.pause_gc else contextlib.nullcontext():
                last_full_gc = time.monotonic()
                while not self._stop.is_set():
                    if not self.batch and self._inflight is None:
                        self.liveness.beat(COMMIT)  # nothing read is left uncommitted
                    self.poll_once(timeout_ms=min(200, self.cfg.ingest.batch_ms))
                    if self._inflight is not None and self._inflight.future.done():
                        self._settle()
                    if self.batch and (
                        self.batch.gpu_rows >= self.cfg.ingest.batch_rows
                        or time.monotonic() - self.batch.started >= batch_s
                    ):
                        self.flush(pipelined=True)
                        if self.pause_gc and time.monotonic() - last_full_gc >= FULL_GC_EVERY_S:
                            gc.collect()
                            last_full_gc = time.monotonic()
                self._settle(final=True)
                if self.batch:
                    self.flush(final=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._executor = None

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

    _last_poll_warning = -float("inf")

    def _poll(self, timeout_ms: int) -> dict[Any, list[Any]]:
        """`consumer.poll` that outlives the broker going away (the consumer reconnects by itself).

        Raising here would end the loop (or, during a back-off, abandon a batch whose offsets later
        batches then commit past); instead the error is reported and the loop polls again.
        """
        try:
            polled: dict[Any, list[Any]] = self.consumer.poll(timeout_ms=timeout_ms, max_records=5000)
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

    def _add(self, tp: Any, rec: Any) -> None:
        if not self.batch:
            self.batch.started = time.monotonic()
        if self._staging is not None:
            result, as_json = validate_for_staging(self._staging.decoder, rec.key, rec.value)
        else:
            result, as_json = validate(rec.key, rec.value), False
        if isinstance(result, str):
            self.batch.dead.append(DeadLetter(tp.topic, tp.partition, rec.offset, rec.key, rec.value or b"", result))
        else:
            self.batch.reports.append(result)
            if as_json:
                self.batch.raw[id(result)] = rec.value
            self.batch.gpu_rows += len(result.gpus)
        self.batch.offsets[tp] = rec.offset + 1

    # --- flushing --------------------------------------------------------------------------
    def flush(self, final: bool = False, pipelined: bool = False) -> bool:
        """Write the batch, then commit its offsets; retries until done or stopped.

        `pipelined` (the run loop only) leaves the batch's GPU-row insert running in the helper
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
            return False
        finally:
            self._resume()
        return True

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
            self._json_failed(inflight.batch)
            return self._write_batch(inflight.batch, final, pipelined=False)
        self._done(inflight.batch, inflight.fresh, inflight.duplicates, inflight.ingest_ms)
        return True

    def _write_and_commit(self, batch: Batch, pipelined: bool = False) -> None:
        if batch.plan is None:
            self._plan(batch)
        assert batch.plan is not None
        fresh, ingest_ms = batch.plan, batch.ingest_ms
        if batch.dead and not batch.dead_written:
            self._dead_letter(batch.dead, ingest_ms)
            batch.dead_written = True
        # Last: once the GPU-row insert is left running (pipelined), nothing here may fail and retry,
        # for a retry would build the next JSON block in the buffer that insert is still reading.
        pending = self._write_plan(batch, pipelined) if fresh else None
        if pending is not None:
            self._inflight = _InFlight(batch, pending, fresh, batch.skipped, ingest_ms)
            return
        self._done(batch, fresh, batch.skipped, ingest_ms)

    def _plan(self, batch: Batch) -> None:
        """Fix what the batch writes, once: its retries (and a restarted ingester's replay of its intent)
        repeat exactly these inserts under the same dedup token, so ClickHouse drops the parts that
        landed and completes the tables that missed them (pipeline/ingest/dedup.py, pipeline/ingest/intents.py)."""
        ingest_ms = int(self.clock() * 1000)
        unique, dup_in_batch = dedup.unique_in_batch(batch.reports)
        stored = dedup.already_stored(self.store, unique)
        batch.plan = [r for r in unique if dedup.identity(r) not in stored]
        batch.skipped = dup_in_batch + len(stored)
        batch.ingest_ms = ingest_ms
        batch.token = dedup.insert_token(batch.plan, ingest_ms)
        self._record_intent(batch)

    def _write_plan(self, batch: Batch, pipelined: bool) -> Future[None] | None:
        """The plan's inserts: agent_reports, then the GPU rows (left running when pipelined)."""
        fresh = batch.plan or []
        fresh_ids = {id(r) for r in fresh}
        if batch.derived is None or not fresh_ids <= {id(r) for r in batch.derived.reports}:
            batch.derived = derive(fresh, self.deriver)
        keep = [id(r) in fresh_ids for r in batch.derived.reports]
        insert_columns(self.store, "agent_reports", agent_columns(fresh, batch.ingest_ms),
                       settings=dedup.insert_settings(batch.token, "agents"))
        return self._insert_samples(batch, batch.derived, keep, batch.ingest_ms, pipelined)

    def _json_failed(self, batch: Batch) -> None:
        """After a failed JSON insert: take the column path only if none of its rows landed. A partly
        landed insert (raw rows in, a rollup refused) must be repeated as it was, under its token."""
        sent = [r for r in batch.plan or () if id(r) in batch.raw]
        try:
            landed = dedup.already_stored(self.store, sent)
        except Exception:
            return  # cannot tell now: repeat the same insert
        if not landed:
            batch.columns_only = True  # e.g. JSON that ClickHouse refuses: the column path is exact
            self._record_intent(batch)

    def _record_intent(self, batch: Batch) -> None:
        if self.intents is not None and batch.plan:
            self.intents.record(intents.Intent(
                batch.token, batch.ingest_ms, batch.columns_only, self._staging.table if self._staging else "",
                [(batch.raw.get(id(r)) or wire.encode(r), id(r) in batch.raw) for r in batch.plan]))

    def _replay_intents(self) -> None:
        """Repeat each batch a previous run of this ingester was writing when it died (pipeline/ingest/intents.py)."""
        if self.intents is None:
            return
        for intent in self.intents.pending():
            batch = Batch()
            for data, as_json in intent.messages:
                report = wire.decode(data)
                batch.reports.append(report)
                if as_json:
                    batch.raw[id(report)] = data
            batch.plan, batch.token, batch.ingest_ms = batch.reports, intent.token, intent.ingest_ms
            batch.columns_only = intent.columns_only
            json_part = batch.raw and not batch.columns_only
            if json_part and (self._staging is None or self._staging.table != intent.staging_table):
                log.error("cannot repeat interrupted batch %s: it went through staging table %r, this ingester "
                          "uses %r; kept it. Check the rollups (docs/reliability.md)", intent.token,
                          intent.staging_table, self._staging.table if self._staging else None)
                continue
            try:
                self._write_plan(batch, pipelined=False)
            except Exception as exc:
                log.error("repeating interrupted batch %s failed, kept for the next start: %s", intent.token, exc)
                continue
            self.intents.done(intent.token)
            log.warning("repeated the batch of %d messages that was being written when the ingester stopped; "
                        "ClickHouse kept one copy of each row and completed any table the stop had cut short",
                        len(batch.plan))

    def _done(self, batch: Batch, fresh: list[wire.NodeReport], duplicates: int, ingest_ms: int) -> None:
        """The batch is stored: commit its offsets and count it."""
        self._commit(batch)
        if self.intents is not None and batch.token:
            self.intents.done(batch.token)
        s = self.stats
        s.messages += len(fresh)
        s.rows += sum(len(r.gpus) for r in fresh)
        s.duplicates += duplicates
        s.dead_letters += len(batch.dead)
        s.batches += 1
        s.last_flush_ms = ingest_ms
        if fresh:
            s.last_sample_ms = max(s.last_sample_ms, *(r.time_ms for r in fresh))
        s.backing_off = False
        s.last_error = ""

    def _insert_samples(
        self, batch: Batch, derived: Derived, keep: list[bool], ingest_ms: int, pipelined: bool
    ) -> Future[None] | None:
        """The kept reports' GPU rows: through the JSON staging path where it can take them, else as
        columns. Pipelined, the JSON insert is left running in the helper thread and returned."""
        path = None if batch.columns_only else self._staging
        columns = keep
        pending = None
        if path is not None and batch.raw:
            raw = batch.raw
            as_json = [k and id(r) in raw for k, r in zip(keep, derived.reports, strict=True)]
            columns = [k and not j for k, j in zip(keep, as_json, strict=True)]
            block = self._splicer.block(derived, raw, as_json, ingest_ms)
            if any(columns):
                insert_columns(self.store, "gpu_samples", derived_columns(derived, ingest_ms, columns),
                               settings=dedup.insert_settings(batch.token, "columns"))
            settings = dedup.insert_settings(batch.token, "json")
            if pipelined and self._executor is not None:
                return self._executor.submit(staging.insert, self.store, path, block, settings)
            try:
                staging.insert(self.store, path, block, settings)
            except Exception:
                self._json_failed(batch)
                raise
            return pending
        if any(columns):
            insert_columns(self.store, "gpu_samples", derived_columns(derived, ingest_ms, columns),
                           settings=dedup.insert_settings(batch.token, "columns"))
        return None

    def _staging_path(self) -> staging.Staging | None:
        """The JSON staging table, created on first use; None (column path) while it cannot be had."""
        if self._staging is None and self.json_staging and time.monotonic() >= self._staging_next_try:
            try:
                self._staging = staging.ensure(self.store, self.cfg.clickhouse.cluster)
            except Exception as exc:
                self._staging_next_try = time.monotonic() + STAGING_RETRY_S
                log.warning("JSON staging path unavailable, inserting columns (slower; retry in %.0f s): %s",
                            STAGING_RETRY_S, exc)
        return self._staging

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
        self.store.insert("dead_letters", cols, DEAD_LETTER_COLUMNS, column_oriented=True)

    def _commit(self, batch: Batch) -> None:
        from kafka.structs import OffsetAndMetadata

        if batch.offsets:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in batch.offsets.items()})
            self.liveness.beat(COMMIT)

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

    _abandoned = False

    def _resume(self) -> None:
        self._abandoned = False
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    def on_partitions_revoked(self, revoked: Any) -> None:
        """Rebalance: flush what we hold while we still own it; else let the new owner redo it."""
        if not self.batch and self._inflight is None:
            return
        if self.stats.backing_off:
            self._abandoned = True
            return
        self._settle(final=True)
        if self.batch:
            self.flush(final=True)

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %d partitions", len(assigned))


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
