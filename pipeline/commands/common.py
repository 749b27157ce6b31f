"""Options and set-up shared by the pipeline's commands: config, ClickHouse target overrides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from gpufleet import config as config_mod
from gpufleet.config import Config
from gpufleet.pipeline.store.client import Target


def target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--config`, `--dsn` and `--database` to a command."""
    f = click.option("--database", help="ClickHouse database (default: clickhouse.database).")(f)
    f = click.option("--dsn", help="ClickHouse DSN: chdb:///path or http(s)://user@host:8123 (default: config).")(f)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="GPUFLEET_CONFIG",
                        help="gpufleet YAML config (or $GPUFLEET_CONFIG).")(f)


def load_config(config_path: str | None, dsn: str | None, database: str | None) -> tuple[Config, Target]:
    """The validated config with command-line ClickHouse overrides applied, and its target."""
    cfg = config_mod.load(config_path)
    cfg = config_mod.with_clickhouse(cfg, dsn or cfg.clickhouse.dsn, database or cfg.clickhouse.database)
    return cfg, Target(cfg.clickhouse.dsn, cfg.clickhouse.database)
