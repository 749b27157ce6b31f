"""Exactly-once effect on top of at-least-once delivery: drop messages already stored, repeat inserts safely.

Design notes: docs/design-notes.md#pipeline-ingest-dedup-py.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from gpufleet.wire import NodeReport

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

Identity = tuple[str, str, str, int]
_STORED = (
    "SELECT DISTINCT cluster, node, boot_id, seq FROM {db:Identifier}.gpu_samples "
    "WHERE cluster IN {clusters:Array(String)} AND node IN {nodes:Array(String)} "
    "AND time BETWEEN fromUnixTimestamp64Milli({lo:Int64}) AND fromUnixTimestamp64Milli({hi:Int64}) "
    "AND seq BETWEEN {slo:UInt64} AND {shi:UInt64} "
    "AND ingest_time != fromUnixTimestamp64Milli({own:Int64})"
)
INSERT_DEADLINE_S: Final = 60
"""The server cancels an insert of a batch it has not finished within this (`max_execution_time`), so
a copy sent by an ingester that has since died lands within this time or never (docs/scaling.md has
how the dedup window covers it)."""


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


def already_stored(store: Store, reports: Sequence[NodeReport], own_ms: int) -> set[Identity]:
    """Identities among `reports` that `gpu_samples` holds from another batch than the one planned at `own_ms`."""
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
            "own": own_ms,
        },
    )
    return {(c, n, b, int(s)) for c, n, b, s in rows} & wanted


def dedup_settings(known: Collection[str], *, sharded: bool = False) -> dict[str, object]:
    """Deduplication on for an insert, in its table and every view target below it, whatever the server's
    profile says; `known` are the setting names the server has (`deduplicate_insert` is new in 26.x and
    supersedes `insert_deduplicate` there). `sharded` (a cluster: inserts go through `Distributed` tables):
    the insert returns only once each shard stored its block under the token (docs/scaling.md)."""
    settings: dict[str, object] = {"insert_deduplicate": 1, "deduplicate_blocks_in_dependent_materialized_views": 1}
    if "deduplicate_insert" in known:
        settings["deduplicate_insert"] = "enable"
    if sharded:
        settings["distributed_foreground_insert"] = 1
    return settings


def insert_settings(token: str, target: str, dedup: Mapping[str, object]) -> dict[str, object]:
    """Settings for one insert of a batch (`target` tells its inserts apart; `dedup` from `dedup_settings`):
    repeating the insert is dropped by every table that has the block and completes every view target
    that misses it; the server gives up on it after `INSERT_DEADLINE_S`."""
    return {**dedup, "insert_deduplication_token": f"gpufleet-{token}-{target}",
            "max_execution_time": INSERT_DEADLINE_S}
