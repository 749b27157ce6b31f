"""Tenant isolation: the SQL `gpufleet tenants` writes, and proof on the engine that a tenant sees only its rows.

chDB has no SQL user management (no writable access storage: `CREATE USER` and `CREATE ROW POLICY`
are refused), so what runs here is:
- the SQL, exactly, and every statement parsed by the engine's own parser (`formatQuery`);
- each tenant name written as a literal that the engine reads back byte for byte;
- every table with a tenant column in the migrated schema covered by a policy;
- the isolation itself, on the real engine and schema: a child process opens the store as a user
  whose row filters are the policies' exact conditions and whose grants are the tenant role's
  (ClickHouse's users.xml form of the same row policies and grants): it sees one tenant's rows in
  every table and view, is refused the tables it is not granted, and cannot write.
What is not run here (no server): `CREATE USER`/`ROLE`/`ROW POLICY` executing, and the operators'
policy `TO ALL EXCEPT gpufleet_tenants` (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from click.testing import CliRunner

from gpufleet.cli import cli
from gpufleet.pipeline.commands.tenants import tenants as tenants_cli
from gpufleet.pipeline.store import tenants
from tests.security import HOSTILE, kafka_debug_logging

pytestmark = pytest.mark.integration  # starts a server or a process

REPO = Path(__file__).resolve().parents[2]
H, S = "ab" * 32, "cd" * 16
"""A fixed password hash and salt for the exact-SQL assertions."""


def test_the_sql_for_one_tenant_is_exactly_the_documented_sql() -> None:
    u = "`gpufleet_t_acme_" + hashlib.sha256(b"acme").hexdigest()[:10] + "`"
    rollups = ("fleet_usage_1m", "fleet_usage_1h", "job_usage_1h", "job_throughput_1m", "job_throughput_1h",
               "stall_candidates_1h", "gpu_health_1m", "gpu_health_1h",
               "gpu_health_events", "gpu_xid_events")
    grants = [f"GRANT SELECT ON gpufleet.{t} TO `gpufleet_tenants`" for t in (
        "gpu_samples", "gpu_usage_1m", "gpu_usage_1h", "gpu_latest", "gpu_claim_homes", *rollups,
        "billing_statements", "billing_adjustments", "usage_hourly_stored", "alerts", "usage_hourly", "billing_policy",
        "gpu_claim_outranked")]
    tables = ["gpu_samples", "gpu_usage_1m", "gpu_usage_1h", "gpu_latest", "gpu_claim_homes", *rollups,
              "billing_statements", "billing_adjustments", "usage_hourly_stored", "alerts"]
    assert tenants.setup_sql("gpufleet") == [
        "CREATE ROLE IF NOT EXISTS `gpufleet_tenants`", *grants,
        *[f"CREATE ROW POLICY OR REPLACE `gpufleet_operators` ON gpufleet.{t} FOR SELECT USING 1 "
          "TO ALL EXCEPT `gpufleet_tenants`" for t in tables],
    ]
    assert tenants.tenant_sql("acme", "gpufleet", H, S) == [
        f"CREATE USER IF NOT EXISTS {u} IDENTIFIED WITH sha256_hash BY '{H}' SALT '{S}' "
        "DEFAULT DATABASE gpufleet SETTINGS readonly = 2",
        f"ALTER USER {u} IDENTIFIED WITH sha256_hash BY '{H}' SALT '{S}'",
        f"GRANT `gpufleet_tenants` TO {u}",
        f"ALTER USER {u} DEFAULT ROLE `gpufleet_tenants`",
        *[f"CREATE ROW POLICY OR REPLACE {u} ON gpufleet.{t} FOR SELECT USING tenant = 'acme' TO {u}"
          for t in tables[:-1]],
        f"CREATE ROW POLICY OR REPLACE {u} ON gpufleet.alerts FOR SELECT USING labels['tenant'] = 'acme' TO {u}",
    ]


CLUSTER = "gf_2x2"
"""A 2-shard x 2-replica cluster, as tests/pipeline/test_sharding.py names it."""
SHARDED_TENANT_TABLES = ("gpu_samples", "gpu_usage_1m", "gpu_usage_1h", "gpu_latest", "gpu_claim_homes",
                         "fleet_usage_1m", "fleet_usage_1h", "job_usage_1h", "job_throughput_1m", "job_throughput_1h",
                         "stall_candidates_1h", "gpu_health_1m", "gpu_health_1h", "gpu_health_events", "gpu_xid_events")
"""The tenant tables split over the shards (each a Distributed table over its `_local` one)."""


def test_the_sql_on_a_cluster_runs_on_every_server_and_covers_the_local_tables() -> None:
    # a shard runs its part of a query on gpufleet.T_local, as the querying user: that table needs the grant
    # and the policies too; billing_statements, billing_adjustments, usage_hourly_stored, alerts are global (no
    # _local table)
    u = "`gpufleet_t_acme_" + hashlib.sha256(b"acme").hexdigest()[:10] + "`"
    on = "ON CLUSTER 'gf_2x2'"
    both = [n for t in SHARDED_TENANT_TABLES for n in (t, t + "_local")]
    grants = [f"GRANT {on} SELECT ON gpufleet.{t} TO `gpufleet_tenants`" for t in (
        *both, "billing_statements", "billing_adjustments", "usage_hourly_stored", "alerts", "usage_hourly",
        "billing_policy", "gpu_claim_outranked")]
    tables = [*both, "billing_statements", "billing_adjustments", "usage_hourly_stored"]
    assert tenants.setup_sql("gpufleet", CLUSTER) == [
        f"CREATE ROLE IF NOT EXISTS `gpufleet_tenants` {on}",
        f"ALTER ROLE `gpufleet_tenants` {on} SETTINGS distributed_product_mode = 'global'",
        *grants,
        *[f"CREATE ROW POLICY OR REPLACE `gpufleet_operators` {on} ON gpufleet.{t} FOR SELECT USING 1 "
          "TO ALL EXCEPT `gpufleet_tenants`" for t in [*tables, "alerts"]],
    ]
    assert len(grants) == 37
    assert tenants.tenant_sql("acme", "gpufleet", H, S, CLUSTER) == [
        f"CREATE USER IF NOT EXISTS {u} {on} IDENTIFIED WITH sha256_hash BY '{H}' SALT '{S}' "
        "DEFAULT DATABASE gpufleet SETTINGS readonly = 2",
        f"ALTER USER {u} {on} IDENTIFIED WITH sha256_hash BY '{H}' SALT '{S}'",
        f"GRANT {on} `gpufleet_tenants` TO {u}",
        f"ALTER USER {u} {on} DEFAULT ROLE `gpufleet_tenants`",
        *[f"CREATE ROW POLICY OR REPLACE {u} {on} ON gpufleet.{t} FOR SELECT USING tenant = 'acme' TO {u}"
          for t in tables],
        f"CREATE ROW POLICY OR REPLACE {u} {on} ON gpufleet.alerts FOR SELECT USING labels['tenant'] = 'acme' TO {u}",
    ]
    assert tenants.drop_sql("acme", "gpufleet", CLUSTER) == [
        *[f"DROP ROW POLICY IF EXISTS {u} {on} ON gpufleet.{t}" for t in [*tables, "alerts"]],
        f"DROP USER IF EXISTS {u} {on}"]


def test_the_sql_without_a_cluster_is_byte_for_byte_unchanged() -> None:
    # digest computed with the tenants module as it was before clusters (git show of its previous version),
    # then with usage_hourly_stored (migration 0090) in TABLES; without it the digest is still aad9b95e...;
    # then with job_throughput_1m/_1h (0100) after job_usage_1h (with 0090 alone: e53fe127...), then with
    # stall_candidates_1h (0108) after them (without it: d6622d54...)
    text = tenants.script("acme", "gpufleet", H, S) + "\n".join(tenants.drop_sql("a'b", "gpufleet"))
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "77369d15509d9e82c0eb9c38bcaece83d0b880878dbead5d76a0b63cb82b039a")
    assert tenants.script("acme", "gpufleet", H, S, None) == tenants.script("acme", "gpufleet", H, S)


def test_every_cluster_statement_parses_in_the_clickhouse_engine(ch_client) -> None:
    kinds = {"CREATE ROLE": "CreateRoleQuery", "ALTER ROLE": "CreateRoleQuery", "GRANT": "GrantQuery",
             "CREATE USER": "CreateUserQuery", "ALTER USER": "CreateUserQuery",
             "CREATE ROW POLICY": "CREATE ROW POLICY or ALTER ROW POLICY query",
             "DROP ROW POLICY": "DROP ROW POLICY query", "DROP USER": "DROP USER query"}
    for h in ("acme", *HOSTILE):
        statements = (tenants.setup_sql("gpufleet", CLUSTER) + tenants.tenant_sql(h, "gpufleet", H, S, CLUSTER)
                      + tenants.drop_sql(h, "gpufleet", CLUSTER))
        assert len(statements) == 2 + 37 + 34 + 4 + 34 + 35
        for statement in statements:
            ast = ch_client.query(f"EXPLAIN AST {statement}").result_rows[0][0]
            kind = next(v for k, v in kinds.items() if statement.startswith(k))
            assert ast.startswith(kind), (ast, statement)
            formatted = ch_client.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows
            assert "ON CLUSTER gf_2x2" in formatted[0][0], formatted


def test_tenants_sql_on_a_cluster_config_prints_the_cluster_script(tmp_path: Path) -> None:
    config = tmp_path / "gpufleet.yaml"
    config.write_text(f"clickhouse: {{dsn: 'chdb://{tmp_path / 'store'}', cluster: gf_2x2}}\n")
    pw = tmp_path / "acme.pw"
    result = CliRunner().invoke(tenants_cli, ["sql", "--tenant", "acme", "--password-file", str(pw),
                                              "--config", str(config)], env={"GPUFLEET_CONFIG": ""})
    assert result.exit_code == 0, result.output
    salt = re.search(r"SALT '([0-9a-f]{32})'", result.stdout).group(1)
    digest = hashlib.sha256((pw.read_text().rstrip("\n") + salt).encode()).hexdigest()
    assert result.stdout == tenants.script("acme", "gpufleet", digest, salt, CLUSTER)
    assert result.stdout.startswith("-- gpufleet tenant isolation for tenant 'acme' in database gpufleet "
                                    "on cluster gf_2x2\n")
    assert result.stdout.count(" ON CLUSTER 'gf_2x2'") == 2 + 37 + 34 + 4 + 34


def test_hostile_tenant_names_become_escaped_literals_and_safe_user_names() -> None:
    assert tenants.literal("a'b\\c\x00\n") == "'a\\'b\\\\c\\x00\\x0a'"
    assert tenants.user_name("'); DROP TABLE x; --") == "gpufleet_t_drop_table_x_" + hashlib.sha256(
        b"'); DROP TABLE x; --").hexdigest()[:10]
    assert tenants.user_name("\u4e2d\u6587") == "gpufleet_t_" + hashlib.sha256("\u4e2d\u6587".encode()).hexdigest()[:10]
    assert len({tenants.user_name(h) for h in HOSTILE}) == len(HOSTILE)
    for h in HOSTILE:
        assert re.fullmatch(r"gpufleet_t_[a-z0-9_]+", tenants.user_name(h))
    with pytest.raises(ValueError, match="empty"):
        tenants.user_name("")


def test_the_engine_reads_each_literal_back_byte_for_byte_and_parses_every_statement(ch_client) -> None:
    for h in HOSTILE:
        assert ch_client.query("SELECT " + tenants.literal(h)).result_rows == [(h,)], repr(h)
        for statement in tenants.setup_sql("gpufleet") + tenants.tenant_sql(h, "gpufleet", H, S) + \
                tenants.drop_sql(h, "gpufleet"):
            formatted = ch_client.query("SELECT formatQuery({q:String})", parameters={"q": statement})
            assert formatted.result_rows[0][0].split(" ")[0] == statement.split(" ")[0]  # parsed, same statement


def test_every_table_with_tenant_rows_has_a_policy(ch_target, ch_client) -> None:
    rows = ch_client.query(
        "SELECT t.name, t.engine FROM system.tables AS t WHERE t.database = {db:String} AND t.name IN "
        "(SELECT table FROM system.columns WHERE database = {db:String} AND (name = 'tenant' OR name = 'labels'))",
        parameters={"db": ch_target.database}).result_rows
    stored = {name for name, engine in rows if engine not in ("View", "MaterializedView", "Null")}
    views = {name for name, engine in rows if engine == "View"}
    assert stored == {t.name for t in tenants.TABLES}
    assert views == set(tenants.VIEWS)


# -- isolation on the engine ----------------------------------------------------------------------------

TENANTS = ("acme", "'); DROP TABLE x; --", "b\\e'ta")

_WRITE = textwrap.dedent("""
    import datetime as dt, json, sys, time
    from gpufleet.config import Config, with_clickhouse
    from gpufleet.pipeline.alerts.evaluator import Evaluator
    from gpufleet.pipeline.alerts.rules import parse_rules
    from gpufleet.pipeline.queries.billing import close_period
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
    from gpufleet.pipeline.ingest.rows import insert_reports
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.client import Target, connect
    from gpufleet.pipeline.queries.policy import sync_policy
    from tests.builders import gpu, report
    dsn, db, tenants = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = connect(Target(dsn, db), create=True)
    migrate(client, SchemaOptions(database=db, raw_ttl_days=3650))
    store = Store(client, db)
    now = int(time.time()) // 60 * 60000
    month_start = dt.datetime.now(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_month = (month_start - dt.timedelta(days=1)).replace(day=5)  # the 5th of the month before this one
    owners = {("n1", 0): tenants[0], ("n1", 1): tenants[1], ("n2", 0): tenants[2], ("n2", 1): None}
    def fleet(base, minutes, seq0):
        return [report(node=n, seq=seq0 + k, time_ms=base + k * 60000, interval_ms=60000,
                       gpus=[gpu(i, n, tenant=owners[(n, i)], job="j", compute_processes=0) for i in (0, 1)])
                for n in ("n1", "n2") for k in range(1, minutes + 1)]
    insert_reports(store, fleet(int(last_month.timestamp() * 1000), 3, 0), now)
    sync_policy(store, Config().billing, now)
    close_period(store, last_month.strftime("%Y-%m"), now)
    insert_reports(store, fleet(now - 10 * 60000, 5, 100), now)  # after the close: never in its statements
    rules = parse_rules({"rules": [{"name": "Held", "kind": "gpu_held_no_process", "severity": "warning",
                                    "for": "2m", "annotations": {"summary": "{tenant}"}}]})
    Evaluator(with_clickhouse(Config(), dsn, db), store, rules=rules).evaluate_once(now - 5 * 60000 + 1000)
    client.command(f"INSERT INTO {db}.dead_letters (topic, reason, payload) VALUES ('t', 'r', 'secret payload')")
    print(json.dumps(sorted(r[0] for r in client.query(f"SELECT DISTINCT tenant FROM {db}.gpu_samples").result_rows)))
""")

_READ = textwrap.dedent("""
    import json, sys
    import chdb
    path, config, db = sys.argv[1], sys.argv[2], sys.argv[3]
    conn = chdb.connect(f"file:{path}?config-file={config}")
    cur = conn.cursor()
    out = {}
    for name, sql in json.loads(sys.argv[4]).items():
        try:
            cur.execute(sql.replace("{db}", db))
            out[name] = [list(map(str, row)) for row in cur.fetchall()]
        except Exception as exc:
            out[name] = "ERROR " + str(exc).splitlines()[0]
    print(json.dumps(out))
""")

QUERIES = {
    "samples": "SELECT DISTINCT tenant, count() OVER (PARTITION BY tenant) FROM {db}.gpu_samples",
    "usage_1m": "SELECT tenant, sum(samples) FROM {db}.gpu_usage_1m GROUP BY tenant",
    "usage_1h": "SELECT tenant, sum(samples) FROM {db}.gpu_usage_1h GROUP BY tenant",
    "latest": "SELECT tenant, count() FROM {db}.gpu_latest FINAL GROUP BY tenant",
    "claim_homes": "SELECT tenant, count() FROM {db}.gpu_claim_homes FINAL GROUP BY tenant",
    "usage_hourly": "SELECT tenant, sum(allocated_gpu_seconds) FROM {db}.usage_hourly GROUP BY tenant",
    "statements": "SELECT tenant, allocated_ms FROM {db}.billing_statements",
    "adjustments": "SELECT count() FROM {db}.billing_adjustments",
    "alerts": "SELECT labels['tenant'], count() FROM {db}.alerts FINAL WHERE state = 'firing' GROUP BY 1",
    "dead_letters": "SELECT count() FROM {db}.dead_letters",
    "agent_reports": "SELECT count() FROM {db}.agent_reports",
    "insert": "INSERT INTO {db}.gpu_samples (tenant) VALUES ('x')",
}


def _run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFLEET_", "PYTEST_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, env=env, cwd=REPO,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done.stdout.decode().strip().splitlines()[-1]


def users_xml(tenant: str, database: str) -> str:
    """The engine's users.xml form of the tenant user: the policies' conditions as row filters, the role's grants."""
    filters = "".join(f"<{t.name}><filter>{escape(tenants.condition(t, tenant))}</filter></{t.name}>"
                      for t in tenants.TABLES)
    grants = "".join(f"<query>GRANT SELECT ON {database}.{t}</query>" for t in tenants.readable_tables())
    return (
        "<clickhouse><users><default><password></password><networks><ip>::/0</ip></networks>"
        f"<profile>tenant</profile><quota>default</quota><grants>{grants}</grants>"
        f"<databases><{database}>{filters}</{database}></databases></default></users>"
        f"<profiles><default/><tenant><readonly>{tenants.READONLY}</readonly></tenant></profiles>"
        "<quotas><default/></quotas></clickhouse>"
    )


@pytest.mark.parametrize("who", [0, 2], ids=["acme", "hostile"])
def test_a_tenant_user_sees_only_its_own_rows_on_the_engine(tmp_path: Path, who: int) -> None:
    store, db = tmp_path / "store", "gpufleet"
    assert json.loads(_run(_WRITE, f"chdb://{store}", db, json.dumps(TENANTS))) == sorted(["", *TENANTS])
    tenant = TENANTS[who]
    (tmp_path / "users.xml").write_text(users_xml(tenant, db))
    (tmp_path / "config.xml").write_text(f"<clickhouse><users_config>{tmp_path / 'users.xml'}</users_config>"
                                         "</clickhouse>")
    got = json.loads(_run(_READ, str(store), str(tmp_path / "config.xml"), db, json.dumps(QUERIES)))
    # By hand: the tenant's one GPU reported 3 minutes last month (billed, 180 s) and 5 minutes recently.
    assert got["samples"] == [[tenant, "8"]]
    assert got["usage_1m"] == [[tenant, "8"]]
    assert got["usage_1h"] == [[tenant, "8"]]
    assert got["latest"] == [[tenant, "1"]]
    assert got["claim_homes"] == [[tenant, "1"]]
    assert got["usage_hourly"] == [[tenant, "480.0"]]
    assert got["statements"] == [[tenant, "180000"]]
    assert got["adjustments"] == [["0"]]
    assert got["alerts"] == [[tenant, "1"]]
    for denied in ("dead_letters", "agent_reports"):
        assert "ACCESS_DENIED" in got[denied], got[denied]
    assert got["insert"].startswith("ERROR"), got["insert"]


# -- the command -----------------------------------------------------------------------------------------


def test_tenants_sql_prints_the_script_and_keeps_the_password_in_its_file(tmp_path: Path) -> None:
    pw = tmp_path / "acme.pw"
    result = CliRunner().invoke(tenants_cli, ["sql", "--tenant", "acme", "--password-file", str(pw),
                                              "--database", "gpufleet"], env={"GPUFLEET_CONFIG": ""})
    assert result.exit_code == 0, result.output
    password = pw.read_text().rstrip("\n")
    assert len(password) >= 40
    assert stat.S_IMODE(pw.stat().st_mode) == 0o600
    assert password not in result.stdout
    salt = re.search(r"SALT '([0-9a-f]{32})'", result.stdout).group(1)
    digest = hashlib.sha256((password + salt).encode()).hexdigest()
    expected = tenants.script("acme", "gpufleet", digest, salt)
    assert result.stdout == expected
    assert expected.count(f"BY '{digest}' SALT '{salt}'") == 2
    # A second run reuses the password in the file (and draws a new salt).
    again = CliRunner().invoke(tenants_cli, ["sql", "--tenant", "acme", "--password-file", str(pw)],
                               env={"GPUFLEET_CONFIG": ""})
    salt2 = re.search(r"SALT '([0-9a-f]{32})'", again.stdout).group(1)
    assert salt2 != salt
    assert f"BY '{hashlib.sha256((password + salt2).encode()).hexdigest()}'" in again.stdout


def test_tenants_create_on_chdb_says_a_server_is_needed(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["tenants", "create", "--tenant", "acme", "--password-file", str(tmp_path / "p"),
                                      "--dsn", f"chdb://{tmp_path / 'store'}"], env={"GPUFLEET_CONFIG": ""})
    assert result.exit_code == 2
    assert "chDB (the embedded engine) has no user management" in result.output
    assert "gpufleet tenants sql" in result.output
    assert not (tmp_path / "p").exists()


def test_the_cli_registers_the_group() -> None:
    with kafka_debug_logging():  # the group's callback sets logger levels: restore them for later tests
        result = CliRunner().invoke(cli, ["tenants", "--help"])
    assert result.exit_code == 0
    assert "create" in result.output
    assert "sql" in result.output

