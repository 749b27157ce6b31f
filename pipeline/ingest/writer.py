"""The batch writer: one batch of validated messages into ClickHouse, planned once and repeatable.

Design notes: docs/design-notes.md#pipeline-ingest-writer-py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpufleet import wire
from gpufleet.config import Config
from gpufleet.pipeline.ingest import claims, dead_letters, dedup, intents, staging
from gpufleet.pipeline.ingest.dead_letters import DeadLetter
from gpufleet.pipeline.ingest.kafka_io import Producer, TopicPartition
from gpufleet.pipeline.ingest.rows import (
    Derived,
    Deriver,
    agent_columns,
    derive,
    derived_columns,
    insert_columns,
    network_columns,
)
from gpufleet.pipeline.ingest.validation import DAY_MS

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)
STAGING_RETRY_S = 300.0
MAX_DAYS_PER_BLOCK = 50
"""Days of sample time in one insert block. `gpu_samples` and `agent_reports` are partitioned by
day of `time`, the rollups by month of the interval start (at most a day earlier), so a block of 50
days spans at most 50 partitions of the raw tables and 100 of a rollup: within ClickHouse's default
`max_partitions_per_insert_block` of 100, whatever the data."""


@dataclass
class Batch:
    """Messages read since the last flush and, once planned, what writing them means."""

    reports: list[wire.NodeReport] = field(default_factory=list)
    raw: dict[int, bytes] = field(default_factory=dict)
    """id(report) -> the bytes it was decoded from, for reports the JSON staging path may take."""
    dead: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """Partition -> next offset to commit."""
    started: float = 0.0
    gpu_rows: int = 0
    derived: Derived | None = None
    """Set by the first write attempt; retries reuse it."""
    fallback: set[int] = field(default_factory=set)
    """id(report) of JSON-path reports whose block's JSON insert failed with none of it stored: they
    go as columns from then on, under a token of their own."""
    pending_json: list[wire.NodeReport] = field(default_factory=list)
    """The reports of the last JSON insert sent (what `json_failed` checks)."""
    dead_written: bool = False
    """Its dead letters are in the DLQ and in ClickHouse (a retry does not send them again)."""
    plan: list[wire.NodeReport] | None = None
    """The messages it writes, fixed by its first attempt (`BatchWriter.plan`); retries repeat them."""
    skipped: int = 0
    """Duplicates dropped by the plan (in the batch, or already stored)."""
    ingest_ms: int = 0
    token: str = ""
    """Dedup token of the plan (`dedup.insert_token`): every repeat of its inserts carries it."""

    def __len__(self) -> int:
        return len(self.reports) + len(self.dead)

    def path_of(self, report: wire.NodeReport) -> int:
        """The report's insert path (`intents.COLUMNS`, `JSON` or `JSON_AS_COLUMNS`)."""
        key = id(report)
        if key in self.fallback:
            return intents.JSON_AS_COLUMNS
        return intents.JSON if key in self.raw else intents.COLUMNS


def day_blocks(reports: Sequence[wire.NodeReport], max_days: int = MAX_DAYS_PER_BLOCK) -> list[int]:
    """The insert block of each report, for reports in sample-time order: consecutive runs of at most
    `max_days` distinct UTC days of `time_ms` (one block, 0, when the batch spans fewer days)."""
    if not reports or reports[-1].time_ms // DAY_MS - reports[0].time_ms // DAY_MS < max_days:
        return [0] * len(reports)
    out, block, days, last_day = [], 0, 0, None
    for r in reports:
        day = r.time_ms // DAY_MS
        if day != last_day:
            if days == max_days:
                block, days = block + 1, 0
            days, last_day = days + 1, day
        out.append(block)
    return out


def _target(kind: str, block: int) -> str:
    """The insert's name in its dedup token; block 0 keeps the name earlier versions used."""
    return kind if block == 0 else f"{kind}-{block}"


class BatchWriter:
    """Writes batches for one ingester; `start` before the first, `close` after the last."""

    def __init__(self, cfg: Config, store: Store, dlq: Producer, clock: Callable[[], float] = time.time, *,
                 json_staging: bool = True, intent_log: bool = True) -> None:
        self.cfg = cfg
        self.store = store
        self.dlq = dlq
        self.clock = clock
        self.json_staging = json_staging
        self.intents = intents.IntentLog.for_store(cfg.clickhouse.dsn, store.database) if intent_log else None
        self.deriver = Deriver(cfg.health, cfg.peak_flops, claims.ClaimBook(cfg.ingest.max_claim_ms))
        self.staging: staging.Staging | None = None
        self._staging_next_try = 0.0
        self._splicer = staging.Splicer(self.deriver.peak)
        self._executor: ThreadPoolExecutor | None = None

    # --- life cycle ------------------------------------------------------------------------
    def start(self, pipelined: bool) -> None:
        """Find the staging path, repeat what a previous run left unfinished, start the insert thread."""
        self.staging_path()
        self.replay_intents()
        if pipelined:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-insert")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._executor = None

    def staging_path(self) -> staging.Staging | None:
        """The JSON staging table, created on first use; None (column path) while it cannot be had."""
        if self.staging is None and self.json_staging and time.monotonic() >= self._staging_next_try:
            try:
                self.staging = staging.ensure(self.store, self.cfg.clickhouse.cluster)
            except Exception as exc:
                self._staging_next_try = time.monotonic() + STAGING_RETRY_S
                log.warning("JSON staging path unavailable, inserting columns (slower; retry in %.0f s): %s",
                            STAGING_RETRY_S, exc)
        return self.staging

    # --- one batch -------------------------------------------------------------------------
    def write(self, batch: Batch, pipelined: bool = False) -> Future[None] | None:
        """Plan (once), dead letters (once), inserts. Pipelined, the last GPU-row insert may be left
        running in the insert thread and is returned; the batch is stored once it completes."""
        if batch.plan is None:
            self.plan(batch)
        if batch.dead and not batch.dead_written:
            dead_letters.send(self.dlq, self.cfg.kafka.dlq_topic, batch.dead)
            dead_letters.store(self.store, batch.dead, batch.ingest_ms)
            batch.dead_written = True
        # Last: once a GPU-row insert is left running (pipelined), nothing here may fail and retry,
        # for a retry would build the next JSON block in the buffer that insert is still reading.
        return self._write_plan(batch, pipelined) if batch.plan else None

    def plan(self, batch: Batch) -> None:
        """Fix what the batch writes, once: its retries (and a restarted ingester's replay of its intent)
        repeat exactly these inserts under the same dedup token, so ClickHouse drops the parts that
        landed and completes the tables that missed them (pipeline/ingest/dedup.py, intents.py)."""
        ingest_ms = int(self.clock() * 1000)
        unique, dup_in_batch = dedup.unique_in_batch(batch.reports)
        stored = dedup.already_stored(self.store, unique)
        batch.plan = [r for r in unique if dedup.identity(r) not in stored]
        batch.skipped = dup_in_batch + len(stored)
        batch.ingest_ms = ingest_ms
        batch.token = dedup.insert_token(batch.plan, ingest_ms)
        self._record_intent(batch)

    def done(self, batch: Batch) -> None:
        """The batch's offsets are committed: forget its intent."""
        if self.intents is not None and batch.token:
            self.intents.done(batch.token)

    def json_failed(self, batch: Batch) -> None:
        """After a failed JSON insert: its reports take the column path only if none of them landed. A
        partly landed insert (raw rows in, a rollup refused) must be repeated as it was, under its token."""
        sent = batch.pending_json
        try:
            landed = dedup.already_stored(self.store, sent)
        except Exception:
            return  # cannot tell now: repeat the same insert
        if not landed:
            batch.fallback.update(id(r) for r in sent)  # e.g. JSON that ClickHouse refuses: the column path is exact
            self._record_intent(batch)

    # --- inserts ---------------------------------------------------------------------------
    def _write_plan(self, batch: Batch, pipelined: bool) -> Future[None] | None:
        """The plan's inserts, block by block: agent_reports and network_ports, then the GPU rows (the last
        insert is left running when pipelined)."""
        fresh = batch.plan or []
        fresh_ids = {id(r) for r in fresh}
        if batch.derived is None or not fresh_ids <= {id(r) for r in batch.derived.reports}:
            claims.load(self.store, self.deriver.claims, fresh, batch.ingest_ms)
            batch.derived = derive(fresh, self.deriver)
        derived = batch.derived
        kept = [r for r in derived.reports if id(r) in fresh_ids]
        block_of = {id(r): b for r, b in zip(kept, day_blocks(kept), strict=True)}
        blocks = max(block_of.values(), default=-1) + 1
        for b in range(blocks):
            agents = [r for r in fresh if block_of[id(r)] == b]
            insert_columns(self.store, "agent_reports", agent_columns(agents, batch.ingest_ms),
                           settings=dedup.insert_settings(batch.token, _target("agents", b)))
            insert_columns(self.store, "network_ports", network_columns(agents, batch.ingest_ms),
                           settings=dedup.insert_settings(batch.token, _target("network", b)))
        pending = None
        for b in range(blocks):
            keep = [block_of.get(id(r)) == b for r in derived.reports]
            pending = self._insert_samples(batch, derived, keep, b, pipelined and b == blocks - 1)
        return pending

    def _insert_samples(self, batch: Batch, derived: Derived, keep: list[bool], block: int,
                        pipelined: bool) -> Future[None] | None:
        """One block's GPU rows: as columns (messages the JSON path cannot take, then those whose JSON
        insert failed), then through the JSON staging path. Pipelined, the JSON insert is left running
        in the insert thread and returned."""
        paths = [batch.path_of(r) if k else None for r, k in zip(derived.reports, keep, strict=True)]
        for path, kind in ((intents.COLUMNS, "columns"), (intents.JSON_AS_COLUMNS, "json-as-columns")):
            flags = [p == path for p in paths]
            if any(flags):
                insert_columns(self.store, "gpu_samples", derived_columns(derived, batch.ingest_ms, flags),
                               settings=dedup.insert_settings(batch.token, _target(kind, block)))
        as_json = [p == intents.JSON for p in paths]
        if not any(as_json):
            return None
        if self.staging is None:
            raise RuntimeError("a batch planned for the JSON staging path has no staging table")
        data = self._splicer.block(derived, batch.raw, as_json, batch.ingest_ms)
        settings = dedup.insert_settings(batch.token, _target("json", block))
        batch.pending_json = [r for r, j in zip(derived.reports, as_json, strict=True) if j]
        if pipelined and self._executor is not None:
            return self._executor.submit(staging.insert, self.store, self.staging, data, settings)
        try:
            staging.insert(self.store, self.staging, data, settings)
        except Exception:
            self.json_failed(batch)
            raise
        return None

    # --- the intent log ----------------------------------------------------------------------
    def _record_intent(self, batch: Batch) -> None:
        if self.intents is not None and batch.plan:
            self.intents.record(intents.Intent(
                batch.token, batch.ingest_ms, False, self.staging.table if self.staging else "",
                [(batch.raw.get(id(r)) or wire.encode(r), batch.path_of(r)) for r in batch.plan]))

    def replay_intents(self) -> None:
        """Repeat each batch a previous run of this ingester was writing when it died (intents.py)."""
        if self.intents is None:
            return
        for intent in self.intents.pending():
            batch = _batch_of(intent)
            uses_json = any(batch.path_of(r) == intents.JSON for r in batch.reports)
            if uses_json and (self.staging is None or self.staging.table != intent.staging_table):
                log.error("cannot repeat interrupted batch %s: it went through staging table %r, this ingester "
                          "uses %r; kept it. Check the rollups (docs/reliability.md)", intent.token,
                          intent.staging_table, self.staging.table if self.staging else None)
                continue
            try:
                self._write_plan(batch, pipelined=False)
            except Exception as exc:
                log.error("repeating interrupted batch %s failed, kept for the next start: %s", intent.token, exc)
                continue
            self.intents.done(intent.token)
            log.warning("repeated the batch of %d messages that was being written when the ingester stopped; "
                        "ClickHouse kept one copy of each row and completed any table the stop had cut short",
                        len(batch.reports))


def _batch_of(intent: intents.Intent) -> Batch:
    """The planned batch an intent describes (an earlier version's `columns_only` means: all as columns)."""
    batch = Batch()
    for data, path in intent.messages:
        report = wire.decode(data)
        batch.reports.append(report)
        if intent.columns_only or path == intents.COLUMNS:
            continue
        batch.raw[id(report)] = data
        if path == intents.JSON_AS_COLUMNS:
            batch.fallback.add(id(report))
    batch.plan, batch.token, batch.ingest_ms = batch.reports, intent.token, intent.ingest_ms
    return batch
