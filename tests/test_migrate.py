"""Migrations apply on chDB, are idempotent, and refuse an applied file that changed."""

from __future__ import annotations

import pytest

from gpufleet.pipeline.store import migrate as mig
from gpufleet.pipeline.store.client import StoreError, Target, redact


def test_migrate_twice_applies_nothing_the_second_time(ch_client, ch_target: Target) -> None:
    assert mig.migrate(ch_client, mig.SchemaOptions(database=ch_target.database)) == []
    tables = {
        r[0]
        for r in ch_client.query(
            "SELECT name FROM system.tables WHERE database = {d:String}", parameters={"d": ch_target.database}
        ).result_rows
    }
    assert {"gpu_samples", "agent_reports", "dead_letters", "schema_migrations"} <= tables


def test_changed_migration_is_refused(ch_client, ch_target: Target, monkeypatch) -> None:
    real = mig.available()
    changed = [mig.Migration(m.version, m.name, m.sql + "\n-- edited") for m in real]
    monkeypatch.setattr(mig, "available", lambda: changed)
    with pytest.raises(mig.MigrationError, match="changed after it was applied"):
        mig.migrate(ch_client, mig.SchemaOptions(database=ch_target.database))


def test_cluster_variant_uses_replicated_engines_on_cluster() -> None:
    opts = mig.SchemaOptions(database="gf", cluster="prod")
    sql = "\n".join(s for m in mig.available() for s in mig.statements(m, opts))
    assert "ReplicatedMergeTree" in sql
    assert "ON CLUSTER 'prod'" in sql
    assert " MergeTree" not in sql.replace("ENGINE = ReplicatedMergeTree", "")


def test_redact_hides_password() -> None:
    assert redact("https://bob:s3cr3t@ch:8443/db") == "https://bob:***@ch:8443/db"


def test_bad_database_name_is_refused() -> None:
    from gpufleet.pipeline.store.client import connect

    with pytest.raises(StoreError, match="not allowed"):
        connect(Target(dsn="chdb://memory", database="x; DROP TABLE y"))


def test_percent_encoded_password_never_appears_in_the_error() -> None:
    from gpufleet.pipeline.store.client import connect

    with pytest.raises(StoreError) as err:
        connect(Target(dsn="http://bob:p%40ss%3Aw0rd@127.0.0.1:1/db"))
    text = str(err.value)
    assert "127.0.0.1:1" in text
    for secret in ("p%40ss%3Aw0rd", "p@ss:w0rd"):
        assert secret not in text
