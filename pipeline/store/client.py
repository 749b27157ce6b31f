"""The one adapter to ClickHouse: open a client from a DSN, embedded (chDB) or server, same API.

`chdb:///path` opens the embedded engine on disk (one process owns a path), `chdb://memory` an
in-memory one, and `http(s)://user:pass@host:8123/db` a ClickHouse server. Nothing else in the
project imports `clickhouse_connect`. A password can also come from `CLICKHOUSE_PASSWORD` or
`CLICKHOUSE_PASSWORD_FILE`, so it need not sit in a DSN; `redact()` keeps it out of logs.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from gpufleet.dsn import check_database_name, redact
from gpufleet.errors import StoreError

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

DEFAULT_DSN = "chdb:///var/lib/gpufleet/clickhouse"
DEFAULT_DATABASE = "gpufleet"
@dataclass(frozen=True)
class Target:
    """Where the data lives: a DSN and the database inside it."""

    dsn: str = DEFAULT_DSN
    database: str = DEFAULT_DATABASE

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb:")


def _password_from_env() -> str | None:
    path = os.environ.get("CLICKHOUSE_PASSWORD_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get("CLICKHOUSE_PASSWORD")


def connect(target: Target) -> Client:
    """Open a client for `target`; creates nothing. Raises `StoreError` with a clear reason."""
    import clickhouse_connect  # heavy import kept out of the agent's path

    check_database_name(target.database)
    dsn = target.dsn
    try:
        if dsn.startswith("chdb:"):
            path = dsn.removeprefix("chdb://")
            if path not in ("memory", ":memory:"):
                Path(path).mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=dsn)
        parts = urlsplit(dsn)
        if parts.scheme not in ("http", "https"):
            raise StoreError(
                f"ClickHouse DSN {redact(dsn)!r} has scheme {parts.scheme!r}: use chdb:///path, "
                "chdb://memory or http(s)://user:pass@host:8123/db"
            )
        password = unquote(parts.password) if parts.password is not None else _password_from_env()
        return clickhouse_connect.get_client(
            host=parts.hostname or "localhost",
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "") or os.environ.get("CLICKHOUSE_USER") or "default",
            password=password or "",
            secure=parts.scheme == "https",
            connect_timeout=5,
            send_receive_timeout=60,
        )
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot open ClickHouse at {redact(dsn)}: {_scrub(str(exc), dsn)}") from None


def _scrub(message: str, dsn: str) -> str:
    """`message` without the password, clear or as the Basic credential a server or proxy may echo back."""
    parts = urlsplit(dsn)
    try:
        password = unquote(parts.password) if parts.password is not None else _password_from_env()
    except OSError:
        password = None
    if not password:
        return message
    user = unquote(parts.username or "") or os.environ.get("CLICKHOUSE_USER") or "default"
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    message = message.replace(basic, "***").replace(password, "***")
    return message.replace(parts.password, "***") if parts.password else message  # the percent-encoded form
