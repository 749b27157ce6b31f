"""The store: a ClickHouse client with its database bound, the one handle the pipeline reads and writes with.

Statements name their tables `{db:Identifier}.table`: `query` and `command` bind `db` to the
store's database as a server-side query parameter, like every other value, so no database name
is spliced into a query. `insert` takes a bare table name and qualifies it here. The name is
checked once, when the store is made, so a bad one fails before any statement runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from gpufleet.dsn import check_database_name
from gpufleet.pipeline.store.client import Target, connect

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client
    from clickhouse_connect.driver.query import QueryResult

DB_PARAM: Final = "db"
"""The parameter that names the store's database in a statement: `{db:Identifier}.table`."""
_DB_PLACEHOLDER: Final = "{" + DB_PARAM + ":"


@dataclass(frozen=True)
class Store:
    """A ClickHouse client and the (checked) database every statement through it reads and writes."""

    client: Client
    database: str

    def __post_init__(self) -> None:
        check_database_name(self.database)

    @classmethod
    def open(cls, target: Target, *, create: bool = False) -> Store:
        """Open `target`'s ClickHouse with its database bound (see `connect`: only writers that own a
        store pass `create=True`)."""
        return cls(connect(target, create=create), target.database)

    def table(self, name: str) -> str:
        """`name` qualified with the store's database (the one place a table name is qualified)."""
        return f"{self.database}.{name}"

    def bind(self, sql: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """`params`, plus the database where `sql` names it as `{db:...}`; None when there is nothing to bind."""
        if _DB_PLACEHOLDER in sql:
            return {**(params or {}), DB_PARAM: self.database}
        return dict(params) if params else None

    def query(self, sql: str, params: Mapping[str, Any] | None = None,
              settings: Mapping[str, Any] | None = None) -> QueryResult:
        """Run a SELECT with its parameters bound."""
        return self.client.query(sql, parameters=self.bind(sql, params),
                                 settings=dict(settings) if settings else None)

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Sequence[Any]]:
        """The result rows of a SELECT, as tuples."""
        return self.query(sql, params).result_rows

    def command(self, sql: str, params: Mapping[str, Any] | None = None,
                settings: Mapping[str, Any] | None = None) -> Any:
        """Run a statement that returns no rows (DDL, INSERT ... SELECT)."""
        return self.client.command(sql, parameters=self.bind(sql, params),
                                   settings=dict(settings) if settings else None)

    def insert(self, table: str, data: Sequence[Any], column_names: Sequence[str], *,
               column_oriented: bool = False, settings: Mapping[str, Any] | None = None) -> None:
        """Insert rows (or columns, `column_oriented`) into the store's `table`."""
        self.client.insert(self.table(table), data, column_names=list(column_names),
                           column_oriented=column_oriented, settings=dict(settings) if settings else None)
