"""`gpufleet tenants`: per-tenant read-only ClickHouse users with row policies (`create`), or their SQL (`sql`).

The tenant's password lives in the file `--password-file` names: read when it exists, else
generated (32 random bytes, URL-safe) and written there with mode 0600. It is never printed; the
SQL carries only its salted SHA-256 hash. docs/security.md explains the design and the Grafana side.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from gpufleet.errors import StoreError, UsageError, first_line
from gpufleet.pipeline.commands.common import load_config, read_options, resolve, target_options
from gpufleet.pipeline.store import tenants as tenants_mod

PASSWORD_FILE = click.option(
    "--password-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The tenant user's password: read if the file exists, else generated and written there (mode 0600).",
)
TENANT = click.option("--tenant", required=True, help="The tenant, exactly as the allocation source names it.")


def read_or_create_password(path: Path) -> tuple[str, bool]:
    """The password in `path` (without its trailing newline), creating the file with a new one if missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_password(path), False
    except OSError as exc:
        raise UsageError(f"cannot create --password-file {path}: {exc.strerror}") from None
    password = tenants_mod.new_password()
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password, True


def _read_password(path: Path) -> str:
    try:
        password = path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise UsageError(f"cannot read --password-file {path}: {exc.strerror}") from None
    if not password:
        raise UsageError(f"--password-file {path} is empty: delete it to have one generated")
    return password


@click.group("tenants")
def tenants() -> None:
    """Tenant isolation: read-only ClickHouse users that see only their own tenant's rows (docs/security.md)."""


@tenants.command("sql")
@TENANT
@PASSWORD_FILE
@read_options
def sql_cmd(tenant: str, password_file: Path, config_path: str | None, dsn: str | None, database: str | None,
            data_dir: Path) -> None:
    """Print the SQL that `tenants create` runs (for clickhouse-client or a review); changes nothing in ClickHouse."""
    target = resolve(config_path, dsn, database, data_dir).target
    password, created = read_or_create_password(password_file)
    salt = tenants_mod.new_salt()
    click.echo(tenants_mod.script(tenant, target.database, tenants_mod.password_hash(password, salt), salt,
                                  target.cluster), nl=False)
    if created:
        click.echo(f"-- wrote a new password to {password_file}", err=True)


@tenants.command("create")
@TENANT
@PASSWORD_FILE
@target_options
def create_cmd(tenant: str, password_file: Path, config_path: str | None, dsn: str | None,
               database: str | None) -> None:
    """Create (or update) the tenant's read-only user and its row policies on the ClickHouse server."""
    from gpufleet.pipeline.store.client import connect

    _, target = load_config(config_path, dsn, database)
    if target.embedded:
        raise UsageError(
            "chDB (the embedded engine) has no user management: tenant users need a ClickHouse server "
            "(--dsn http(s)://admin@host:8123); `gpufleet tenants sql` prints the statements")
    client = connect(target)
    password, created = read_or_create_password(password_file)
    salt = tenants_mod.new_salt()
    statements = tenants_mod.setup_sql(target.database, target.cluster) + tenants_mod.tenant_sql(
        tenant, target.database, tenants_mod.password_hash(password, salt), salt, target.cluster)
    for n, statement in enumerate(statements, 1):
        try:
            client.command(statement)
        except Exception as exc:
            raise StoreError(
                f"statement {n} of {len(statements)} ({' '.join(statement.split(' ', 3)[:3])} ...) failed on "
                f"{target.where()}: {first_line(exc)}; the connecting user needs ACCESS MANAGEMENT "
                "(access_management = 1) and the grants it hands on") from None
    user = tenants_mod.user_name(tenant)
    where = "a new password was written to" if created else "its password is in"
    click.echo(f"tenant {tenant!r}: user {user} sees only its rows in {len(tenants_mod.TABLES)} tables; "
               f"{where} {password_file}")
