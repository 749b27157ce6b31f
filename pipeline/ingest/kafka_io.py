"""The ingester's Kafka boundary: the Protocols its consume loop and dead-letter writer are typed against.

kafka-python's `KafkaConsumer` and `KafkaProducer` satisfy them (pipeline/ingest/consumer.py builds
them), and so does any wrapper a test or benchmark puts around them. `commit` is the one call that
needs a kafka-python type (`OffsetAndMetadata`), so it is made here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol


class TopicPartition(Protocol):
    """A partition of a topic (kafka-python's `TopicPartition` named tuple); hashable."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    def __hash__(self) -> int: ...


class Record(Protocol):
    """One consumed message (kafka-python's `ConsumerRecord`): what the ingester reads of it."""

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


class Consumer(Protocol):
    """The consumer-group member: polling, manual commits, pausing while ClickHouse is away."""

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> Mapping[TopicPartition, Sequence[Record]]:
        ...

    def commit(self, offsets: Mapping[TopicPartition, object]) -> None: ...

    def assignment(self) -> Collection[TopicPartition]: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def paused(self) -> Collection[TopicPartition]: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def close(self) -> None: ...


class SendFuture(Protocol):
    """The broker's answer to one `Producer.send`: `get` returns once acknowledged, raises if refused."""

    def get(self, timeout: float | None = None) -> object: ...


class Producer(Protocol):
    """The dead-letter producer."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> SendFuture: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class RebalanceHandler(Protocol):
    """What the consumer calls when the group moves partitions (the ingester's consume loop)."""

    def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None: ...

    def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None: ...


def commit(consumer: Consumer, offsets: Mapping[TopicPartition, int]) -> None:
    """Commit `partition -> next offset to read` synchronously (raises if the group refused it)."""
    from kafka.structs import OffsetAndMetadata

    if offsets:
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
