"""Kafka clients for the pipeline: the ingester's consumer-group member and the DLQ producer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpufleet import kafka
from gpufleet.config import Config

if TYPE_CHECKING:
    from gpufleet.pipeline.ingest.ingester import Ingester
    from gpufleet.pipeline.store import Store


def build_consumer(cfg: Config, ingester_ref: list[Ingester]) -> Any:
    """A consumer in `ingest.group_id`, subscribed to `kafka.topic`, offsets committed by hand.

    `ingester_ref` is filled with the ingester after construction, so rebalance callbacks reach it.
    """
    from kafka import ConsumerRebalanceListener, KafkaConsumer

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            if ingester_ref:
                ingester_ref[0].on_partitions_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            if ingester_ref:
                ingester_ref[0].on_partitions_assigned(assigned)

    ing = cfg.ingest
    consumer = KafkaConsumer(**kafka.consumer_kwargs(
        cfg.kafka,
        group_id=ing.group_id,
        client_id="gpufleet-ingest",
        max_poll_interval_ms=ing.max_poll_interval_ms,
        session_timeout_ms=ing.session_timeout_ms,
        heartbeat_interval_ms=max(100, ing.session_timeout_ms // 4),
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    ))
    consumer.subscribe([cfg.kafka.topic], listener=Listener())
    return consumer


def build_producer(cfg: Config) -> Any:
    """The dead-letter producer: acks from all replicas, the original bytes unchanged."""
    from kafka import KafkaProducer

    return KafkaProducer(**kafka.producer_kwargs(cfg.kafka, client_id="gpufleet-ingest-dlq"))


def build_ingester(cfg: Config, store: Store) -> Ingester:
    """An `Ingester` on `store` with its consumer-group member and DLQ producer, rebalance callbacks wired."""
    from gpufleet.pipeline.ingest.ingester import Ingester

    ref: list[Ingester] = []
    ingester = Ingester(cfg, store, build_consumer(cfg, ref), build_producer(cfg))
    ref.append(ingester)
    return ingester
