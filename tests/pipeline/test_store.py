"""`Store`: the database bound once and checked, tables qualified in one place, `{db:Identifier}` bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpufleet.errors import StoreError
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from tests.builders import report

COUNT_SAMPLES = "SELECT count() FROM {db:Identifier}.gpu_samples"


class RecordingClient:
    """Stands for a clickhouse_connect client: records each call, returns nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))
        return record


@pytest.mark.parametrize("name", ["", "1st", "gpu-fleet", "a.b", "db; DROP TABLE x", "a`b", "x" * 64])
def test_a_bad_database_name_is_refused_before_any_statement(name: str) -> None:
    client = RecordingClient()
    with pytest.raises(StoreError, match="is not allowed") as err:
        Store(client, name)  # type: ignore[arg-type]
    assert err.value.exit_code == 2
    assert client.calls == []


def test_open_refuses_a_bad_name_and_creates_nothing(tmp_path: Path) -> None:
    where = tmp_path / "store"
    with pytest.raises(StoreError, match="is not allowed"):
        Store.open(Target(f"chdb://{where}", "no-dashes"))
    assert not where.exists()


def test_tables_are_qualified_with_the_database() -> None:
    assert Store(RecordingClient(), "gpufleet").table("gpu_samples") == "gpufleet.gpu_samples"  # type: ignore[arg-type]


def test_the_database_is_bound_where_a_statement_names_it() -> None:
    store = Store(RecordingClient(), "fleet_a")  # type: ignore[arg-type]
    assert store.bind(COUNT_SAMPLES) == {"db": "fleet_a"}
    assert store.bind(COUNT_SAMPLES + " WHERE seq > {s:UInt64}", {"s": 3}) == {"s": 3, "db": "fleet_a"}
    # Not named: nothing added (a dict without placeholders would make clickhouse_connect %-format the text).
    assert store.bind("SELECT name FROM system.tables WHERE name LIKE 'gpu_%'") is None
    assert store.bind("SELECT {x:UInt8}", {"x": 1}) == {"x": 1}


def test_each_call_reaches_the_client_bound_and_qualified() -> None:
    client = RecordingClient()
    store = Store(client, "fleet_a")  # type: ignore[arg-type]
    store.query(COUNT_SAMPLES, settings={"max_threads": 1})
    store.command("OPTIMIZE TABLE {db:Identifier}.gpu_samples FINAL")
    store.insert("dead_letters", [[1, "t"]], ("offset", "topic"), settings={"insert_deduplication_token": "k"})
    store.insert("alerts", [[1], [2]], ["revision"], column_oriented=True)
    assert client.calls == [
        ("query", (COUNT_SAMPLES,), {"parameters": {"db": "fleet_a"}, "settings": {"max_threads": 1}}),
        ("command", ("OPTIMIZE TABLE {db:Identifier}.gpu_samples FINAL",),
         {"parameters": {"db": "fleet_a"}, "settings": None}),
        ("insert", ("fleet_a.dead_letters", [[1, "t"]]),
         {"column_names": ["offset", "topic"], "column_oriented": False,
          "settings": {"insert_deduplication_token": "k"}}),
        ("insert", ("fleet_a.alerts", [[1], [2]]),
         {"column_names": ["revision"], "column_oriented": True, "settings": None}),
    ]


def test_two_stores_on_one_client_read_and_write_their_own_database(ch_client, ch_target) -> None:
    from gpufleet.pipeline.ingest.rows import insert_reports
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

    other = Store(ch_client, f"{ch_target.database}_b")
    migrate(ch_client, SchemaOptions(database=other.database))
    try:
        mine = Store(ch_client, ch_target.database)
        rows = insert_reports(mine, [report(seq=s, n_gpus=2) for s in range(3)], ingest_ms=1)
        assert rows == 6
        assert mine.rows(COUNT_SAMPLES) == [(6,)]
        assert other.rows(COUNT_SAMPLES) == [(0,)]
        insert_reports(other, [report(seq=9, n_gpus=1)], ingest_ms=1)
        assert (mine.rows(COUNT_SAMPLES), other.rows(COUNT_SAMPLES)) == ([(6,)], [(1,)])
    finally:
        ch_client.command(f"DROP DATABASE IF EXISTS {other.database} SYNC")


def _config(tmp_path: Path, dsn: str, database: str, cluster: str | None) -> str:
    path = tmp_path / "gpufleet.yaml"
    path.write_text(f"clickhouse: {{dsn: '{dsn}', database: {database}"
                    + (f", cluster: {cluster}" if cluster else "") + "}\n")
    return str(path)


def test_a_store_on_a_cluster_sends_the_global_product_mode_with_every_query(tmp_path, ch_target) -> None:
    # on a cluster, gpu_claim_outranked's subquery over Distributed tables is refused ('deny', the default)
    # or computed per shard ('local': a GPU reported on two shards billed twice): the store sends 'global'
    from gpufleet.pipeline.commands.common import load_config

    _, target = load_config(_config(tmp_path, ch_target.dsn, ch_target.database, "gf_2x2"), None, None)
    assert target.cluster == "gf_2x2"
    store = Store.open(target)
    assert store.client.get_client_setting("distributed_product_mode") == "global"
    assert store.rows("SELECT getSetting('distributed_product_mode')") == [("global",)]
    assert store.rows(COUNT_SAMPLES) == [(0,)]
    # a server target on a cluster gets the same settings (connect passes them to either client)
    assert Target("http://gpufleet@ch-1:8123", cluster="gf_2x2").session_settings == {
        "distributed_product_mode": "global"}


def test_a_single_server_store_sends_no_session_settings(tmp_path, ch_target) -> None:
    from gpufleet.pipeline.commands.common import load_config

    _, target = load_config(_config(tmp_path, ch_target.dsn, ch_target.database, None), None, None)
    assert target.cluster is None
    assert target.session_settings == {}
    assert Target("http://gpufleet@ch-1:8123").session_settings == {}
    store = Store.open(target)
    assert store.client.get_client_setting("distributed_product_mode") is None
    assert store.rows("SELECT getSetting('distributed_product_mode')") == [("deny",)]  # the engine's default
