"""What the consume loop keeps across a rebalance, with a scripted consumer (kafka-python 3's rules).

kafka-python 3 runs the rebalance listeners on its network thread, refuses any blocking call there (a
commit), and keeps the position of a partition the consumer keeps. So the listeners write and commit
nothing: a kept partition keeps what was gathered and goes on where it was (sought explicitly, for
clients that rewind), a partition that moved is forgotten (its next owner reads it from the committed
offset), and a commit refused, or made while the partition was between owners, is retried while owned.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from gpufleet import wire
from gpufleet.config import parse
from gpufleet.pipeline.ingest.ingester import COMMIT_RETRY_S, Ingester
from gpufleet.pipeline.ingest.writer import Batch
from gpufleet.pipeline.store import Store
from tests.builders import T0_MS, report

TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class ScriptedConsumer:
    """Assignment, seeks and commits as the test sets and records them; commits refused while `refuse`."""

    owned: set[TopicPartition] = field(default_factory=set)
    seeks: list[tuple[TopicPartition, int]] = field(default_factory=list)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    refuse: bool = False

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> Mapping[Any, Any]:
        return {}

    def commit(self, offsets: Mapping[TopicPartition, Any]) -> None:
        if self.refuse:
            raise RuntimeError("Cannot block on net.run() from the IO thread itself")
        self.commits.append({tp: o.offset for tp, o in offsets.items()})

    def assignment(self) -> Collection[TopicPartition]:
        return set(self.owned)

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def paused(self) -> Collection[TopicPartition]:
        return set()

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))

    def close(self) -> None: ...


def _ingester(ch_store: Store, consumer: ScriptedConsumer) -> Ingester:
    cfg = parse({"clickhouse": {"database": ch_store.database}})
    return Ingester(cfg, ch_store, consumer, dlq_producer=None, clock=lambda: T0_MS / 1000)  # type: ignore[arg-type]


def _gather(ing: Ingester, tp: TopicPartition, offsets: range) -> None:
    for o in offsets:
        r = report(node=f"n{tp.partition}", seq=o, time_ms=T0_MS + o * 1000)
        ing._add(tp, Rec(o, r.node.encode(), wire.encode(r)))


def test_a_kept_partition_keeps_what_was_gathered_and_a_moved_one_is_forgotten(ch_store: Store) -> None:
    consumer = ScriptedConsumer({TP0, TP1})
    ing = _ingester(ch_store, consumer)
    _gather(ing, TP0, range(10, 15))
    _gather(ing, TP1, range(3, 5))
    ing.pending[TP0] = ing.pending[TP1] = None
    ing.uncommitted[TP1] = 3
    ing.on_partitions_revoked({TP0, TP1})  # eager: everything, before the new assignment is known
    assert (set(ing.batches), consumer.commits) == ({TP0, TP1}, [])  # nothing written, nothing committed
    consumer.owned = {TP0}
    ing.on_partitions_assigned({TP0})
    assert set(ing.batches) == {TP0}
    assert [ing.batches[TP0].offset_of[id(r)] for r in ing.batches[TP0].reports] == [10, 11, 12, 13, 14]
    assert consumer.seeks == [(TP0, 15)]  # on from where it was, whatever the client did to the position
    assert (ing.pending, ing.positions, ing.uncommitted) == ({TP0: None}, {TP0: 15}, {})


def test_a_commit_refused_or_between_owners_is_retried_while_owned(ch_store: Store) -> None:
    consumer = ScriptedConsumer({TP0})
    ing = _ingester(ch_store, consumer)
    stored = Batch(TP1)
    stored.first, stored.last = 20, 29
    assert not ing._commit(stored)  # TP1 is between owners right now: remembered, not sent
    consumer.refuse = True
    stored0 = Batch(TP0)
    stored0.first, stored0.last = 0, 9
    assert not ing._commit(stored0)
    assert (ing.uncommitted, ing.stats.commit_errors, consumer.commits) == ({TP1: 30, TP0: 10}, 1, [])
    consumer.refuse, consumer.owned = False, {TP0, TP1}
    assert ing._last_commit_retry < -COMMIT_RETRY_S  # never retried yet: the next step does
    ing._step()  # polls, then retries what is owned now
    assert consumer.commits == [{TP0: 10, TP1: 30}]
    assert ing.uncommitted == {}
    later = Batch(TP0)
    later.first, later.last = 10, 19
    consumer.refuse = True
    ing._commit(later)
    consumer.refuse, consumer.owned = False, {TP1}
    ing.on_partitions_assigned({TP1})  # TP0 moved on: its next owner repeats that batch from the ledger
    assert ing.uncommitted == {}
