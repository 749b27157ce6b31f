"""Versioned SQL migrations (`pipeline/store/migrations/NNNN_name.sql`), applied once each, idempotently.

Each file is a list of statements separated by `;` at line end, with `${db}`, `${on_cluster}`,
`${replicated}`, `${dedup_window}` and `${raw_ttl_days}` filled in here, so one set of files serves chDB, a single
server and a cluster (Replicated engines, `ON CLUSTER`, `Distributed` tables by node: sharding.py). Applied
versions are recorded in `schema_migrations` with a checksum; a changed file that was already applied is an error.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final

from gpufleet.errors import GpufleetError, StoreError, first_line
from gpufleet.pipeline.store import sharding
from gpufleet.pipeline.store.client import check_database_name

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from gpufleet.config import Config
    from gpufleet.pipeline.store.store import Store


SCHEMA_TABLE_EXISTS: Final = (
    "SELECT count() FROM system.tables WHERE database = {name:String} AND name = 'schema_migrations'")
APPLIED_VERSION: Final = "SELECT max(version) FROM {db:Identifier}.schema_migrations FINAL"


class MigrationError(GpufleetError, RuntimeError):
    """A migration failed or an applied one was changed since."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SchemaOptions:
    """What varies between deployments; the SQL is the same."""

    database: str = "gpufleet"
    cluster: str | None = None
    raw_ttl_days: int = 30
    extra: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> SchemaOptions:
        """The deployment's options from its `clickhouse` section."""
        ch = cfg.clickhouse
        return cls(database=ch.database, cluster=ch.cluster, raw_ttl_days=ch.raw_ttl_days)

    def substitutions(self) -> dict[str, str]:
        subs = {
            "db": check_database_name(self.database),
            "on_cluster": f"ON CLUSTER '{self.cluster}'" if self.cluster else "",
            "replicated": "Replicated" if self.cluster else "",
            "dedup_window": ("" if self.cluster else "non_") + "replicated_deduplication_window",
            "raw_ttl_days": str(int(self.raw_ttl_days)),
        }
        subs.update(dict(self.extra))
        return subs


def available() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    out = []
    for entry in resources.files("gpufleet.pipeline.store.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            out.append(Migration(int(version), name, entry.read_text()))
    return sorted(out, key=lambda m: m.version)


def statements(migration: Migration, options: SchemaOptions) -> list[str]:
    """The migration's statements with the deployment's substitutions filled in."""
    text = string.Template(migration.sql).substitute(options.substitutions())
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    parts = "\n".join(lines).split(";\n")
    out = [p.strip().rstrip(";") for p in parts if p.strip()]
    if options.cluster:
        db = options.substitutions()["db"]
        out = [c for stmt in out for c in sharding.cluster_statements(stmt, db, options.cluster)]
    return out


def require_schema(store: Store, where: str, hint: str = "gpufleet migrate") -> None:
    """Raise `StoreError` (run `hint`) unless the store's database holds this version's schema; changes nothing.

    `where` names the store in the message. Readers call this once, so a store that was never
    migrated (or migrated by an older gpufleet) is one clear line, not a missing-table error later.
    """
    if not store.rows(SCHEMA_TABLE_EXISTS, {"name": store.database})[0][0]:
        raise StoreError(f"{where} has no gpufleet schema in database {store.database}: create it with `{hint}`")
    applied = int(store.rows(APPLIED_VERSION)[0][0])
    latest = available()[-1].version
    if applied < latest:
        raise StoreError(f"the schema in {where} database {store.database} is at version {applied}, this gpufleet "
                         f"reads version {latest}: upgrade it with `{hint}`")


def schema_table(options: SchemaOptions) -> str:
    """The statement creating `schema_migrations` (on a cluster, one replica set over every server)."""
    db = check_database_name(options.database)
    stmt = (f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations {options.substitutions()['on_cluster']} "
            "(version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            f"ENGINE = {options.substitutions()['replicated']}ReplacingMergeTree ORDER BY version")
    return sharding.global_engine(stmt) if options.cluster else stmt


def migrate(client: Client, options: SchemaOptions) -> list[int]:
    """Apply every migration not yet applied; returns the versions applied now."""
    db = check_database_name(options.database)
    on_cluster = options.substitutions()["on_cluster"]
    engine = "" if options.cluster else " ENGINE = Atomic"
    client.command(f"CREATE DATABASE IF NOT EXISTS {db} {on_cluster}{engine}")
    client.command(schema_table(options))
    applied = {
        int(v): c
        for v, c in client.query(f"SELECT version, checksum FROM {db}.schema_migrations FINAL").result_rows
    }
    done = []
    for m in available():
        if m.version in applied:
            if applied[m.version] != m.checksum:
                raise MigrationError(
                    f"migration {m.version:04d}_{m.name} changed after it was applied "
                    f"(checksum {applied[m.version]} -> {m.checksum}); add a new migration instead"
                )
            continue
        for stmt in statements(m, options):
            try:
                client.command(stmt)
            except Exception as exc:
                raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {first_line(exc)}") from None
        client.insert(
            f"{db}.schema_migrations", [[m.version, m.name, m.checksum]],
            column_names=["version", "name", "checksum"],
        )
        done.append(m.version)
    return done
