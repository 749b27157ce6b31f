"""Tenant isolation in ClickHouse: a read-only user per tenant that sees only its own rows (pure SQL builders).

Design notes: docs/design-notes.md#pipeline-store-tenants-py.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Final

from gpufleet.pipeline.store.client import check_database_name

TENANT_ROLE: Final = "gpufleet_tenants"
"""Shared role of every tenant user: holds the SELECT grants, and is excluded from the operators' policy."""
OPERATORS_POLICY: Final = "gpufleet_operators"
USER_PREFIX: Final = "gpufleet_t_"


@dataclass(frozen=True)
class TenantTable:
    """A table (or view) a tenant may read, and the SQL expression naming the tenant of a row (None: a view)."""

    name: str
    tenant_expr: str | None


TABLES: Final[tuple[TenantTable, ...]] = (
    TenantTable("gpu_samples", "tenant"),
    TenantTable("gpu_usage_1m", "tenant"),
    TenantTable("gpu_usage_1h", "tenant"),
    TenantTable("gpu_latest", "tenant"),
    TenantTable("gpu_claim_homes", "tenant"),
    TenantTable("fleet_usage_1m", "tenant"),
    TenantTable("fleet_usage_1h", "tenant"),
    TenantTable("job_usage_1h", "tenant"),
    TenantTable("gpu_health_1m", "tenant"),
    TenantTable("gpu_health_1h", "tenant"),
    TenantTable("gpu_health_events", "tenant"),
    TenantTable("gpu_xid_events", "tenant"),
    TenantTable("billing_statements", "tenant"),
    TenantTable("billing_adjustments", "tenant"),
    TenantTable("usage_hourly_stored", "tenant"),
    TenantTable("alerts", "labels['tenant']"),
)
"""Every table holding tenant rows: each gets a policy per tenant and the operators' policy."""

VIEWS: Final[tuple[str, ...]] = ("usage_hourly",)
"""Views a tenant reads: they run with the reader's rights, so the policies of their tables filter them."""

SHARED: Final[tuple[str, ...]] = ("billing_policy", "gpu_claim_outranked")
"""What a tenant's views need besides: the SLA policy in force, and the view of outranked claims
(`usage_hourly` reads it; it runs with the reader's rights over `gpu_claim_homes` and `gpu_usage_1m`,
so a tenant sees only its own claims, and its usage leaves out only those of them that its own
other claims outranked: the statements, computed with every claim, are what it is billed)."""

READONLY: Final = 2
"""`readonly = 2`: reads and per-query settings (Grafana sends some), no writes, no DDL."""

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def literal(value: str) -> str:
    """`value` as a ClickHouse string literal: backslash and quote escaped, control characters as `\\xHH`."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", escaped) + "'"


def ident(name: str) -> str:
    """`name` as a back-quoted ClickHouse identifier."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def user_name(tenant: str) -> str:
    """The tenant's ClickHouse user (also its policies' name): readable, unique, safe in any context.

    `gpufleet_t_` + the tenant in lower-case letters, digits and `_` (at most 32) + 10 hex digits of
    its SHA-256, so two tenants never share a user even when their readable parts are equal.
    """
    if not tenant:
        raise ValueError("the tenant name is empty: unallocated GPUs have no tenant user")
    readable = re.sub(r"[^a-z0-9_]+", "_", tenant.lower()).strip("_")[:32]
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:10]
    return f"{USER_PREFIX}{readable}_{digest}" if readable else f"{USER_PREFIX}{digest}"


def condition(table: TenantTable, tenant: str) -> str:
    """The row policy's condition: the row belongs to `tenant`."""
    if table.tenant_expr is None:
        raise ValueError(f"{table.name} is a view: its tables' policies filter it")
    return f"{table.tenant_expr} = {literal(tenant)}"


def password_hash(password: str, salt: str) -> str:
    """What ClickHouse stores for `IDENTIFIED WITH sha256_hash BY hash SALT salt`: hex SHA-256 of password + salt."""
    return hashlib.sha256((password + salt).encode()).hexdigest()


def new_salt() -> str:
    return secrets.token_hex(16)


def new_password() -> str:
    return secrets.token_urlsafe(32)


def readable_tables() -> tuple[str, ...]:
    """Everything a tenant user may SELECT."""
    return (*(t.name for t in TABLES), *VIEWS, *SHARED)


def setup_sql(database: str) -> list[str]:
    """The shared part, run once per database (idempotent): the tenants' role, its grants, the operators' policy."""
    db = check_database_name(database)
    role = TENANT_ROLE
    out = [f"CREATE ROLE IF NOT EXISTS {ident(role)}"]
    out += [f"GRANT SELECT ON {db}.{table} TO {ident(role)}" for table in readable_tables()]
    policy = OPERATORS_POLICY
    out += [f"CREATE ROW POLICY OR REPLACE {ident(policy)} ON {db}.{t.name} FOR SELECT USING 1 "
            f"TO ALL EXCEPT {ident(role)}" for t in TABLES]
    return out


def tenant_sql(tenant: str, database: str, password_hash: str, salt: str) -> list[str]:
    """One tenant's user (re-running sets its password again) and its row policy on every tenant table."""
    db = check_database_name(database)
    user = user_name(tenant)
    role = TENANT_ROLE
    policy = user
    out = [
        f"CREATE USER IF NOT EXISTS {ident(user)} IDENTIFIED WITH sha256_hash BY {literal(password_hash)} "
        f"SALT {literal(salt)} DEFAULT DATABASE {db} SETTINGS readonly = {READONLY}",
        f"ALTER USER {ident(user)} IDENTIFIED WITH sha256_hash BY {literal(password_hash)} SALT {literal(salt)}",
        f"GRANT {ident(role)} TO {ident(user)}",
        f"ALTER USER {ident(user)} DEFAULT ROLE {ident(role)}",
    ]
    for table in TABLES:
        out.append(f"CREATE ROW POLICY OR REPLACE {ident(policy)} ON {db}.{table.name} FOR SELECT "
                   f"USING {condition(table, tenant)} TO {ident(user)}")
    return out


def drop_sql(tenant: str, database: str) -> list[str]:
    """Remove a tenant's user and policies (its data stays)."""
    db = check_database_name(database)
    user = user_name(tenant)
    return [f"DROP ROW POLICY IF EXISTS {ident(user)} ON {db}.{t.name}" for t in TABLES] + [
        f"DROP USER IF EXISTS {ident(user)}"]


def script(tenant: str, database: str, password_hash: str, salt: str) -> str:
    """The whole SQL for one tenant, shared part first, as `gpufleet tenants sql` prints it."""
    header = [
        f"-- gpufleet tenant isolation for tenant {literal(tenant)} in database {database}",
        f"-- user {user_name(tenant)}: read-only, sees only this tenant's rows (docs/security.md)",
        "-- shared part (idempotent, once per database):",
    ]
    body = [s + ";" for s in setup_sql(database)] + ["-- this tenant:"] + [
        s + ";" for s in tenant_sql(tenant, database, password_hash, salt)]
    return "\n".join(header + body) + "\n"
