"""Kafka clients for the ingester: its consumer-group member, its dead-letter producer, and the wiring.

`build_ingester` makes the consumer, the `Ingester` on it, then subscribes the consumer with the
ingester as its rebalance handler: the ingester needs the consumer to exist, the subscription
needs the ingester, and this order needs no back-reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from gpufleet import kafka
from gpufleet.config import Config
from gpufleet.pipeline.ingest.ingester import DEFAULT_OPTIONS, Ingester, IngestOptions
from gpufleet.pipeline.ingest.kafka_io import Consumer, Producer, RebalanceHandler, TopicPartition

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store


class GroupConsumer(Consumer, Protocol):
    """A `Consumer` that can join the group (kafka-python's `KafkaConsumer`, or a wrapper around one)."""

    def subscribe(self, topics: list[str], listener: Any = None) -> None: ...


def build_consumer(cfg: Config) -> GroupConsumer:
    """A consumer in `ingest.group_id`, offsets committed by hand; not yet subscribed (`subscribe`)."""
    from kafka import KafkaConsumer

    ing = cfg.ingest
    consumer: GroupConsumer = KafkaConsumer(**kafka.consumer_kwargs(
        cfg.kafka,
        group_id=ing.group_id,
        client_id="gpufleet-ingest",
        max_poll_interval_ms=ing.max_poll_interval_ms,
        session_timeout_ms=ing.session_timeout_ms,
        heartbeat_interval_ms=max(100, ing.session_timeout_ms // 4),
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    ))
    return consumer


def subscribe(consumer: GroupConsumer, topic: str, handler: RebalanceHandler | None = None) -> None:
    """Subscribe to `topic`; `handler` hears of every rebalance (the ingester flushes on revocation)."""
    if handler is None:
        consumer.subscribe([topic])
        return
    from kafka import ConsumerRebalanceListener

    target = handler

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python checks isinstance
        def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
            target.on_partitions_revoked(revoked)

        def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
            target.on_partitions_assigned(assigned)

    consumer.subscribe([topic], listener=Listener())


def build_producer(cfg: Config) -> Producer:
    """The dead-letter producer: acks from all replicas (dead letters are bounded: pipeline/ingest/dead_letters.py)."""
    from kafka import KafkaProducer

    producer: Producer = KafkaProducer(**kafka.producer_kwargs(cfg.kafka, client_id="gpufleet-ingest-dlq"))
    return producer


def build_ingester(cfg: Config, store: Store, *, clock: Callable[[], float] = time.time,
                   options: IngestOptions = DEFAULT_OPTIONS,
                   consumer: GroupConsumer | None = None) -> Ingester:
    """An `Ingester` on `store` with its consumer (`consumer`, e.g. a wrapped `build_consumer()`, or a
    new one) subscribed to `kafka.topic` with the ingester as its rebalance handler, and a DLQ producer."""
    consumer = consumer if consumer is not None else build_consumer(cfg)
    ingester = Ingester(cfg, store, consumer, build_producer(cfg), clock=clock, options=options)
    subscribe(consumer, cfg.kafka.topic, ingester)
    return ingester
