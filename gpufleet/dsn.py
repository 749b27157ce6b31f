"""ClickHouse DSNs and database names: the checks and the redaction every layer shares (no client import).

A database name goes into DDL as an identifier, so it is restricted to a safe pattern; a DSN is
shown only through `redact`, which hides any password.
"""

from __future__ import annotations

import re

from gpufleet.errors import StoreError

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def redact(dsn: str) -> str:
    """The DSN with any password replaced by `***`, safe to log."""
    return re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", dsn)  # up to the netloc's last @: a password may hold one


def check_database_name(name: str) -> str:
    """Database names go into DDL as identifiers, so they are restricted to a safe pattern."""
    if not _DB_NAME.match(name):
        raise StoreError(
            f"database name {name!r} is not allowed: use letters, digits and '_' (e.g. 'gpufleet')"
        )
    return name
