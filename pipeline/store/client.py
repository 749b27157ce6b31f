"""The one adapter to ClickHouse: open a client from a DSN, embedded (chDB) or server, same API.

`chdb:///path` opens the embedded engine on disk (one process owns a path), `chdb://memory` an
in-memory one, and `http(s)://user:pass@host:8123/db` a ClickHouse server. Nothing else in the
project imports `clickhouse_connect`. A password can also come from `CLICKHOUSE_PASSWORD` or
`CLICKHOUSE_PASSWORD_FILE`, so it need not sit in a DSN; `redact()` keeps it out of logs. A target
on a cluster (`clickhouse.cluster`) gets `CLUSTER_SETTINGS` on its client, sent with every query.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gpufleet.config_check import tcp_error
from gpufleet.dsn import check_database_name, parse, redact, scrub
from gpufleet.errors import StoreError, first_line

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

DEFAULT_DSN = "chdb:///var/lib/gpufleet/clickhouse"
DEFAULT_DATABASE = "gpufleet"
CONNECT_TIMEOUT_S = 5
POINT_ELSEWHERE = "point to a store with --dsn, --data-dir (a demo's) or clickhouse.dsn in the config"
CLUSTER_SETTINGS: Final = {"distributed_product_mode": "global"}
"""Session settings of a client on a cluster: a subquery over a Distributed table inside a query over one
(`gpu_claim_outranked`, hence `usage_hourly`) is computed once over every shard, not refused ('deny', the
default) nor run per shard ('local': a GPU reported on two shards would be billed twice). docs/scaling.md."""


@dataclass(frozen=True)
class Target:
    """Where the data lives: a DSN and the database inside it, and where that choice came from."""

    dsn: str = DEFAULT_DSN
    database: str = DEFAULT_DATABASE
    origin: str = field(default="", compare=False)
    """How the DSN was chosen, for messages (e.g. "from --dsn"); empty when it goes without saying."""
    cluster: str | None = None
    """The ClickHouse cluster the tables are spread over (`clickhouse.cluster`); None: a single server."""

    @property
    def session_settings(self) -> dict[str, str]:
        """The settings every query through this target's client carries: `CLUSTER_SETTINGS` on a cluster, else none."""
        return dict(CLUSTER_SETTINGS) if self.cluster else {}

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb:")

    @property
    def chdb_path(self) -> Path | None:
        """The on-disk path of an embedded store; None for a server or an in-memory store."""
        if not self.embedded:
            return None
        path = self.dsn.removeprefix("chdb://")
        return None if path in ("memory", ":memory:") else Path(path)

    def where(self) -> str:
        """The DSN (redacted) and its origin, as messages name it."""
        return redact(self.dsn) + (f" ({self.origin})" if self.origin else "")


def _password_from_env() -> str | None:
    path = os.environ.get("CLICKHOUSE_PASSWORD_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get("CLICKHOUSE_PASSWORD")


def connect(target: Target, *, create: bool = False) -> Client:
    """Open a client for `target`; raises `StoreError` with a clear reason.

    Readers create nothing: a chDB path that does not exist is an error naming where it looked.
    Only the writers that own a store (`ingest`, `migrate`, the demo) pass `create=True`, which lets
    chDB make the directory. No database is created here either (that is `migrate`'s job).
    """
    import clickhouse_connect  # heavy import kept out of the agent's path

    check_database_name(target.database)
    dsn = target.dsn
    try:
        if target.embedded:
            _check_chdb_path(target, create)
            return clickhouse_connect.get_client(dsn=dsn, settings=target.session_settings or None)
        return _server_client(target)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot open ClickHouse at {target.where()}: {_scrub(first_line(exc), dsn)}") from None


def _check_chdb_path(target: Target, create: bool) -> None:
    path = target.chdb_path
    if path is None or create:
        return
    if not path.is_dir():
        raise StoreError(f"no ClickHouse store at {target.where()}: {POINT_ELSEWHERE}, "
                         "or create one with `gpufleet migrate`")
    if _locked_elsewhere(path / "status"):
        raise StoreError(f"the chDB store at {target.where()} is open in another process (chDB lets one process "
                         "open a store): stop that process (gpufleet demo or ingest) or ask its status API, then retry")


def _locked_elsewhere(status_file: Path) -> bool:
    """Whether another process holds the lock chDB takes on `<store>/status` while it has the store open.

    This process's own open store is not "elsewhere": chDB lets several clients of one process share it,
    and the lock it holds shows up as one of our file descriptors.
    """
    if not status_file.is_file() or _held_here(status_file):
        return False
    try:
        fd = os.open(status_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def _held_here(path: Path) -> bool:
    fds = Path("/proc/self/fd")
    target = path.resolve()
    try:
        links = list(fds.iterdir())
    except OSError:
        return True  # no /proc: cannot tell, so let chDB decide
    for link in links:
        try:
            if Path(os.readlink(link)) == target:
                return True
        except OSError:
            continue
    return False


def _server_client(target: Target) -> Client:
    import clickhouse_connect

    dsn = target.dsn
    parts = parse(dsn)
    if parts is None or parts.scheme not in ("http", "https"):
        scheme = parts.scheme if parts else ""
        raise StoreError(
            f"ClickHouse DSN {redact(dsn)!r} has scheme {scheme!r}: use chdb:///path, "
            "chdb://memory or http(s)://user:pass@host:8123/db"
        )
    host = parts.host_part()
    hostname, port = host.hostname or "localhost", host.port or (8443 if parts.scheme == "https" else 8123)
    error = tcp_error(hostname, port, CONNECT_TIMEOUT_S)
    if error:  # one clear line, instead of the HTTP client's retries and its exception chain
        raise StoreError(f"ClickHouse at {target.where()} does not answer ({error}): check the host and port, "
                         "and that the server runs and is reachable from here")
    return clickhouse_connect.get_client(
        host=hostname,
        port=port,
        username=parts.username or os.environ.get("CLICKHOUSE_USER") or "default",
        password=parts.password or _password_from_env() or "",
        secure=parts.scheme == "https",
        connect_timeout=CONNECT_TIMEOUT_S,
        send_receive_timeout=60,
        settings=target.session_settings or None,
    )


def _scrub(message: str, dsn: str) -> str:
    """`message` without the password in any form: as written in the DSN, decoded, from the environment, or
    as the Basic credential a server or proxy may echo back."""
    parts = parse(dsn)
    secrets = parts.secrets() if parts else []
    try:
        env_password = _password_from_env()
    except OSError:
        env_password = None
    password = (parts.password if parts else None) or env_password
    if env_password:
        secrets.append(env_password)
    if password:
        user = (parts.username if parts else None) or os.environ.get("CLICKHOUSE_USER") or "default"
        secrets.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    return scrub(message, secrets)
