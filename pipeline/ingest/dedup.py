"""Exactly-once effect on top of at-least-once delivery: drop messages already stored, repeat inserts safely.

Design notes: docs/design-notes.md#pipeline-ingest-dedup-py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from gpufleet.wire import NodeReport

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

Identity = tuple[str, str, str, int]
_STORED = (
    "SELECT DISTINCT cluster, node, boot_id, seq FROM {db:Identifier}.gpu_samples "
    "WHERE cluster IN {clusters:Array(String)} AND node IN {nodes:Array(String)} "
    "AND time BETWEEN fromUnixTimestamp64Milli({lo:Int64}) AND fromUnixTimestamp64Milli({hi:Int64}) "
    "AND seq BETWEEN {slo:UInt64} AND {shi:UInt64}"
)


def identity(r: NodeReport) -> Identity:
    return (r.cluster, r.node, r.boot_id, r.seq)


def unique_in_batch(reports: Sequence[NodeReport]) -> tuple[list[NodeReport], int]:
    """The first copy of each message in arrival order, and how many copies were dropped."""
    seen: set[Identity] = set()
    out = []
    for r in reports:
        key = identity(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, len(reports) - len(out)


def already_stored(store: Store, reports: Sequence[NodeReport]) -> set[Identity]:
    """Identities among `reports` that `gpu_samples` already holds."""
    with_rows = [r for r in reports if r.gpus]
    if not with_rows:
        return set()
    wanted = {identity(r) for r in with_rows}
    rows = store.rows(
        _STORED,
        {
            "clusters": sorted({r.cluster for r in with_rows}),
            "nodes": sorted({r.node for r in with_rows}),
            "lo": min(r.time_ms for r in with_rows),
            "hi": max(r.time_ms for r in with_rows),
            "slo": min(r.seq for r in with_rows),
            "shi": max(r.seq for r in with_rows),
        },
    )
    return {(c, n, b, int(s)) for c, n, b, s in rows} & wanted


def insert_token(reports: Sequence[NodeReport], planned_ms: int) -> str:
    """A token naming this set of messages as planned at `planned_ms` (order does not matter).

    The plan's time keeps a later, deliberate re-ingest of the same messages (say after a delete)
    from being taken for a repeat of this insert while it is still in ClickHouse's dedup window.
    """
    ids = sorted(identity(r) for r in reports)
    return hashlib.sha256(msgspec.msgpack.encode([planned_ms, ids])).hexdigest()[:32]


def insert_settings(token: str, target: str) -> dict[str, object]:
    """Settings for one insert of a planned batch (`target` tells its inserts apart): repeating the insert
    is dropped by every table that has the block and completes every view target that misses it."""
    return {"insert_deduplication_token": f"gpufleet-{token}-{target}",
            "deduplicate_blocks_in_dependent_materialized_views": 1}
