"""The cluster variant of the migrations (2 shards x 2 replicas): every statement parses in chDB's engine,
queries' tables are Distributed by node, views sit on local tables, and the single-server DDL is unchanged."""

from __future__ import annotations

import hashlib
import re

import pytest

from gpufleet.pipeline.store import sharding
from gpufleet.pipeline.store.migrate import SchemaOptions, available, schema_table, statements

CLUSTER = SchemaOptions(database="gpufleet", cluster="gf_2x2")
NODE = "kafkaMurmurHash(node)"


def cluster_ddl() -> list[str]:
    return [schema_table(CLUSTER)] + [s for m in available() for s in statements(m, CLUSTER)]


def test_every_cluster_statement_parses_in_the_clickhouse_engine(ch_client) -> None:
    ddl = cluster_ddl()
    for stmt in ddl:
        ast = "\n".join(str(r[0]) for r in ch_client.query(f"EXPLAIN AST {stmt}").result_rows)
        assert ast.startswith(("CreateQuery", "AlterQuery", "InsertQuery", "DropQuery")), stmt[:200]
    # 0050 adds 11: two column ALTERs (each + its Distributed), network_ports (+ Distributed), a setting, a
    # projection, gpu_inventory (+ Distributed) and its view
    # 0090 adds 7: usage_hour_inputs (+ Distributed), its view and backfill, usage_hourly_at, and the two
    # global tables of stored usage
    # 0100 adds 11: job_usage_1h's nodes column (+ its Distributed), its view and backfill, job_throughput_1m
    # and _1h (each + Distributed), their views and backfill
    # 0102 adds 6: two column ALTERs of the health rollups (each + its Distributed) and their two views
    # 0108 adds 4: stall_candidates_1h (+ Distributed), its view and its backfill
    # 0110 adds 2: the health rollups' two views, replaced
    assert len(ddl) == 148


def test_tables_queries_read_are_distributed_by_node() -> None:
    dist = {}
    for stmt in cluster_ddl():
        if m := re.match(r"CREATE TABLE IF NOT EXISTS gpufleet\.(\w+) ON CLUSTER 'gf_2x2' AS gpufleet\.(\w+) "
                         r"ENGINE = Distributed\('gf_2x2', 'gpufleet', '(\w+)'(?:, (.+))?\)$", stmt):
            assert m.group(2) == m.group(3) == m.group(1) + "_local"
            dist[m.group(1)] = m.group(4)
    assert dist == {
        "gpu_samples": NODE, "agent_reports": NODE, "gpu_usage_1m": NODE, "gpu_usage_1h": NODE,
        "gpu_latest": NODE, "gpu_claim_homes": NODE, "gpu_health_events": NODE, "gpu_xid_events": NODE,
        "gpu_health_1m": NODE, "gpu_health_1h": NODE, "node_latest": NODE, "network_ports": NODE,
        "gpu_inventory": NODE, "stall_candidates_1h": NODE,
        "fleet_usage_1m": None, "fleet_usage_1h": None, "job_usage_1h": None, "usage_hour_inputs": None,
        "job_throughput_1m": None, "job_throughput_1h": None,
    }


def test_local_tables_are_replicated_per_shard_and_global_tables_span_every_server() -> None:
    engines = {}
    for stmt in cluster_ddl():
        if m := re.match(r"CREATE TABLE IF NOT EXISTS gpufleet\.(\w+) ON CLUSTER 'gf_2x2'\s*\("
                         r".*?ENGINE = (\S+?)(\(.*?\))?\s", stmt, re.S):
            engines[m.group(1)] = (m.group(2), m.group(3))
    glob = "('/clickhouse/tables/{uuid}/global', '{shard}-{replica}'"
    assert {n for n, (_, args) in engines.items() if args and args.startswith(glob)} == {
        "schema_migrations", "billing_policy", "billing_statements", "billing_adjustments", "billing_periods",
        "alerts", "ingest_batches", "dead_letters", "usage_hourly_stored", "usage_hourly_marks"}
    assert engines["alerts"] == ("ReplicatedReplacingMergeTree", glob + ", revision)")
    local = {n for n in engines if n.endswith("_local")}
    assert local == {f"{t}_local" for t in sharding.SHARDED}
    # default Keeper path, /clickhouse/tables/{uuid}/{shard}: one replica set per shard
    assert {n: a for n, (e, a) in engines.items() if n in local and a not in (None, "(time)")} == {}
    assert all(engines[n][0].startswith("Replicated") for n in engines)


def test_every_materialized_view_reads_and_writes_local_tables() -> None:
    views = {}
    for stmt in cluster_ddl():
        if m := re.match(r"CREATE (?:OR REPLACE )?MATERIALIZED VIEW (?:IF NOT EXISTS )?gpufleet\.(\w+) "
                         r"ON CLUSTER 'gf_2x2' TO gpufleet\.(\w+) AS", stmt):
            views[m.group(1)] = (m.group(2), sorted(set(re.findall(r"(?:FROM|JOIN) gpufleet\.(\w+)", stmt))))
    assert views == {
        "gpu_usage_1m_mv": ("gpu_usage_1m_local", ["gpu_samples_local"]),
        "gpu_usage_1h_mv": ("gpu_usage_1h_local", ["gpu_usage_1m_local"]),
        "gpu_latest_mv": ("gpu_latest_local", ["gpu_samples_local"]),
        "gpu_claim_homes_mv": ("gpu_claim_homes_local", ["gpu_samples_local"]),
        "fleet_usage_1m_mv": ("fleet_usage_1m_local", ["gpu_usage_1m_local"]),
        "fleet_usage_1h_mv": ("fleet_usage_1h_local", ["fleet_usage_1m_local"]),
        "job_usage_1h_mv": ("job_usage_1h_local", ["gpu_usage_1m_local"]),
        "node_latest_mv": ("node_latest_local", ["agent_reports_local"]),
        "stall_candidates_1h_mv": ("stall_candidates_1h_local", ["gpu_samples_local"]),
        "gpu_health_events_mv": ("gpu_health_events_local", ["gpu_samples_local"]),
        "gpu_xid_events_mv": ("gpu_xid_events_local", ["gpu_samples_local"]),
        "gpu_health_1m_mv": ("gpu_health_1m_local", ["gpu_samples_local"]),
        "gpu_health_1h_mv": ("gpu_health_1h_local", ["gpu_health_1m_local"]),
        "gpu_inventory_mv": ("gpu_inventory_local", ["gpu_samples_local"]),
        "usage_hour_inputs_mv": ("usage_hour_inputs_local", ["gpu_usage_1h_local"]),
        "job_throughput_1m_mv": ("job_throughput_1m_local", ["gpu_samples_local"]),
        "job_throughput_1h_mv": ("job_throughput_1h_local", ["job_throughput_1m_local"]),
    }


def test_plain_views_read_the_distributed_tables_unchanged() -> None:
    plain = [s for s in cluster_ddl() if re.match(r"CREATE (OR REPLACE )?VIEW", s)]
    assert len(plain) == 5  # usage_hourly (0002, 0032), gpu_claim_outranked, ..., usage_hourly_at (0090)
    assert not any("_local" in s for s in plain)


def test_column_changes_reach_the_distributed_table() -> None:
    ddl = cluster_ddl()
    i = ddl.index(next(s for s in ddl if s.startswith("ALTER TABLE gpufleet.gpu_samples_local ON CLUSTER 'gf_2x2'\n"
                                                       "    ADD COLUMN IF NOT EXISTS tokens_measured")))
    assert ddl[i + 1] == ("CREATE OR REPLACE TABLE gpufleet.gpu_samples ON CLUSTER 'gf_2x2' "
                          "AS gpufleet.gpu_samples_local "
                          "ENGINE = Distributed('gf_2x2', 'gpufleet', 'gpu_samples_local', kafkaMurmurHash(node))")
    # a setting or a projection changes the local table only
    assert ("ALTER TABLE gpufleet.gpu_usage_1m_local ON CLUSTER 'gf_2x2' "
            "MODIFY SETTING replicated_deduplication_window = 10000") in ddl
    assert not any(s.startswith("ALTER TABLE gpufleet.gpu_usage_1m ") for s in ddl)


def test_the_sharding_key_is_the_kafka_partitioners_hash_of_the_node(ch_client) -> None:
    # kafka-python's (and Java's) default partitioner: murmur2 of the key, positive; hand-checked value
    from kafka.partitioner.default import murmur2
    assert murmur2(b"node-1") & 0x7FFFFFFF == 174763546
    assert ch_client.query("SELECT kafkaMurmurHash('node-1')").result_rows[0][0] == 174763546


def test_the_single_server_ddl_is_byte_for_byte_unchanged() -> None:
    single = SchemaOptions()
    text = "\n;\n".join(s for m in available() if m.version <= 80 for s in statements(m, single))
    # computed before the cluster layout, then again after 0040/0041 took the 10,000-block dedup window
    # (a change of those files, made with the sharding code absent from the single-server path), and again
    # after 0050 (node signals) joined: without 0050 the text still hashes to 6e1f17f5...c452, main's digest
    digest = "d09bbda05c260169bfeeed2740db9a6a55123e4c50d3dd5ae3d7f84bbba84875"
    assert hashlib.sha256(text.encode()).hexdigest() == digest
    assert schema_table(single) == (
        "CREATE TABLE IF NOT EXISTS gpufleet.schema_migrations  (version UInt32, name String, checksum String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version")


def test_an_unplaced_table_is_an_error_naming_the_fix() -> None:
    with pytest.raises(sharding.UnclassifiedTable, match="add it to SHARDED or GLOBAL"):
        sharding.cluster_statements("CREATE TABLE IF NOT EXISTS gpufleet.new_table ON CLUSTER 'gf' (a UInt8) "
                                    "ENGINE = ReplicatedMergeTree ORDER BY a", "gpufleet", "gf")


def test_a_sharded_ingester_inserts_in_the_foreground() -> None:
    from gpufleet.pipeline.ingest import dedup
    assert dedup.dedup_settings(set(), sharded=True) == {
        "insert_deduplicate": 1, "deduplicate_blocks_in_dependent_materialized_views": 1,
        "distributed_foreground_insert": 1}
    assert "distributed_foreground_insert" not in dedup.dedup_settings(set())
