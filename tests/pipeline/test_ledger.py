"""The batch ledger: the first entry at an offset wins, a new owner repeats the unfinished batch exactly, and
whichever copy of a batch lands second (the first owner's insert, still running when the partition moved,
or the new owner's repeat) adds nothing, even when the first copy landed only in part.

The first owner is an ingester whose connection to ClickHouse is cut after it sent its GPU-row insert: that
insert is held here (as a server holds a request it received) and carried out later, before or after the
next owner's repeat. Every expected count is computed by hand from the messages built here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from gpufleet import wire
from gpufleet.config import Config
from gpufleet.pipeline.ingest import dedup
from gpufleet.pipeline.ingest.ingester import Ingester
from gpufleet.pipeline.ingest.ledger import Entry, Ledger, Resume, batch_token, resume
from gpufleet.pipeline.store import Store
from tests.builders import T0_MS, gpu, report
from tests.pipeline.test_ingest import _cfg, _ingester, _produce, connect_target

NODES, SEQS, PORTS = 4, 6, 2
FULL = "min_free_disk_bytes_to_perform_insert = 1000000000000000000"


# --- the rules, pure ---------------------------------------------------------------------------

def _entry(first: int, last: int, planned_ms: int = 1) -> Entry:
    return Entry("t", 0, first, last, planned_ms, "db.gpu_samples_json_x")


def test_a_new_owner_repeats_only_the_newest_entry_it_has_not_committed_past() -> None:
    assert resume(None, 100) == Resume()
    assert resume(_entry(50, 99), 100) == Resume()  # committed past it: stored
    assert resume(_entry(100, 180), 100) == Resume(None, _entry(100, 180))  # entered, not committed
    # Earlier batches were stored (each entry follows a stored batch) but their commits failed: skip them.
    assert resume(_entry(140, 180), 100) == Resume(140, _entry(140, 180))
    assert resume(_entry(90, 180), 100) == Resume()  # not a batch boundary: nothing to repeat


def test_the_token_names_the_range_and_the_planned_time() -> None:
    token = batch_token("t", 3, 100, 200, 5)
    assert token == batch_token("t", 3, 100, 200, 5)
    assert _entry(100, 200, 5).token == batch_token("t", 0, 100, 200, 5)
    assert len({token, batch_token("t", 3, 100, 201, 5), batch_token("t", 3, 100, 200, 6),
                batch_token("t", 4, 100, 200, 5), batch_token("u", 3, 100, 200, 5)}) == 5


# --- the table ---------------------------------------------------------------------------------

def _ledger(ch_store: Store) -> Ledger:
    return Ledger(ch_store, "g", dedup.dedup_settings(ch_store.client.server_settings))


def test_the_first_entry_at_an_offset_wins(ch_store: Store) -> None:
    ledger = _ledger(ch_store)
    a, b = _entry(100, 200, 1), _entry(100, 250, 2)
    assert ledger.enter(a) == a
    assert ledger.enter(b) == a  # the same entry token: ClickHouse dropped the second
    assert ledger.newest("t", 0) == a
    c = _entry(201, 260, 3)
    assert ledger.enter(c) == c
    assert ledger.newest("t", 0) == c
    assert ledger.newest("t", 1) is None
    rows = ch_store.rows("SELECT count() FROM {db:Identifier}.ingest_batches")
    assert rows == [(2,)]


def test_past_the_dedup_window_the_earlier_entry_still_wins(ch_store: Store) -> None:
    ledger = _ledger(ch_store)
    late = _entry(100, 250, 2)
    ledger.enter(_entry(100, 200, 1))
    # A entry whose twin ClickHouse no longer remembers: stored beside it, and loses on recorded_at.
    ch_store.insert("ingest_batches", [["g", "t", 0, 100, "batch", 0, 250, 2, late.token, late.staging_table, [], "x"]],
                    ["group_id", "topic", "partition", "first_offset", "kind", "block", "last_offset", "planned_ms",
                     "token", "staging_table", "column_offsets", "planner"],
                    settings={"insert_deduplication_token": "another"})
    assert ledger.enter(late) == _entry(100, 200, 1)
    assert ledger.newest("t", 0) == _entry(100, 200, 1)


def test_a_json_block_that_went_as_columns_is_recorded_for_its_batch_only(ch_store: Store) -> None:
    ledger = _ledger(ch_store)
    a = _entry(100, 200, 1)
    ledger.enter(a)
    ledger.mark_json_failed(a, 1)
    ledger.mark_json_failed(a, 1)
    assert ledger.json_failed(a) == {1}
    assert ledger.json_failed(_entry(100, 200, 2)) == set()


# --- the next owner repeats the batch; the first owner's insert lands before or after --------------

class HeldInsert:
    """The real chDB client, except that the first JSON insert of GPU rows is taken and held (the server
    got it) while the client is told the connection broke; from then on this client reaches nothing
    (the first owner is cut off, or dead). `land()` carries the held insert out, as the server would."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.held: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.cut = threading.Event()

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        if self.held is None:
            self.held = (args, {**kwargs, "insert_block": bytes(kwargs["insert_block"])})
            self.cut.set()
        raise ConnectionError("connection to ClickHouse lost (injected)")

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self.cut.is_set():
            raise ConnectionError("connection to ClickHouse lost (injected)")
        return self.real.insert(*args, **kwargs)

    def land(self) -> None:
        assert self.held is not None
        args, kwargs = self.held
        self.real.raw_insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _messages() -> list[wire.NodeReport]:
    """NODES nodes x SEQS seconds, 2 GPUs each: GPU 0 of tenant acme, GPU 1 unallocated; each message also
    lists its node's PORTS InfiniBand ports (`network_ports`, written before the GPU rows)."""
    out = []
    for s in range(SEQS):
        for n in range(NODES):
            r = report(node=f"ld{n}", seq=s, time_ms=T0_MS + (s + 1) * 1000,
                       gpus=[gpu(0, f"ld{n}", tenant="acme"), gpu(1, f"ld{n}")])
            r.network = [wire.NetworkPort(device=f"mlx5_{p}", port=1, link_layer="InfiniBand", state=4, phys_state=5)
                         for p in range(PORTS)]
            out.append(r)
    return out


def _one_partition(broker: Any, ch_target: Any, topic: str) -> Config:
    from kafka.admin import KafkaAdminClient, NewTopic

    cfg = _cfg(broker, ch_target, topic, batch_ms=300)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1), NewTopic(cfg.kafka.dlq_topic, 1, 1)])
    admin.close()
    _produce(broker, topic, [(r.node.encode(), wire.encode(r)) for r in _messages()])
    return cfg


def _first_owner(cfg: Config) -> tuple[Ingester, HeldInsert]:
    """An ingester that enters the batch, writes agent_reports, sends its GPU rows and is cut off then."""
    client = HeldInsert(connect_target(cfg))
    ing = _ingester(cfg, client=client)
    stop = threading.Event()
    thread = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    thread.start()
    assert client.cut.wait(60), "the first owner never sent its GPU rows"
    stop.set()
    thread.join(60)
    ing.consumer.close()
    return ing, client


def _next_owner(cfg: Config) -> Ingester:
    ing = _ingester(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while ing.stats.messages < NODES * SEQS and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(60)
    ing.consumer.close()
    assert ing.stats.messages == NODES * SEQS, ing.stats
    return ing


def _assert_exact(ch_client: Any, db: str) -> None:
    """Every sample once in every table, billed as counted by hand: acme's GPU 0, 1 s per message."""
    one = lambda sql: ch_client.query(sql).result_rows  # noqa: E731
    n = NODES * SEQS
    assert one(f"SELECT count(), uniqExact(node, seq, gpu_index) FROM {db}.gpu_samples") == [(2 * n, 2 * n)]
    assert one(f"SELECT count() FROM {db}.agent_reports") == [(n,)]  # not even a second part before merges
    assert one(f"SELECT count(), uniqExact(node, seq, device) FROM {db}.network_ports") == [(PORTS * n, PORTS * n)]
    assert one(f"SELECT sum(samples), sum(reported_ms) FROM {db}.gpu_usage_1m") == [(2 * n, 2000 * n)]
    assert one(f"SELECT sum(samples), sum(reported_ms) FROM {db}.gpu_usage_1h") == [(2 * n, 2000 * n)]
    assert one(f"SELECT tenant, sum(billable_gpu_seconds) FROM {db}.usage_hourly GROUP BY tenant") == [
        ("acme", float(n))]
    assert one(f"SELECT count() FROM {db}.ingest_batches WHERE kind = 'batch'") == [(1,)]


@pytest.mark.parametrize("when", ["after", "before", "partly-before"])
def test_the_first_owners_insert_and_the_next_owners_repeat_leave_one_copy(broker, ch_target, ch_client, topic,
                                                                            when: str) -> None:
    """after: the held insert lands once the next owner repeated the batch; before: it lands first, in full;
    partly-before: it lands first with the hour rollup refusing (raw rows and minute rollup in, hour not)."""
    db = ch_target.database
    cfg = _one_partition(broker, ch_target, topic)
    first, held = _first_owner(cfg)
    assert first.stats.messages == 0  # nothing committed: the batch is entered, agent_reports in, GPU rows held
    if when != "after":
        if when == "partly-before":
            ch_client.command(f"ALTER TABLE {db}.gpu_usage_1h MODIFY SETTING {FULL}")
            with pytest.raises(Exception, match="Could not perform insert"):
                held.land()
            ch_client.command(f"ALTER TABLE {db}.gpu_usage_1h RESET SETTING min_free_disk_bytes_to_perform_insert")
            assert ch_client.query(f"SELECT count() FROM {db}.gpu_usage_1h").result_rows == [(0,)]
        else:
            held.land()
    nxt = _next_owner(cfg)
    assert (nxt.stats.replays, nxt.stats.batches) == (1, 1)
    if when == "after":
        held.land()  # the server finishes the first owner's insert after the partition moved
    _assert_exact(ch_client, db)


# --- the insert paths a repeat follows ------------------------------------------------------------

class ColumnsCut:
    """The real chDB client, except that the first insert of GPU rows as columns never reaches ClickHouse and
    cuts the client off from then on (the first owner dies right after recording its switch to columns)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.cut = threading.Event()

    def insert(self, table: str, *args: Any, **kwargs: Any) -> Any:
        if self.cut.is_set() or table.endswith(".gpu_samples"):
            self.cut.set()
            raise ConnectionError("connection to ClickHouse lost (injected)")
        return self.real.insert(table, *args, **kwargs)

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        if self.cut.is_set():
            raise ConnectionError("connection to ClickHouse lost (injected)")
        return self.real.raw_insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_block_that_went_as_columns_is_repeated_as_columns(broker, ch_target, ch_client, topic) -> None:
    """ClickHouse refuses a block's JSON (a duplicated key: msgspec keeps the last one), so the first owner
    records in the ledger that the block goes as columns, then dies before that insert. The next owner
    repeats the block as columns straight away, under the same token: it never sends the JSON."""
    from kafka.admin import KafkaAdminClient, NewTopic

    db = ch_target.database
    cfg = _cfg(broker, ch_target, topic, batch_ms=300)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1), NewTopic(cfg.kafka.dlq_topic, 1, 1)])
    admin.close()
    good = report(node="jc1", seq=0, time_ms=T0_MS + 1000, gpus=[gpu(0, "jc1", tenant="acme")])
    dup = wire.encode(report(node="jc2", seq=0, time_ms=T0_MS + 1000, gpus=[gpu(0, "jc2", tenant="acme")]))
    _produce(broker, topic, [(b"jc1", wire.encode(good)), (b"jc2", dup.replace(b'"seq":0', b'"seq":0,"seq":3'))])
    client = ColumnsCut(connect_target(cfg))
    first = _ingester(cfg, client=client)
    stop = threading.Event()
    thread = threading.Thread(target=first.run, args=(stop,), daemon=True)
    thread.start()
    assert client.cut.wait(60), "the first owner never switched the block to columns"
    stop.set()
    thread.join(60)
    first.consumer.close()
    assert ch_client.query(f"SELECT kind, block FROM {db}.ingest_batches ORDER BY kind").result_rows == [
        ("batch", 0), ("json_failed", 0)]
    nxt = _ingester(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=nxt.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while nxt.stats.messages < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(60)
    nxt.consumer.close()
    assert (nxt.stats.messages, nxt.stats.replays, nxt.stats.insert_errors) == (2, 1, 0)
    assert ch_client.query(f"SELECT node, seq, count() FROM {db}.gpu_samples GROUP BY node, seq ORDER BY node"
                           ).result_rows == [("jc1", 0, 1), ("jc2", 3, 1)]
    assert ch_client.query(f"SELECT sum(samples) FROM {db}.gpu_usage_1h").result_rows == [(2,)]


def test_a_repeat_goes_through_the_staging_table_the_batch_was_planned_with(ch_store: Store) -> None:
    """Another version's staging table is used when it takes this version's input exactly; otherwise the batch
    is refused loudly rather than repeated through another table (which ClickHouse would not deduplicate)."""
    from gpufleet.pipeline.ingest import staging
    from gpufleet.pipeline.ingest.writer import ReplayRefused

    ours = staging.ensure(ch_store)
    db = ch_store.database
    ch_store.command(f"CREATE TABLE {db}.gpu_samples_json_older AS {ours.table}")
    ch_store.command(f"CREATE TABLE {db}.gpu_samples_json_other (cluster String) ENGINE = Null")
    assert staging.adopt(ch_store, ours.table) == ours
    older = staging.adopt(ch_store, f"{db}.gpu_samples_json_older")
    assert older is not None
    assert older.table == f"{db}.gpu_samples_json_older"
    assert staging.adopt(ch_store, f"{db}.gpu_samples_json_other") is None
    assert staging.adopt(ch_store, f"{db}.gpu_samples_json_gone") is None

    from gpufleet.config import parse
    from gpufleet.pipeline.ingest.writer import BatchWriter

    writer = BatchWriter(parse({"clickhouse": {"database": db}}), ch_store, dlq=None)  # type: ignore[arg-type]
    entry = Entry("t", 0, 1, 2, 3, f"{db}.gpu_samples_json_other", planner="0.0.9")
    with pytest.raises(ReplayRefused, match=r"planned by gpufleet 0\.0\.9 through the staging table .*json_other"):
        writer._staging_of(entry)
    assert writer._staging_of(Entry("t", 0, 1, 2, 3, f"{db}.gpu_samples_json_older")).table.endswith("json_older")
