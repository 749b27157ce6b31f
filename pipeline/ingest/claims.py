"""Claimed time: within one node, each GPU-second is claimed (billed) by at most one sample.

Design notes: docs/design-notes.md#pipeline-ingest-claims-py.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from gpufleet.config import IngestConfig
from gpufleet.wire import NodeReport

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

Key = tuple[str, str, str]
"""(cluster, node, GPU UUID): the stream of claims one consumer sees in order."""

DEFAULT_MAX_CLAIM_MS = IngestConfig().max_claim_ms


@dataclass
class Coverage:
    """The claimed spans of one GPU of one node, exactly known from `since` on."""

    since: int
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    """Sorted, disjoint, not touching: `[starts[i], ends[i])`."""

    def claim(self, start: int, end: int) -> tuple[int, int]:
        """Claim `[start, end)`: (ms not claimed before, start of the first such ms, or `end` if none)."""
        starts, ends = self.starts, self.ends
        if not ends or start > ends[-1]:  # after everything claimed (the steady state): all of it
            starts.append(start)
            ends.append(end)
            return end - start, start
        if start == ends[-1]:
            ends[-1] = end
            return end - start, start
        i = j = bisect_left(ends, start)  # first span touching or after `start`
        claimed, first, cursor = 0, end, start
        while j < len(starts) and starts[j] <= end:
            if starts[j] > cursor:
                claimed += starts[j] - cursor
                first = min(first, cursor)
            cursor = max(cursor, ends[j])
            j += 1
        if cursor < end:
            claimed += end - cursor
            first = min(first, cursor)
        if j > i:
            starts[i:j], ends[i:j] = [min(start, starts[i])], [max(end, ends[j - 1])]
        else:
            starts.insert(i, start)
            ends.insert(i, end)
        return claimed, first

    def add(self, start: int, end: int) -> None:
        """Mark `[start, end)` claimed (a stored claim)."""
        if end > start:
            self.claim(start, end)

    def trim(self, max_spans: int, before: int) -> None:
        """Over `max_spans` spans, forget the oldest ones ending by `before` (none later in the batch can need
        them); what is forgotten moves `since` forward, so a sample that needs it reads the store again."""
        ends = self.ends
        extra = min(len(ends) - max_spans, bisect_left(ends, before + 1))
        if extra > 0:
            self.since = max(self.since, ends[extra - 1])
            del self.starts[:extra], ends[:extra]


_uuids = operator.attrgetter("uuid")


@dataclass
class ClaimBook:
    """Per (cluster, node, GPU): the time already claimed. One per ingester (per `Deriver`)."""

    max_claim_ms: int = DEFAULT_MAX_CLAIM_MS
    max_spans: int = 64
    """Spans kept per GPU; older ones are forgotten (read again from the store if a sample needs them)."""
    _known: dict[tuple[str, str], dict[str, Coverage]] = field(default_factory=dict)
    """(cluster, node) -> GPU UUID -> its coverage."""

    def requested(self, report: NodeReport) -> int:
        """Start of the part of the report's interval its samples request."""
        return report.time_ms - min(report.interval_ms, self.max_claim_ms)

    def missing(self, reports: Iterable[NodeReport]) -> dict[Key, int]:
        """GPUs whose samples start before what the book knows, with the earliest such start."""
        out: dict[Key, int] = {}
        empty: dict[str, Coverage] = {}
        for r in reports:
            start = self.requested(r)
            gpus = self._known.get((r.cluster, r.node), empty)
            for uuid in map(_uuids, r.gpus):
                cov = gpus.get(uuid)
                if cov is None or start < cov.since:
                    key = (r.cluster, r.node, uuid)
                    if start < out.get(key, start + 1):
                        out[key] = start
        return out

    def learn(self, needed: dict[Key, int], spans: Iterable[tuple[str, str, str, int, int]]) -> None:
        """Take the stored claims `(cluster, node, uuid, start, end)` of the `needed` GPUs from their starts on."""
        for (cluster, node, uuid), since in needed.items():
            gpus = self._known.setdefault((cluster, node), {})
            cov = gpus.get(uuid)
            if cov is None:
                gpus[uuid] = Coverage(since)
            else:
                cov.since = min(cov.since, since)
        for cluster, node, uuid, start, end in spans:
            if end > needed.get((cluster, node, uuid), end):
                self._known[(cluster, node)][uuid].add(int(start), int(end))

    def claim_all(self, reports: Sequence[NodeReport]) -> tuple[list[int], list[int]]:
        """Claim every GPU sample of `reports` in order: claimed ms and claim start (Unix ms), flat."""
        claimed: list[int] = []
        starts: list[int] = []
        add_ms, add_start = claimed.append, starts.append
        known, max_spans, keep_back = self._known, self.max_spans, self.max_claim_ms
        for r in reports:
            start, end = self.requested(r), r.time_ms
            gpus = known.get((r.cluster, r.node))
            if gpus is None:
                gpus = known[(r.cluster, r.node)] = {}
            for uuid in map(_uuids, r.gpus):
                cov = gpus.get(uuid)
                if cov is None:
                    cov = gpus[uuid] = Coverage(start)
                ms, first = cov.claim(start, end)
                add_ms(ms)
                add_start(first)
                if len(cov.ends) > max_spans:
                    cov.trim(max_spans, end - keep_back)
        return claimed, starts

    def forget(self) -> None:
        """Drop everything known (after a rebalance or a batch that was not stored): re-read on demand."""
        self._known.clear()


_STORED_CLAIMS: Final = (
    "SELECT cluster, node, gpu_uuid, toUnixTimestamp64Milli(claim_start), toUnixTimestamp64Milli(time) "
    "FROM {db:Identifier}.gpu_samples "
    "WHERE cluster IN {clusters:Array(String)} AND node IN {nodes:Array(String)} "
    "AND gpu_uuid IN {uuids:Array(String)} AND time > fromUnixTimestamp64Milli({since:Int64}) "
    "AND claimed_ms > 0 AND ingest_time != fromUnixTimestamp64Milli({ingest:Int64})"
)


def load(store: Store, book: ClaimBook, reports: Sequence[NodeReport], ingest_ms: int) -> int:
    """Read into `book` the stored claims the batch's samples need; returns the GPUs looked up.

    One query over `gpu_samples`' primary key (cluster, node) for the GPUs the book does not know far
    enough back. Rows of the batch being written (`ingest_ms`: a batch repeated after a crash may have
    landed in part) are left out, so a repeated batch claims what it claimed the first time.
    """
    needed = book.missing(reports)
    if not needed:
        return 0
    rows = store.rows(_STORED_CLAIMS, {
        "clusters": sorted({k[0] for k in needed}),
        "nodes": sorted({k[1] for k in needed}),
        "uuids": sorted({k[2] for k in needed}),
        "since": min(needed.values()),
        "ingest": ingest_ms,
    })
    book.learn(needed, rows)
    return len(needed)
