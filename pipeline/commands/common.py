"""Options and set-up shared by the pipeline's commands: config, the ClickHouse target, the front door.

Design notes: docs/design-notes.md#pipeline-commands-common-py.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

from gpufleet import config as config_mod
from gpufleet.config import Config, JobsConfig
from gpufleet.dsn import redact
from gpufleet.embedded.demo.state import DEFAULT_DATA_DIR, DemoState
from gpufleet.errors import StoreError
from gpufleet.pipeline.store.client import Target

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store


def target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--config`, `--dsn` and `--database` to a command."""
    f = click.option("--database", help="ClickHouse database (default: clickhouse.database).")(f)
    f = click.option("--dsn", help="ClickHouse DSN: chdb:///path or http(s)://user@host:8123 (default: config).")(f)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="GPUFLEET_CONFIG",
                        help="gpufleet YAML config (or $GPUFLEET_CONFIG).")(f)


def read_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`target_options` and `--data-dir`: the options of every read command (see `resolve`)."""
    f = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR,
                     show_default=True,
                     help="The demo's data directory: its store is read unless --dsn or the config names one.")(f)
    return target_options(f)


def load_config(config_path: str | None, dsn: str | None, database: str | None) -> tuple[Config, Target]:
    """The validated config with command-line ClickHouse overrides applied, and its target (a writer's)."""
    loaded = config_mod.load_file(config_path)
    cfg = loaded.config
    origin = "from --dsn" if dsn else _config_origin(loaded)
    cfg = config_mod.with_clickhouse(cfg, dsn or cfg.clickhouse.dsn, database or cfg.clickhouse.database)
    return cfg, Target(cfg.clickhouse.dsn, cfg.clickhouse.database, origin, cfg.clickhouse.cluster)


def _config_origin(loaded: config_mod.Loaded) -> str:
    if "clickhouse.dsn" in loaded.keys:
        return f"clickhouse.dsn in {loaded.source}"
    return "the default clickhouse.dsn"


@dataclass(frozen=True)
class Source:
    """Where a read command reads: the config pointed at the store, the store, and the demo when it holds it."""

    cfg: Config
    target: Target
    demo: DemoState | None = None
    """The running demo that has `target` open: ask its status API, the store cannot be opened."""


def resolve(config_path: str | None, dsn: str | None, database: str | None,
            data_dir: Path = DEFAULT_DATA_DIR) -> Source:
    """The store a read command reads (precedence in the module docstring); opens nothing."""
    loaded = config_mod.load_file(config_path)
    cfg = loaded.config
    state = DemoState.read(data_dir)
    if dsn:
        origin = "from --dsn"
    elif "clickhouse.dsn" in loaded.keys:
        dsn, origin = cfg.clickhouse.dsn, _config_origin(loaded)
    elif state is not None:
        dsn, origin = state.dsn, f"the demo's store, from {DemoState.path(data_dir)}"
        database = database or state.database
        if state.jobs is not None and not any(k.split(".")[0] == "jobs" for k in loaded.keys):
            cfg = msgspec.structs.replace(cfg, jobs=msgspec.convert(state.jobs, JobsConfig))
    else:
        dsn, origin = cfg.clickhouse.dsn, f"the default clickhouse.dsn; no demo state in {data_dir}"
    target = Target(dsn, database or cfg.clickhouse.database, origin, cfg.clickhouse.cluster)
    demo = state if state is not None and state.dsn == target.dsn and state.running() else None
    return Source(config_mod.with_clickhouse(cfg, target.dsn, target.database), target, demo)


def open_store(source: Source) -> Store:
    """The source's store, which must exist and hold the schema; creates nothing."""
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.migrate import require_schema

    if source.demo is not None:
        raise StoreError(
            f"the running demo (pid {source.demo.pid}) has the store at {source.target.where()} open, and chDB "
            "lets one process open a store: stop the demo (Ctrl-C) and run this again, or read through its "
            f"API (`gpufleet status --json`, `gpufleet alerts --json`, {source.demo.status_url}/status)")
    store = Store.open(source.target)
    require_schema(store, source.target.where(), migrate_hint(source.target))
    return store


def demo_status(demo: DemoState) -> dict[str, Any]:
    """The running demo's status document, from its API; `StoreError` when the API does not answer."""
    doc = demo.fetch_status()
    if doc is None:
        raise StoreError(f"the running demo (pid {demo.pid}) has the store open, but its status API at "
                         f"{demo.status_url} did not answer: retry, or stop the demo and run this again")
    return doc


def migrate_hint(target: Target) -> str:
    """The `gpufleet migrate` command line that creates the schema `target` names (the DSN redacted)."""
    return f"gpufleet migrate --dsn {shlex.quote(redact(target.dsn))} --database {target.database}"
