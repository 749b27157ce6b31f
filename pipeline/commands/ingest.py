"""`gpufleet ingest`: run the Kafka -> ClickHouse ingester (a consumer-group member) until stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time

import click

from gpufleet import kafka
from gpufleet.config import ConfigError
from gpufleet.config_check import validate_startup
from gpufleet.pipeline.commands.common import load_config, target_options
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.queries.policy import sync_policy
from gpufleet.pipeline.queries.status import fleet_status
from gpufleet.pipeline.queries.status_api import StatusServer
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import StoreError, redact
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

log = logging.getLogger(__name__)


@click.command()
@target_options
@click.option("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap_servers).")
@click.option("--no-migrate", is_flag=True, help="Do not apply schema migrations at start-up.")
def ingest(config_path: str | None, dsn: str | None, database: str | None, bootstrap: str | None,
           no_migrate: bool) -> None:
    """Consume agent messages from Kafka and insert them into ClickHouse (at-least-once, deduplicated)."""
    import msgspec

    cfg, target = load_config(config_path, dsn, database)
    if bootstrap:
        cfg = msgspec.structs.replace(cfg, kafka=msgspec.structs.replace(cfg.kafka, bootstrap_servers=bootstrap))
    validate_startup(cfg, role="ingest", network=True)  # every config problem named, before any data moves
    try:
        store = Store.open(target, create=True)
    except StoreError as exc:  # e.g. wrong credentials: the DSN is redacted in the message
        raise ConfigError(f"clickhouse.dsn: {exc}") from None
    if not no_migrate:
        migrate(store.client, SchemaOptions.from_config(cfg))
    sync_policy(store, cfg.billing, int(time.time() * 1000))
    kafka.ensure_topics(cfg.kafka)
    ing = build_ingester(cfg, store)
    api = StatusServer(lambda: fleet_status(Store.open(target), cfg), port=cfg.ingest.status_port,
                       health=ing.liveness.check).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"ingesting {cfg.kafka.topic}@{cfg.kafka.bootstrap_servers} into {redact(target.dsn)} "
               f"database {target.database}; status API {api.url}/status", err=True)
    try:
        ing.run(stop)
    finally:
        api.stop()
        ing.consumer.close()
