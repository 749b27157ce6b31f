"""Partitions moving between ingesters while an insert is still running: every sample stored once, billed once.

The production layout in small: three `gpufleet ingest` processes in one consumer group on a 12-partition
topic, writing through one ClickHouse server (tests/reliability/store_server.py: ClickHouse's HTTP
interface in front of a chDB store; it says what it models), while 24 simulated nodes send. Again and
again the server holds the next GPU-row insert it receives (an insert made slow on purpose), the test
SIGKILLs the ingester that sent it, the group moves that ingester's partitions to the other two, and the
held insert is carried out later, as a server finishes an insert its client no longer waits for:

- after the next owner repeated the batch (the dead ingester's copy lands second),
- before it (the repeat lands second),
- in part before it (raw rows and the minute rollup in, the hour rollup refusing: the repeat completes it),
- while the server refuses every insert for a while (nothing of it lands; the others back off),
- and, last, with the server itself killed together with the ingester after the insert landed in part.

The killed ingester is then started again and the group rebalances once more. At the end every sample is
stored once (`count() == uniqExact(identity) == produced x 4`, in `agent_reports` without FINAL too), every
node's seqs are `0..n-1`, both rollups equal their raw answer (`pipeline/queries/integrity.py` finds
nothing), and billed seconds per tenant equal the hand count (tests/reliability/test_ingester_kill.py
builds the messages: acme bills GPU 0 always and GPU 1 unless it fails every 7th interval, beta GPU 2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, TopicPartition

from gpufleet.config import KafkaConfig
from gpufleet.embedded.broker import EmbeddedBroker
from gpufleet.kafka import ensure_topics
from gpufleet.pipeline.queries import integrity
from tests.reliability.harness import Child, StoreServer, gpufleet, wait_until, write_config
from tests.reliability.test_ingester_kill import Producer, expected_billed_s

PARTITIONS = 12
NODES = 24
INGESTERS = 3
DB = "moved"
FULL = "min_free_disk_bytes_to_perform_insert = 1000000000000000000"
WRITTEN = ("agent_reports", "gpu_samples", "gpu_usage_1m", "gpu_usage_1h", "gpu_latest", "gpu_claim_homes",
           "dead_letters", "ingest_batches")


class Group:
    """The ingester processes, by the user name each one's DSN carries (how the server names them)."""

    def __init__(self, broker: EmbeddedBroker, server: StoreServer, topic: str, tmp_path: Path) -> None:
        self.broker, self.server, self.topic, self.tmp_path = broker, server, topic, tmp_path
        self.children: dict[str, Child] = {}

    def start(self, user: str) -> None:
        # A flush writes one batch per owned partition: on this shared 2-core machine it can outlast the 4 s poll
        # interval of the single-ingester tests, and a member leaving for that makes tansu 0.6 rebalance forever.
        cfg = write_config(self.tmp_path / f"{user}.yaml", self.broker.bootstrap, self.topic, self.server.dsn(user),
                           DB, partitions=PARTITIONS, max_poll_interval_ms=20_000)
        self.children[user] = Child(gpufleet("ingest", "--config", str(cfg), "--no-migrate"),
                                    self.tmp_path / f"{user}.log").start()

    def kill(self, user: str) -> None:
        self.children[user].kill()

    def stop(self) -> None:
        for user, child in self.children.items():
            assert child.stop() == 0, f"{user}: {child.log()[-3000:]}"

    def logs(self) -> str:
        return "".join(c.log() for c in self.children.values())

    def committed(self) -> dict[int, int]:
        """Partition -> committed offset of the group."""
        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        try:
            group = f"g-{self.topic}"
            offsets = admin.list_group_offsets(
                {group: [TopicPartition(self.topic, p) for p in range(PARTITIONS)]})[group]
        finally:
            admin.close()
        return {tp.partition: max(o.offset, 0) for tp, o in offsets.items()}


def _setup(broker: EmbeddedBroker, tmp_path: Path, topic: str) -> tuple[StoreServer, Group, Producer]:
    server = StoreServer(tmp_path / "store", tmp_path / "server.log").start()
    migrate = Child(gpufleet("migrate", "--dsn", server.dsn("admin"), "--database", DB), tmp_path / "migrate.log")
    assert migrate.start().wait() == 0, migrate.log()
    ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap), [topic, f"{topic}-dlq"], partitions=PARTITIONS,
                  environ={})
    group = Group(broker, server, topic, tmp_path)
    producer = Producer(broker.bootstrap, topic, every_s=0.25, nodes=NODES).start()
    for i in range(INGESTERS):
        group.start(f"ing{i}")
    wait_until(lambda: sum(group.committed().values()) > 0, "the group storing its first batches")
    return server, group, producer


def _hold_next_gpu_insert(server: StoreServer) -> dict[str, Any]:
    server.hold("gpu_samples")  # the JSON staging table (gpu_samples_json_*) or gpu_samples itself
    found: list[dict[str, Any]] = []
    wait_until(lambda: bool(found.extend(server.held()) or found), "an ingester sending GPU rows", every_s=0.05)
    return found[0]


def _batch_of(server: StoreServer, held: dict[str, Any]) -> tuple[int, int]:
    """(partition, last offset) of the batch a held insert belongs to, from the ledger."""
    token = held["token"].split("-")[1]  # gpufleet-<batch token>-<insert>
    rows = server.store(DB).rows("SELECT partition, last_offset FROM {db:Identifier}.ingest_batches "
                                 "WHERE token = {t:String} AND kind = 'batch'", {"t": token})
    assert len(rows) == 1, (held, rows)
    return int(rows[0][0]), int(rows[0][1])


def _refuse(server: StoreServer, tables: tuple[str, ...]) -> None:
    for t in tables:
        server.store(DB).command(f"ALTER TABLE {{db:Identifier}}.{t} MODIFY SETTING {FULL}")


def _accept(server: StoreServer, tables: tuple[str, ...]) -> None:
    for t in tables:
        server.store(DB).command(
            f"ALTER TABLE {{db:Identifier}}.{t} RESET SETTING min_free_disk_bytes_to_perform_insert")


def _kill_mid_insert(server: StoreServer, group: Group, mode: str) -> None:
    """Hold the next GPU-row insert, SIGKILL its ingester, let the insert land per `mode`, restart the ingester."""
    held = _hold_next_gpu_insert(server)
    group.kill(held["user"])
    partition, last = _batch_of(server, held)
    if mode == "before":
        assert server.release(held["id"]) == ""
    elif mode == "partly":
        _refuse(server, ("gpu_usage_1h",))
        assert "Could not perform insert" in server.release(held["id"])
        _accept(server, ("gpu_usage_1h",))
    elif mode == "refusing":
        _refuse(server, WRITTEN)
        assert "Could not perform insert" in server.release(held["id"])
        time.sleep(3)  # the next owner backs off meanwhile
        _accept(server, WRITTEN)
    wait_until(lambda: group.committed()[partition] > last, f"the next owner of partition {partition} repeating "
               f"the batch that ends at {last}")
    if mode == "after":
        assert server.release(held["id"]) == ""  # ClickHouse took it, and kept one copy
    group.start(held["user"])


def _finish(server: StoreServer, group: Group, producer: Producer) -> list[int]:
    sent = producer.stop()
    try:
        wait_until(lambda: sum(group.committed().values()) == sum(sent), "the group catching up")
    except AssertionError:
        newest = server.store(DB).rows("SELECT partition, max(last_offset) FROM {db:Identifier}.ingest_batches "
                                       "GROUP BY partition ORDER BY partition")
        raise AssertionError(f"not caught up: committed {sorted(group.committed().items())}, produced {sum(sent)}, "
                             f"newest batch ends {newest}") from None
    group.stop()
    return sent


def _report(group: Group, sent: list[int]) -> None:
    logs = group.logs()
    print(f"produced {sum(sent)} messages ({sum(sent) * 4} samples); batches repeated from the ledger: "
          f"{logs.count('repeating its unfinished batch')}; batches taken over: {logs.count('was entered first')}")


def check_exact(server: StoreServer, sent: list[int]) -> None:
    """Every produced sample once, in every table; rollups equal to raw; billed as counted by hand."""
    store = server.store(DB)
    messages = sum(sent)
    one = store.rows
    assert one("SELECT count(), uniqExact(cluster, node, boot_id, seq, gpu_index) FROM {db:Identifier}.gpu_samples"
               ) == [(messages * 4, messages * 4)]
    assert [tuple(r) for r in one("SELECT node, count(DISTINCT seq), min(seq), max(seq) FROM "
                                  "{db:Identifier}.gpu_samples GROUP BY node ORDER BY node")] == sorted(
        (f"kn{n}", sent[n], 0, sent[n] - 1) for n in range(NODES))
    assert one("SELECT count() FROM {db:Identifier}.agent_reports") == [(messages,)]
    assert one("SELECT sum(samples) FROM {db:Identifier}.gpu_usage_1m") == [(messages * 4,)]
    assert one("SELECT sum(samples) FROM {db:Identifier}.gpu_usage_1h") == [(messages * 4,)]
    assert integrity.findings(store, 0, int(time.time() * 1000) + 3_600_000) == []
    billed = dict(one("SELECT tenant, sum(billable_gpu_seconds) FROM {db:Identifier}.usage_hourly GROUP BY tenant"))
    assert billed == expected_billed_s(sent)


def test_sigkill_mid_insert_while_partitions_move(broker: EmbeddedBroker, tmp_path: Path, topic: str) -> None:
    server, group, producer = _setup(broker, tmp_path, topic)
    try:
        for mode in ("after", "before", "partly"):
            _kill_mid_insert(server, group, mode)
        sent = _finish(server, group, producer)
        _report(group, sent)
        check_exact(server, sent)
        assert "repeating its unfinished batch" in group.logs()
    finally:
        producer.halt()
        for child in group.children.values():
            if child.alive:
                child.kill()
        server.stop()


def test_sigkill_mid_insert_while_the_store_refuses_inserts(broker: EmbeddedBroker, tmp_path: Path,
                                                            topic: str) -> None:
    server, group, producer = _setup(broker, tmp_path, topic)
    try:
        for mode in ("refusing", "after"):
            _kill_mid_insert(server, group, mode)
        sent = _finish(server, group, producer)
        _report(group, sent)
        check_exact(server, sent)
        assert "Could not perform insert" in group.logs()  # the others backed off meanwhile
    finally:
        producer.halt()
        for child in group.children.values():
            if child.alive:
                child.kill()
        server.stop()


def test_the_server_and_the_ingester_dying_together_mid_insert(broker: EmbeddedBroker, tmp_path: Path,
                                                               topic: str) -> None:
    """The held insert lands in part (the hour rollup refusing), then the server and that ingester get SIGKILL
    together: rollup rows of the batch are missing (the check finds them), until whoever owns the partition
    next repeats the batch from the ledger."""
    server, group, producer = _setup(broker, tmp_path, topic)
    try:
        held = _hold_next_gpu_insert(server)
        partition, last = _batch_of(server, held)
        _refuse(server, ("gpu_usage_1h",))
        assert "Could not perform insert" in server.release(held["id"])
        group.kill(held["user"])
        server.kill()
        server.start()  # the same store and port: what was committed before the crash is there
        now = int(time.time() * 1000) + 3_600_000
        # (other ingesters' inserts cut short by the crash may add findings of their own, repaired alike)
        assert "minute vs hour rollup" in {f.check for f in integrity.findings(server.store(DB), 0, now)}
        _accept(server, ("gpu_usage_1h",))
        wait_until(lambda: group.committed()[partition] > last, f"the next owner of partition {partition} "
                   f"repeating the batch that ends at {last}")
        group.start(held["user"])
        sent = _finish(server, group, producer)
        _report(group, sent)
        check_exact(server, sent)
    finally:
        producer.halt()
        for child in group.children.values():
            if child.alive:
                child.kill()
        server.stop()
