"""The batch ledger: each batch entered before it is written, so any owner of its partition repeats it exactly.

Design notes: docs/design-notes.md#pipeline-ingest-ledger-py.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from gpufleet.version import __version__

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)

TABLE: Final = "ingest_batches"
COLUMNS: Final = ("group_id", "topic", "partition", "first_offset", "kind", "block", "last_offset", "planned_ms",
                  "token", "staging_table", "column_offsets", "planner")
_FIELDS: Final = "first_offset, last_offset, planned_ms, staging_table, column_offsets, planner"
_KEY: Final = ("group_id = {g:String} AND topic = {t:String} AND partition = {p:UInt32}")
_NEWEST: Final = (
    f"SELECT {_FIELDS} FROM {{db:Identifier}}.{TABLE} WHERE {_KEY} AND kind = 'batch' AND first_offset = ("
    f"SELECT first_offset FROM {{db:Identifier}}.{TABLE} WHERE {_KEY} AND kind = 'batch' "
    "ORDER BY first_offset DESC LIMIT 1) ORDER BY recorded_at, token LIMIT 1"
)
_AT: Final = (f"SELECT {_FIELDS} FROM {{db:Identifier}}.{TABLE} WHERE {_KEY} AND kind = 'batch' "
              "AND first_offset = {f:UInt64} ORDER BY recorded_at, token LIMIT 1")
_JSON_FAILED: Final = (f"SELECT DISTINCT block FROM {{db:Identifier}}.{TABLE} WHERE {_KEY} AND kind = 'json_failed' "
                       "AND first_offset = {f:UInt64} AND token = {token:String}")


def batch_token(topic: str, partition: int, first: int, last: int, planned_ms: int) -> str:
    """The dedup token of the batch `[first, last]` of `topic/partition` planned at `planned_ms`.

    The planned time keeps a later, deliberate re-ingest of the same offsets (another consumer group, a
    reset of the group's offsets) from being taken for a repeat of this batch.
    """
    text = f"{topic}\x00{partition}\x00{first}\x00{last}\x00{planned_ms}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """One recorded batch: what any owner of the partition needs to repeat it exactly."""

    topic: str
    partition: int
    first: int
    last: int
    """Inclusive."""
    planned_ms: int
    staging_table: str = ""
    """The JSON staging table its JSON messages go through; empty when every message goes as columns."""
    column_offsets: tuple[int, ...] = ()
    """Offsets whose message goes as columns although the batch has a staging table."""
    planner: str = __version__

    @property
    def token(self) -> str:
        return batch_token(self.topic, self.partition, self.first, self.last, self.planned_ms)

    def covers(self, offset: int) -> bool:
        return self.first <= offset <= self.last


@dataclass(frozen=True)
class Resume:
    """Where a new owner of a partition starts: `seek` (None: where the consumer is) and the batch it
    must repeat first (None: none is unfinished)."""

    seek: int | None = None
    pending: Entry | None = None


def resume(newest: Entry | None, position: int) -> Resume:
    """The new owner's start on a partition whose newest entry is `newest` and whose consumer is at `position`
    (the committed offset). Pure.

    Entries are made in order and each only after the previous batch was stored, so every batch before the
    newest entry is stored: a committed offset behind it (its commits failed) skips to it. The newest one
    is unfinished unless the committed offset is past it.
    """
    if newest is None or newest.last < position:
        return Resume()
    if newest.first >= position:
        return Resume(newest.first if newest.first > position else None, newest)
    log.warning("committed offset %d of %s/%d lies inside the batch [%d, %d] recorded in the ledger (not a batch "
                "boundary: committed by something else than this ingester); starting there without repeating it",
                position, newest.topic, newest.partition, newest.first, newest.last)
    return Resume()


class BatchTaken(RuntimeError):
    """Another consumer entered a batch at this offset first: write its batch, not this one."""

    def __init__(self, winner: Entry) -> None:
        super().__init__(f"batch [{winner.first}, {winner.last}] of {winner.topic}/{winner.partition} was entered "
                         "by another consumer first")
        self.winner = winner


class Ledger:
    """The `ingest_batches` table of one consumer group, read and written through `store`.

    With a ClickHouse cluster (`consistent`), entries are written with a quorum and read with sequential
    consistency, so a replica that missed the winning entry never answers for it.
    """

    def __init__(self, store: Store, group_id: str, dedup: Mapping[str, object], *, consistent: bool = False) -> None:
        self.store = store
        self.group_id = group_id
        self._write = {**dedup, **({"insert_quorum": "auto"} if consistent else {})}
        self._read = {"select_sequential_consistency": 1} if consistent else {}

    def newest(self, topic: str, partition: int) -> Entry | None:
        """The newest batch entered for the partition (the winner among entries at its first offset)."""
        return self._one(_NEWEST, topic, partition, {})

    def at(self, topic: str, partition: int, first: int) -> Entry | None:
        """The winning entry at `first`."""
        return self._one(_AT, topic, partition, {"f": first})

    def enter(self, entry: Entry) -> Entry:
        """Record `entry` unless a entry at its first offset exists; returns the winner (`entry` or the other).

        Raises when the winner cannot be read back (the batch must then wait, never be written unrecorded).
        """
        settings = {"insert_deduplication_token": f"gpufleet-entry-{self.group_id}-{entry.topic}-{entry.partition}-"
                                                  f"{entry.first}", **self._write}
        self.store.insert(TABLE, [self._row(entry, "batch", 0)], COLUMNS, settings=settings)
        winner = self.at(entry.topic, entry.partition, entry.first)
        if winner is None:
            raise RuntimeError(f"the entry of batch [{entry.first}, {entry.last}] of {entry.topic}/{entry.partition} "
                               "is not readable after it was written")
        return winner

    def mark_json_failed(self, entry: Entry, block: int) -> None:
        """Record that block `block` of the batch goes as columns (before that insert is sent)."""
        settings = {"insert_deduplication_token": f"gpufleet-{entry.token}-json-failed-{block}",
                    **self._write}
        self.store.insert(TABLE, [self._row(entry, "json_failed", block)], COLUMNS, settings=settings)

    def json_failed(self, entry: Entry) -> set[int]:
        """The blocks of the batch recorded as going as columns."""
        rows = self.store.query(_JSON_FAILED, {**self._key(entry.topic, entry.partition), "f": entry.first,
                                               "token": entry.token}, settings=self._read or None).result_rows
        return {int(b) for (b,) in rows}

    def _one(self, sql: str, topic: str, partition: int, extra: Mapping[str, Any]) -> Entry | None:
        rows = self.store.query(sql, {**self._key(topic, partition), **extra}, settings=self._read or None).result_rows
        if not rows:
            return None
        first, last, planned, staging_table, column_offsets, planner = rows[0]
        return Entry(topic, partition, int(first), int(last), int(planned), staging_table,
                     tuple(int(o) for o in column_offsets), planner)

    def _key(self, topic: str, partition: int) -> dict[str, Any]:
        return {"g": self.group_id, "t": topic, "p": partition}

    def _row(self, entry: Entry, kind: str, block: int) -> Sequence[Any]:
        return [self.group_id, entry.topic, entry.partition, entry.first, kind, block, entry.last, entry.planned_ms,
                entry.token, entry.staging_table, list(entry.column_offsets), entry.planner]

