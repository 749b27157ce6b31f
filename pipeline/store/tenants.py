"""Tenant isolation in ClickHouse: a read-only user per tenant that sees only its own rows (pure SQL builders).

On a cluster (`cluster` given) every statement runs ON CLUSTER, and the grants and policies cover each
sharded table's `_local` table too: a shard reads it as the querying user. None: a single server.
Design notes: docs/design-notes.md#pipeline-store-tenants-py.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Final

from gpufleet.pipeline.store.client import CLUSTER_SETTINGS, check_database_name
from gpufleet.pipeline.store.sharding import LOCAL_SUFFIX, SHARDED

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
    TenantTable("job_throughput_1m", "tenant"),
    TenantTable("job_throughput_1h", "tenant"),
    TenantTable("stall_candidates_1h", "tenant"),
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


def _on_cluster(cluster: str | None) -> str:
    return f" ON CLUSTER {literal(cluster)}" if cluster else ""


def _names(name: str, cluster: str | None) -> tuple[str, ...]:
    """`name`, and on a cluster its local table where it is sharded (the shards read that, as the same user)."""
    return (name, name + LOCAL_SUFFIX) if cluster and name in SHARDED else (name,)


def setup_sql(database: str, cluster: str | None = None) -> list[str]:
    """The shared part, run once per database (idempotent): the tenants' role, its grants, the operators' policy.

    On a cluster the role also carries `CLUSTER_SETTINGS`, so a tenant's Grafana reads `usage_hourly` as the store does.
    """
    db = check_database_name(database)
    role = TENANT_ROLE
    on = _on_cluster(cluster)
    out = [f"CREATE ROLE IF NOT EXISTS {ident(role)}{on}"]
    if cluster:
        settings = ", ".join(f"{k} = {literal(v)}" for k, v in CLUSTER_SETTINGS.items())
        out.append(f"ALTER ROLE {ident(role)}{on} SETTINGS {settings}")
    out += [f"GRANT{on} SELECT ON {db}.{name} TO {ident(role)}"
            for table in readable_tables() for name in _names(table, cluster)]
    policy = OPERATORS_POLICY
    out += [f"CREATE ROW POLICY OR REPLACE {ident(policy)}{on} ON {db}.{name} FOR SELECT USING 1 "
            f"TO ALL EXCEPT {ident(role)}" for t in TABLES for name in _names(t.name, cluster)]
    return out


def tenant_sql(tenant: str, database: str, password_hash: str, salt: str, cluster: str | None = None) -> list[str]:
    """One tenant's user (re-running sets its password again) and its row policy on every tenant table."""
    db = check_database_name(database)
    user = user_name(tenant)
    role = TENANT_ROLE
    policy = user
    on = _on_cluster(cluster)
    out = [
        f"CREATE USER IF NOT EXISTS {ident(user)}{on} IDENTIFIED WITH sha256_hash BY {literal(password_hash)} "
        f"SALT {literal(salt)} DEFAULT DATABASE {db} SETTINGS readonly = {READONLY}",
        f"ALTER USER {ident(user)}{on} IDENTIFIED WITH sha256_hash BY {literal(password_hash)} SALT {literal(salt)}",
        f"GRANT{on} {ident(role)} TO {ident(user)}",
        f"ALTER USER {ident(user)}{on} DEFAULT ROLE {ident(role)}",
    ]
    for table in TABLES:
        out += [f"CREATE ROW POLICY OR REPLACE {ident(policy)}{on} ON {db}.{name} FOR SELECT "
                f"USING {condition(table, tenant)} TO {ident(user)}" for name in _names(table.name, cluster)]
    return out


def drop_sql(tenant: str, database: str, cluster: str | None = None) -> list[str]:
    """Remove a tenant's user and policies (its data stays)."""
    db = check_database_name(database)
    user = user_name(tenant)
    on = _on_cluster(cluster)
    return [f"DROP ROW POLICY IF EXISTS {ident(user)}{on} ON {db}.{name}"
            for t in TABLES for name in _names(t.name, cluster)] + [f"DROP USER IF EXISTS {ident(user)}{on}"]


def script(tenant: str, database: str, password_hash: str, salt: str, cluster: str | None = None) -> str:
    """The whole SQL for one tenant, shared part first, as `gpufleet tenants sql` prints it."""
    header = [
        f"-- gpufleet tenant isolation for tenant {literal(tenant)} in database {database}"
        + (f" on cluster {cluster}" if cluster else ""),
        f"-- user {user_name(tenant)}: read-only, sees only this tenant's rows (docs/security.md)",
        "-- shared part (idempotent, once per database):",
    ]
    body = [s + ";" for s in setup_sql(database, cluster)] + ["-- this tenant:"] + [
        s + ";" for s in tenant_sql(tenant, database, password_hash, salt, cluster)]
    return "\n".join(header + body) + "\n"
