"""The batch writer: one partition's batch of validated messages into ClickHouse, planned once, repeatable by anyone.

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
from gpufleet.pipeline.ingest import claims, dead_letters, dedup, staging
from gpufleet.pipeline.ingest.dead_letters import DeadLetter
from gpufleet.pipeline.ingest.kafka_io import Producer, TopicPartition
from gpufleet.pipeline.ingest.ledger import BatchTaken, Entry, Ledger
from gpufleet.pipeline.ingest.rows import (
    Derived,
    Deriver,
    agent_columns,
    derive,
    derived_columns,
    insert_columns,
    network_columns,
)
from gpufleet.pipeline.ingest.validation import DAY_MS, TimeWindow

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)
STAGING_RETRY_S = 300.0
MAX_DAYS_PER_BLOCK = 50
"""Days of sample time in one insert block. `gpu_samples` and `agent_reports` are partitioned by
day of `time`, the rollups by month of the interval start (at most a day earlier), so a block of 50
days spans at most 50 partitions of the raw tables and 100 of a rollup: within ClickHouse's default
`max_partitions_per_insert_block` of 100, whatever the data."""

COLUMNS, JSON, JSON_AS_COLUMNS = 0, 1, 2
"""A message's insert path: Python columns; the JSON staging path; the column path taken after ClickHouse
refused the JSON insert of its block with none of it stored (recorded in the ledger first)."""
REFUSED_DATA = frozenset({6, 7, 15, 25, 26, 27, 32, 33, 38, 41, 53, 70, 72, 117, 130, 321, 349, 376, 467})
"""ClickHouse error codes that mean "this input cannot be parsed or held": the same bytes fail the same way
every time, so the block may change path. Anything else (a timeout, a lost connection, a full disk) repeats
the same insert, which may still be running on the server."""


@dataclass
class Batch:
    """Messages of one partition read since its last batch and, once planned, what writing them means."""

    tp: TopicPartition | None = None
    reports: list[wire.NodeReport] = field(default_factory=list)
    offset_of: dict[int, int] = field(default_factory=dict)
    """id(report) -> its offset."""
    value_of: dict[int, bytes] = field(default_factory=dict)
    """id(report) -> the bytes it was decoded from (a repeat may send any of them through JSON staging)."""
    json_ok: set[int] = field(default_factory=set)
    """id(report) of the reports this ingester's staging decoder admitted (`validate_for_staging`)."""
    dead: list[DeadLetter] = field(default_factory=list)
    first: int = -1
    """Offset of its first message."""
    last: int = -1
    """Offset of its last message."""
    started: float = 0.0
    gpu_rows: int = 0
    entry: Entry | None = None
    """The recorded batch: set before reading when repeating another consumer's batch, else by the plan."""
    replay: bool = False
    """It repeats a entry found in the ledger (another consumer's, or an earlier run's)."""
    staging: staging.Staging | None = None
    """The staging table its JSON messages go through (the entry's)."""
    derived: Derived | None = None
    """Set by the first write attempt; retries reuse it."""
    fallback: set[int] = field(default_factory=set)
    """id(report) of JSON-path reports whose block goes as columns (`JSON_AS_COLUMNS`)."""
    pending_json: list[wire.NodeReport] = field(default_factory=list)
    """The reports of the last JSON insert sent (what `json_failed` checks)."""
    pending_block: int = 0
    late: list[DeadLetter] = field(default_factory=list)
    """Messages the plan found outside the time window around the batch's planned time."""
    dead_written: bool = False
    """Its dead letters are in the DLQ and in ClickHouse (a retry does not send them again)."""
    plan: list[wire.NodeReport] | None = None
    """The messages it writes, fixed by its first attempt (`BatchWriter.plan`); retries repeat them."""
    skipped: int = 0
    """Duplicates dropped by the plan (in the batch, or stored by another batch)."""
    ingest_ms: int = 0
    token: str = ""
    """Dedup token of the batch (its entry's): every repeat of its inserts carries it."""

    def __len__(self) -> int:
        return len(self.reports) + len(self.dead)

    @property
    def next_offset(self) -> int:
        """The offset to commit once the batch is stored."""
        return self.last + 1

    def add_report(self, offset: int, report: wire.NodeReport, value: bytes, json_ok: bool) -> None:
        self._note(offset)
        key = id(report)
        self.reports.append(report)
        self.offset_of[key] = offset
        self.value_of[key] = value
        if json_ok:
            self.json_ok.add(key)
        self.gpu_rows += len(report.gpus)

    def add_dead(self, dead: DeadLetter) -> None:
        self._note(dead.offset)
        self.dead.append(dead)

    def _note(self, offset: int) -> None:
        if self.first < 0:
            self.first, self.started = offset, time.monotonic()
        self.last = offset

    def split(self, at: int) -> Batch:
        """Keep the messages at offsets up to `at`; return the rest as a new batch (possibly empty)."""
        rest = Batch(self.tp)
        kept = [r for r in self.reports if self.offset_of[id(r)] <= at]
        for r in self.reports:
            if self.offset_of[id(r)] > at:
                rest.add_report(self.offset_of[id(r)], r, self.value_of[id(r)], id(r) in self.json_ok)
        for d in self.dead:
            if d.offset > at:
                rest.add_dead(d)
        if rest:
            rest.started = self.started
        self._keep(kept, [d for d in self.dead if d.offset <= at])
        return rest

    def drop_before(self, offset: int) -> None:
        """Forget the messages before `offset` (stored by earlier batches of the partition)."""
        self._keep([r for r in self.reports if self.offset_of[id(r)] >= offset],
                   [d for d in self.dead if d.offset >= offset])

    def merge(self, later: Batch | None) -> Batch:
        """This batch followed by `later`'s messages (same partition)."""
        if later is not None:
            for r in later.reports:
                self.add_report(later.offset_of[id(r)], r, later.value_of[id(r)], id(r) in later.json_ok)
            for d in later.dead:
                self.add_dead(d)
        return self

    def _keep(self, reports: list[wire.NodeReport], dead: list[DeadLetter]) -> None:
        keys = {id(r) for r in reports}
        self.reports, self.dead = reports, dead
        self.offset_of = {k: v for k, v in self.offset_of.items() if k in keys}
        self.value_of = {k: v for k, v in self.value_of.items() if k in keys}
        self.json_ok &= keys
        self.gpu_rows = sum(len(r.gpus) for r in reports)
        offsets = [*self.offset_of.values(), *(d.offset for d in dead)]
        self.first, self.last = (min(offsets), max(offsets)) if offsets else (-1, -1)

    def path_of(self, report: wire.NodeReport) -> int:
        """The report's insert path (`COLUMNS`, `JSON` or `JSON_AS_COLUMNS`), as its entry fixed it."""
        key, entry = id(report), self.entry
        if entry is None or not entry.staging_table or self.offset_of[key] in entry.column_offsets:
            return COLUMNS
        return JSON_AS_COLUMNS if key in self.fallback else JSON


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


def _blocks_of(plan: Sequence[wire.NodeReport]) -> dict[int, int]:
    """id(report) -> its insert block, as `_write_plan` splits the plan (in sample-time order, as `derive`
    orders it)."""
    ordered = sorted(plan, key=lambda r: r.time_ms)
    return {id(r): b for r, b in zip(ordered, day_blocks(ordered), strict=True)}


def _target(kind: str, block: int) -> str:
    """The insert's name in its dedup token."""
    return kind if block == 0 else f"{kind}-{block}"


class ReplayRefused(RuntimeError):
    """A recorded batch this ingester cannot repeat exactly (it went through a staging table of another shape)."""


class BatchWriter:
    """Writes batches for one ingester; `start` before the first, `close` after the last."""

    def __init__(self, cfg: Config, store: Store, dlq: Producer, clock: Callable[[], float] = time.time, *,
                 json_staging: bool = True, ledger: bool = True) -> None:
        self.cfg = cfg
        self.store = store
        self.dlq = dlq
        self.clock = clock
        self.json_staging = json_staging
        self.window = TimeWindow.from_config(cfg)
        self.dedup = dedup.dedup_settings(getattr(store.client, "server_settings", {}),
                                          sharded=bool(cfg.clickhouse.cluster))
        self.ledger = (Ledger(store, cfg.ingest.group_id, self.dedup, consistent=bool(cfg.clickhouse.cluster))
                       if ledger else None)
        self.deriver = Deriver(cfg.health, cfg.peak_flops, claims.ClaimBook(cfg.ingest.max_claim_ms))
        self.staging: staging.Staging | None = None
        self._adopted: dict[str, staging.Staging] = {}
        self._staging_next_try = 0.0
        self._splicer = staging.Splicer(self.deriver.peak)
        self._executor: ThreadPoolExecutor | None = None

    # --- life cycle ------------------------------------------------------------------------
    def start(self, pipelined: bool) -> None:
        """Find the staging path, start the insert thread."""
        self.staging_path()
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
        """Entry and plan (once), dead letters (once), inserts. Pipelined, the last GPU-row insert may be left
        running in the insert thread and is returned; the batch is stored once it completes. Raises
        `BatchTaken` when another consumer entered a batch at its first offset first."""
        if batch.plan is None:
            self.plan(batch)
        dead = batch.dead + batch.late
        if dead and not batch.dead_written:
            dead_letters.send(self.dlq, self.cfg.kafka.dlq_topic, dead)
            dead_letters.store(self.store, dead, batch.ingest_ms,
                               settings=dedup.insert_settings(batch.token, "dead", self.dedup))
            batch.dead_written = True
        # Last: once a GPU-row insert is left running (pipelined), nothing here may fail and retry,
        # for a retry would build the next JSON block in the buffer that insert is still reading.
        return self._write_plan(batch, pipelined) if batch.plan else None

    def plan(self, batch: Batch) -> None:
        """Fix what the batch writes, once: its entry (recorded in the ledger first), the messages inside the
        time window around its planned time, and of those the ones no other batch stored. A repeat of the
        entry, by anyone, plans exactly the same (the batch's own rows, dated by its planned time, are not
        "stored by another batch")."""
        if batch.entry is None:
            batch.entry = self._enter(batch)
        entry = batch.entry
        batch.staging = self._staging_of(entry)
        planned = entry.planned_ms
        inside, batch.late = [], []
        for r in batch.reports:
            reason = self.window.check(r.time_ms, planned)
            if reason is None:
                inside.append(r)
            else:
                batch.late.append(DeadLetter(entry.topic, entry.partition, batch.offset_of[id(r)],
                                             r.node.encode(), batch.value_of[id(r)], reason))
        unique, dup_in_batch = dedup.unique_in_batch(inside)
        stored = dedup.already_stored(self.store, unique, planned)
        plan = [r for r in unique if dedup.identity(r) not in stored]
        if batch.replay and self.ledger is not None:
            failed = self.ledger.json_failed(entry)
            if failed:
                block_of = _blocks_of(plan)
                batch.fallback = {id(r) for r in plan if block_of[id(r)] in failed}
        batch.plan, batch.skipped = plan, dup_in_batch + len(stored)
        batch.ingest_ms, batch.token = planned, entry.token

    def _enter(self, batch: Batch) -> Entry:
        """Record the batch in the ledger (the first entry at its first offset wins; `BatchTaken` otherwise)."""
        assert batch.tp is not None
        table = self.staging.table if self.staging is not None else ""
        columns = tuple(sorted(batch.offset_of[id(r)] for r in batch.reports if id(r) not in batch.json_ok))
        entry = Entry(batch.tp.topic, batch.tp.partition, batch.first, batch.last, int(self.clock() * 1000),
                      table, columns if table else ())
        if self.ledger is None:
            return entry
        winner = self.ledger.enter(entry)
        if winner.token != entry.token:
            raise BatchTaken(winner)
        return entry

    def _staging_of(self, entry: Entry) -> staging.Staging | None:
        """The staging table the entry's JSON messages go through: ours, or (repeating a batch another version
        planned) the recorded one when it takes the same input."""
        name = entry.staging_table
        if not name:
            return None
        if self.staging is not None and self.staging.table == name:
            return self.staging
        if name not in self._adopted:
            adopted = staging.adopt(self.store, name, self.cfg.clickhouse.cluster)
            if adopted is None:
                raise ReplayRefused(
                    f"batch [{entry.first}, {entry.last}] of {entry.topic}/{entry.partition} was planned by gpufleet "
                    f"{entry.planner} through the staging table {name}, whose input this version does not produce: "
                    "it cannot be repeated exactly here. Let an ingester of that version finish it "
                    "(docs/reliability.md, \"Repeating a batch planned by another version\")")
            self._adopted[name] = adopted
        return self._adopted[name]

    def json_failed(self, batch: Batch, exc: BaseException) -> None:
        """After a failed JSON insert: its block takes the column path only if ClickHouse refused the data itself
        and none of it landed, and only once that is recorded in the ledger (a repeat by anyone takes the same
        path). Anything else repeats the same insert under its token."""
        if getattr(exc, "code", None) not in REFUSED_DATA or batch.entry is None:
            return
        sent = batch.pending_json
        try:
            landed = dedup.already_stored(self.store, sent, -1)
            if landed:
                return
            if self.ledger is not None:
                self.ledger.mark_json_failed(batch.entry, batch.pending_block)
        except Exception:
            return  # cannot tell or record now: repeat the same insert
        batch.fallback.update(id(r) for r in sent)  # e.g. JSON that ClickHouse refuses: the column path is exact

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
        block_of = _blocks_of([r for r in derived.reports if id(r) in fresh_ids])
        blocks = max(block_of.values(), default=-1) + 1
        for b in range(blocks):
            agents = [r for r in fresh if block_of[id(r)] == b]
            insert_columns(self.store, "agent_reports", agent_columns(agents, batch.ingest_ms),
                           settings=dedup.insert_settings(batch.token, _target("agents", b), self.dedup))
            insert_columns(self.store, "network_ports", network_columns(agents, batch.ingest_ms),
                           settings=dedup.insert_settings(batch.token, _target("network", b), self.dedup))
        pending = None
        for b in range(blocks):
            keep = [block_of.get(id(r)) == b for r in derived.reports]
            pending = self._insert_samples(batch, derived, keep, b, pipelined and b == blocks - 1)
        return pending

    def _insert_samples(self, batch: Batch, derived: Derived, keep: list[bool], block: int,
                        pipelined: bool) -> Future[None] | None:
        """One block's GPU rows: as columns (messages the entry sends as columns, then those whose block's JSON
        insert ClickHouse refused), then through the JSON staging path. Pipelined, the JSON insert is left
        running in the insert thread and returned."""
        paths = [batch.path_of(r) if k else None for r, k in zip(derived.reports, keep, strict=True)]
        for path, kind in ((COLUMNS, "columns"), (JSON_AS_COLUMNS, "json-as-columns")):
            flags = [p == path for p in paths]
            if any(flags):
                insert_columns(self.store, "gpu_samples", derived_columns(derived, batch.ingest_ms, flags),
                               settings=dedup.insert_settings(batch.token, _target(kind, block), self.dedup))
        as_json = [p == JSON for p in paths]
        if not any(as_json):
            return None
        path = batch.staging
        if path is None:
            raise RuntimeError("a batch planned for the JSON staging path has no staging table")
        data = self._splicer.block(derived, batch.value_of, as_json, batch.ingest_ms)
        settings = dedup.insert_settings(batch.token, _target("json", block), self.dedup)
        batch.pending_json = [r for r, j in zip(derived.reports, as_json, strict=True) if j]
        batch.pending_block = block
        if pipelined and self._executor is not None:
            return self._executor.submit(staging.insert, self.store, path, data, settings)
        try:
            staging.insert(self.store, path, data, settings)
        except Exception as exc:
            self.json_failed(batch, exc)
            raise
        return None
