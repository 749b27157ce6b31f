"""The cluster variant of the migrations' statements: local Replicated tables, `Distributed` tables over them.

A sharded table `T` becomes `T_local` (one replica set per shard) and `T` a `Distributed` table over it,
sharded by `kafkaMurmurHash(node)` (Kafka's own partitioner hash of the message key), so every query
reads `T` unchanged; materialized views read and write the local tables. Global tables are one replica
set spanning every server. docs/scaling.md ("How ClickHouse scales out") says why each table is where it is.
"""

from __future__ import annotations

import re
from typing import Final

from gpufleet.errors import GpufleetError

SHARDING_KEY: Final = "kafkaMurmurHash(node)"
"""Kafka's default partitioner hash of the message key (the node name), as ClickHouse computes it: with
the topic's partition count a multiple of the shards' total weight, partition p's nodes all land on shard
p mod shards, so one batch (one partition's messages) is one block on one shard."""

SHARDED: Final[dict[str, str | None]] = {
    # raw rows and everything derived from them per node: keyed by node
    "gpu_samples": SHARDING_KEY,
    "agent_reports": SHARDING_KEY,
    "gpu_usage_1m": SHARDING_KEY,
    "gpu_usage_1h": SHARDING_KEY,
    "gpu_latest": SHARDING_KEY,
    "gpu_claim_homes": SHARDING_KEY,
    "gpu_health_events": SHARDING_KEY,
    "gpu_xid_events": SHARDING_KEY,
    "gpu_health_1m": SHARDING_KEY,
    "gpu_health_1h": SHARDING_KEY,
    "node_latest": SHARDING_KEY,
    "network_ports": SHARDING_KEY,  # a node's InfiniBand/RoCE ports, one row per port per message (0050)
    "gpu_inventory": SHARDING_KEY,  # each GPU's newest inventory read, from its node's samples (0050)
    "stall_candidates_1h": SHARDING_KEY,  # per GPU, job and hour: which GPUs may hold a stall (0108)
    # rollups with no node column: each shard aggregates its own nodes' rows, reads sum the shards;
    # only their views write them, so the Distributed table has no sharding key (it refuses inserts)
    "fleet_usage_1m": None,
    "fleet_usage_1h": None,
    "job_usage_1h": None,
    "job_throughput_1m": None,  # per job: reported tokens and samples (0100)
    "job_throughput_1h": None,
    "usage_hour_inputs": None,  # per hour: samples (sum), reporting span (min, max) over every shard (0090)
}
"""Tables split by node over the shards: table -> the sharding key of its `Distributed` table."""

GLOBAL: Final = frozenset({
    "schema_migrations", "billing_policy", "billing_statements", "billing_adjustments", "billing_periods",
    "alerts", "ingest_batches", "dead_letters",
    # billing's stored usage (0090): computed from the Distributed tables, rows per hour x tenant x model
    "usage_hourly_stored", "usage_hourly_marks",
})
"""Small tables every server holds whole: one replica set over all servers (no `{shard}` in its path)."""

LOCAL_SUFFIX: Final = "_local"
GLOBAL_PATH: Final = "'/clickhouse/tables/{uuid}/global', '{shard}-{replica}'"
"""Keeper path and replica name of a global table: one path for every shard, a replica name unique per server."""

_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (?P<db>\w+)\.(?P<name>\w+) ")
_CREATE_MV = re.compile(r"CREATE (OR REPLACE )?MATERIALIZED VIEW (IF NOT EXISTS )?(?P<db>\w+)\.(?P<name>\w+) ")
_CREATE_VIEW = re.compile(r"CREATE (OR REPLACE )?VIEW ")
_ALTER = re.compile(r"ALTER TABLE (?P<db>\w+)\.(?P<name>\w+) ")
_INSERT = re.compile(r"INSERT INTO (?P<db>\w+)\.(?P<name>\w+)\b")
_DROP_VIEW = re.compile(r"DROP VIEW ")
_ENGINE = re.compile(r"ENGINE = (?P<engine>Replicated\w*MergeTree)(?:\((?P<args>[^)]*)\))?")
_COLUMN_CHANGE = re.compile(r"\b(ADD|DROP|MODIFY|RENAME|COMMENT) COLUMN\b")


class UnclassifiedTable(GpufleetError, ValueError):
    """A migration creates a table the cluster layout does not place."""


def _local(db: str, text: str) -> str:
    """`text` with every sharded table `db.T` named as its local table `db.T_local`."""
    names = "|".join(sorted(SHARDED, key=len, reverse=True))
    return re.sub(rf"\b{re.escape(db)}\.({names})\b(?!{LOCAL_SUFFIX})", rf"{db}.\1{LOCAL_SUFFIX}", text)


def distributed(db: str, cluster: str, name: str, *, replace: bool = False) -> str:
    """The `Distributed` table `db.name` over `db.name_local`, with the table's sharding key."""
    key = SHARDED[name]
    args = f"'{cluster}', '{db}', '{name}{LOCAL_SUFFIX}'" + (f", {key}" if key else "")
    create = "CREATE OR REPLACE TABLE" if replace else "CREATE TABLE IF NOT EXISTS"
    return f"{create} {db}.{name} ON CLUSTER '{cluster}' AS {db}.{name}{LOCAL_SUFFIX} ENGINE = Distributed({args})"


def global_engine(stmt: str) -> str:
    """`stmt` with its Replicated engine on the one replica set that spans every server."""
    def one(m: re.Match[str]) -> str:
        args = (m.group("args") or "").strip()
        return f"ENGINE = {m.group('engine')}({GLOBAL_PATH}{', ' + args if args else ''})"
    out, n = _ENGINE.subn(one, stmt, count=1)
    if n != 1:
        raise UnclassifiedTable(f"a global table has no Replicated*MergeTree engine: {stmt[:120]}")
    return out


def cluster_statements(stmt: str, db: str, cluster: str) -> list[str]:
    """One migration statement (substituted for `cluster`) as the statements that do it on a sharded cluster."""
    if m := _CREATE_TABLE.match(stmt):
        name = m.group("name")
        if name in SHARDED:
            return [_local(db, stmt), distributed(db, cluster, name)]
        if name in GLOBAL:
            return [global_engine(stmt)]
        raise UnclassifiedTable(
            f"table {name} is neither sharded nor global: add it to SHARDED or GLOBAL in "
            "pipeline/store/sharding.py (and say why in docs/scaling.md)")
    if _CREATE_MV.match(stmt):
        # the view sits on the local source, writes the local target: each shard rolls up its own rows
        return [_local(db, stmt)]
    if m := _ALTER.match(stmt) or _INSERT.match(stmt):
        # an INSERT into a sharded table is a backfill from sharded tables: shard-local (docs/scaling.md)
        name = m.group("name")
        out = [_local(db, stmt)] if name in SHARDED else [stmt]
        if name in SHARDED and stmt.startswith("ALTER") and _COLUMN_CHANGE.search(stmt):
            out.append(distributed(db, cluster, name, replace=True))
        return out
    if not (_CREATE_VIEW.match(stmt) or _DROP_VIEW.match(stmt)):
        raise UnclassifiedTable(f"no cluster form for this migration statement: {stmt[:120]}")
    return [stmt]  # plain views read the Distributed tables, like every query
