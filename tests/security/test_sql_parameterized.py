"""Every SQL statement in pipeline/ takes outside values as bound parameters, never by string interpolation.

The test reads the source (Python's own `ast`, no execution): every f-string, `str.format` call,
`%` formatting and `+` concatenation whose literal text looks like SQL is found, and each
expression spliced into it must be listed in `ALLOWED` for that file, with the reason it is safe
(an identifier checked elsewhere, or a fragment built from constants in the same module). A new
interpolation fails here until someone either binds it as a parameter (`{name:Type}` plus
`parameters=`) or adds it to `ALLOWED` with its reason, which a reviewer then sees. Queries name
their database as the bound `{db:Identifier}` (pipeline/store/store.py); only DDL splices it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("pipeline", "embedded", "gpufleet")

SQL = re.compile(
    r"\b(SELECT|FROM|WHERE|GROUP BY|ORDER BY|HAVING|INSERT|CREATE|ALTER|DROP|TRUNCATE|OPTIMIZE|GRANT|REVOKE|JOIN|"
    r"ARRAY JOIN|UNION|SETTINGS|ON CLUSTER|AND|OR|IS NULL|IN|AS|LIMIT|FINAL|USING|VALUES)\b|\{\w+:\w+"
)
"""Uppercase SQL words or a `{name:Type}` parameter in the literal text: the string is (part of) a statement."""

IDENT = "database name: store.check_database_name / config_check refuse anything but [A-Za-z_][A-Za-z0-9_]*"
CLUSTER = "clickhouse.cluster from the operator's config: config_check refuses anything but a cluster name"
CONST = "SQL fragment built in this module from constants only (no caller-supplied text)"
COLUMNS = "column list from a module-level tuple of column names"
TABLE = "table name built from the checked database name and a constant or a hash"
WINDOW = "queries.window's filter: constant text with the bound parameters {w_start:Int64}/{w_end:Int64}"
FORMULA = "a shared formula from pipeline/queries/formulas.py: constant SQL over rollup columns"
FRAGMENT_ARG = "SQL its callers pass from constants: bound-parameter placeholders or Grafana macros"
BY = "rule.by: validated as Literal['cluster', 'tenant']"

DDL_MODULES = ("pipeline/store/migrate.py", "pipeline/store/tenants.py", "pipeline/ingest/staging.py",
               "pipeline/store/sharding.py")
"""The only modules that splice the database name: DDL, which cannot bind an identifier (a view's
SELECT keeps no parameters). Every query names its database as `{db:Identifier}`, bound by `Store`."""

ALLOWED: dict[tuple[str, str], str] = {
    # database names, in DDL only
    ("pipeline/store/migrate.py", "db"): IDENT,
    ("pipeline/store/tenants.py", "db"): IDENT,
    ("pipeline/ingest/staging.py", "database"): IDENT,
    # ON CLUSTER
    ("pipeline/store/migrate.py", "self.cluster"): CLUSTER,
    ("pipeline/store/migrate.py", "on_cluster"): CLUSTER,
    ("pipeline/ingest/staging.py", "cluster"): CLUSTER,
    ("pipeline/ingest/staging.py", "on_cluster"): CLUSTER,
    ("pipeline/store/migrate.py", "options.substitutions()['on_cluster']"): CLUSTER,
    ("pipeline/store/sharding.py", "db"): IDENT,
    ("pipeline/store/sharding.py", "cluster"): CLUSTER,
    ("pipeline/store/sharding.py", "name"): "a table name, a key of the SHARDED constant",
    ("pipeline/store/sharding.py", "create"): CONST,
    ("pipeline/store/sharding.py", "LOCAL_SUFFIX"): CONST,
    ("pipeline/store/sharding.py", "args"): "the cluster and database names (checked as above), a SHARDED table "
                                            "name and its constant sharding key",
    ("pipeline/store/migrate.py", "engine"): CONST,
    ("pipeline/store/migrate.py", "options.substitutions()['replicated']"): CONST,
    # shared formulas
    ("pipeline/queries/formulas.py", "FIRST_START_MS"): CONST,
    ("pipeline/queries/formulas.py", "since_ms"): FRAGMENT_ARG,
    ("pipeline/queries/formulas.py", "cover_ms"): FRAGMENT_ARG,
    ("pipeline/queries/mfu.py", "formulas.ACHIEVED_FLOP"): FORMULA,
    ("pipeline/queries/mfu.py", "formulas.PEAK_FLOP"): FORMULA,
    ("pipeline/queries/mfu.py", "formulas.MFU"): FORMULA,
    ("pipeline/queries/waterfall.py", "formulas.ACHIEVED_FLOP"): FORMULA,
    ("pipeline/alerts/queries.py", "run=run_columns(_SUSTAINED)"): "candidate.run_columns() of the shared formula "
                                                                  "with bound placeholders",
    ("pipeline/alerts/candidate.py", "sustained"): FRAGMENT_ARG,
    # claims (pipeline/queries/claims.py): which claims billing leaves out, in a window or all time
    ("pipeline/queries/claims.py", "where"): "queries.window's WINDOW or ALL_TIME, passed by this package's callers",
    ("pipeline/queries/claims.py", "WINDOW if windowed else ALL_TIME"): WINDOW,
    ("pipeline/queries/usage.py", "not_outranked(WINDOW if windowed else ALL_TIME)"):
        "claims.not_outranked() over queries.window's filter: constant SQL with bound parameters",
    # fragments and column lists
    ("pipeline/alerts/queries.py", "column=rule.COLUMN"): "an agent_reports column fixed by the rule kind",
    ("pipeline/alerts/queries.py", "nvlink"): CONST,
    ("pipeline/alerts/queries.py", "_SAME_TENANT"): CONST,
    ("pipeline/alerts/queries.py", "window=_WINDOW"): CONST,
    ("pipeline/alerts/queries.py", "cond=shape.cond"): CONST,
    ("pipeline/alerts/queries.py", "having=shape.having"): CONST,
    ("pipeline/alerts/queries.py", "columns=''.join((f', {c}' for c in shape.columns))"): CONST,
    ("pipeline/alerts/queries.py", "extra=''.join((f',\\n       {e}' for e in shape.extra))"): CONST,
    ("pipeline/alerts/queries.py", "_TEMP_LIMIT"): CONST + " with bound placeholders",
    ("pipeline/alerts/queries.py", "_HOT_REASON"): CONST,
    ("pipeline/ingest/ledger.py", "TABLE"): "the constant table name ingest_batches",
    ("pipeline/ingest/ledger.py", "_FIELDS"): COLUMNS,
    ("pipeline/ingest/ledger.py", "_KEY"): CONST + " with bound placeholders",
    ("pipeline/queries/integrity.py", "_MINUTE_OF"): CONST,
    ("pipeline/queries/integrity.py", "_RANGE"): CONST + " with bound placeholders",
    # the alert gate (pipeline/alerts/gate.py): the rules' own constant fragments, their placeholders renamed
    ("pipeline/alerts/gate.py", "name"): "a column alias g<position of the rule>, built from an int",
    ("pipeline/alerts/gate.py", "cond"): "queries.gpu_candidates(): a constant candidate condition with bound "
                                         "placeholders (renamed by _scoped)",
    ("pipeline/alerts/gate.py", "CLAIM_SUSPECTS"): "queries.CLAIM_SUSPECTS: constant CTEs with bound placeholders",
    ("pipeline/alerts/gate.py", "sql"): "a gate subquery built here from constants (placeholders renamed by _scoped)",
    ("pipeline/alerts/gate.py", "', '.join(scalars)"): "the gate's columns, built here from the fragments above",
    ("pipeline/alerts/gate.py", "source"): "'system.one' or _GPU_FLAGS over the fragments above",
    ("pipeline/alerts/candidate.py", "column"): "a constant column name from the alert query builders",
    ("pipeline/alerts/node_queries.py", "_WINDOW"): CONST + " (candidate.time_window(): bound placeholders)",
    ("pipeline/alerts/node_queries.py", "run_columns(_SUSTAINED)"): "candidate.run_columns() of a constant with "
                                                                    "bound placeholders",
    ("pipeline/alerts/node_queries.py", "since_ms"): FRAGMENT_ARG,
    ("pipeline/alerts/node_queries.py", "cover_ms"): FRAGMENT_ARG,
    ("pipeline/alerts/node_queries.py", "after"): "a condition built in sustained_reports from its since_ms argument",
    ("pipeline/alerts/node_queries.py", "_PORT_KEYS"): COLUMNS,
    ("pipeline/alerts/node_queries.py", "c"): "a counter column name from the constant PORT_COUNTERS",
    ("pipeline/alerts/node_queries.py", "formulas.increase(c)"): FORMULA,
    ("pipeline/alerts/node_queries.py", "_first_rise(c)"): CONST,
    ("pipeline/alerts/node_queries.py", "', '.join((f'{formulas.increase(c)} AS inc_{c}' for c in PORT_COUNTERS))"):
        FORMULA,
    ("pipeline/alerts/node_queries.py", "', '.join((f'{_first_rise(c)} AS rise_{c}' for c in PORT_COUNTERS))"):
        CONST,
    ("pipeline/alerts/node_queries.py", "' OR '.join((f'inc_{c} >= {{min_{c}:Int64}}' for c in PORT_COUNTERS))"):
        CONST + " with bound placeholders",
    ("pipeline/alerts/queries.py", "candidate=shape.candidate"): CONST,
    ("pipeline/alerts/queries.py", "now=_ms('now_ms')"): "a bound parameter placeholder {now_ms:Int64}",
    ("pipeline/alerts/queries.py", "allocated=\" AND tenant != ''\" if rule.allocated_only else ''"): CONST,
    ("pipeline/alerts/queries.py", "group=f'GROUP BY {keys}\\n' if keys else ''"): BY,
    ("pipeline/alerts/queries.py", "order=f'\\nORDER BY {keys}' if keys else ''"): BY,
    ("pipeline/alerts/queries.py", "keys=''.join((f'{k}, ' for k in rule.by))"): BY,
    ("pipeline/alerts/queries.py", "keys"): BY,
    ("pipeline/alerts/queries.py", "mfu=formulas.MFU"): FORMULA,
    ("pipeline/queries/mfu.py", "WINDOW"): WINDOW,
    ("pipeline/queries/mfu.py", "_DB"): "the constant '{db:Identifier}.': the database as a bound parameter",
    ("pipeline/queries/mfu.py", "source"): "rollup rows built here from constants and queries.rollups (bound window)",
    ("pipeline/queries/rollups.py", "c"): COLUMNS + " (Levels.columns)",
    ("pipeline/queries/rollups.py", "exprs[c]"): "a constant expression of the module's Levels tables",
    ("pipeline/queries/rollups.py", "', '.join([f'{time_col} AS at', *cols])"): COLUMNS + " (Levels.columns)",
    ("pipeline/queries/rollups.py", "time_col"): "a constant time column of the module's Levels tables",
    ("pipeline/queries/rollups.py", "_select(levels, 'hour', columns)"): CONST,
    ("pipeline/queries/rollups.py", "_select(levels, 'minute', columns)"): CONST,
    ("pipeline/queries/rollups.py", "levels.hour_table"): "a constant table name of the module's Levels",
    ("pipeline/queries/rollups.py", "levels.minute_table"): "a constant table name of the module's Levels",
    ("pipeline/queries/rollups.py", "levels.hour_column"): "a constant time column of the module's Levels tables",
    ("pipeline/queries/rollups.py", "minute"): "a constant time column of the module's Levels tables",
    ("pipeline/queries/rollups.py", "h0"): CONST + " around the caller's range bounds",
    ("pipeline/queries/rollups.py", "h1"): CONST + " around the caller's range bounds",
    ("pipeline/queries/rollups.py", "hour_rows"): CONST,
    ("pipeline/queries/rollups.py", "minute_rows"): CONST,
    ("pipeline/queries/rollups.py", "prefix"): "'' or the constant '{db:Identifier}.' (the database bound)",
    ("pipeline/queries/rollups.py", "start"): FRAGMENT_ARG,
    ("pipeline/queries/rollups.py", "end"): FRAGMENT_ARG,
    ("pipeline/queries/rollups.py", "where"): FRAGMENT_ARG,
    ("pipeline/queries/rollups.py", "hourly"): FRAGMENT_ARG,
    ("pipeline/queries/health_events.py", "_SELECT"): CONST,
    ("pipeline/queries/health_events.py", "_OUT"): CONST,
    ("pipeline/queries/health_events.py", "late"): CONST,
    ("pipeline/queries/health_events.py", "in_range"): CONST,
    ("pipeline/queries/health_events.py", "from_events"): CONST,
    ("pipeline/queries/health_events.py", "from_samples"): CONST,
    ("pipeline/queries/health_events.py", "prefix"): "'' or the constant '{db:Identifier}.' (the database bound)",
    ("pipeline/queries/health_events.py", "start"): FRAGMENT_ARG,
    ("pipeline/queries/health_events.py", "end"): FRAGMENT_ARG,
    ("pipeline/queries/health_events.py", "where"): FRAGMENT_ARG,
    ("pipeline/queries/health_events.py", "changes(WINDOW_START, WINDOW_END, prefix='{db:Identifier}.')"):
        CONST + " with the bound window {w_start:Int64}/{w_end:Int64}",
    ("pipeline/queries/waterfall.py", "_GPU_SUMS"): CONST,
    ("pipeline/queries/waterfall.py", "WINDOW"): WINDOW,
    ("pipeline/queries/waterfall.py", "scope_sql"): CONST,
    ("pipeline/alerts/state.py", "_SELECT"): COLUMNS,
    ("pipeline/alerts/state.py", "_SEVERITY_ORDER"): CONST,
    ("pipeline/alerts/state.py", "c"): COLUMNS,
    ("pipeline/queries/fleet_health.py", "WINDOW"): WINDOW,
    ("pipeline/queries/mfu.py", "key"): "scope key from the constant _KEYS table",
    ("pipeline/queries/mfu.py", "rows"): "scope filter from the constant _KEYS table",
    ("pipeline/queries/window.py", "column"): "a constant column name of the rollups",
    ("pipeline/queries/usage.py", "_SELECT"): COLUMNS,
    ("pipeline/queries/usage.py", "_READ"): CONST + ": USAGE_COLUMNS, the hour formatted and the float columns checked",
    ("pipeline/queries/usage.py", "where"): "conditions from the constant _FILTERS table, each with bound parameters",
    ("pipeline/queries/usage.py", "WINDOW if windowed else ALL_TIME"): WINDOW + ", or ALL_TIME ('1')",
    ("pipeline/queries/usage.py", "STORED"): CONST + ": the stored usage table, read with FINAL",
    ("pipeline/queries/usage.py", "_BILLED_SELECT"): COLUMNS,
    ("pipeline/queries/usage.py", "_NEAR"): CONST + ": an array literal of integer offsets",
    ("pipeline/queries/usage.py", "NEAR_HOURS * 3600"): "an integer constant",
    ("pipeline/queries/usage.py", "_TOMBSTONE"): CONST + ": USAGE_COLUMNS with constant defaults",
    ("pipeline/queries/usage.py", "_VIEW"): "a placeholder replaced by Store.table('usage_hourly_at') (checked name)",
    ("pipeline/queries/usage.py", "c"): "a column name from the constant USAGE_COLUMNS",
    ("pipeline/queries/usage.py", "'NULL' if c in _NULLABLE else repr('') if c == 'mfu_source' else 0"):
        "a constant default (NULL, '' or 0) per column",
    ("pipeline/queries/billing.py", "usage.STORED"): CONST + ": queries.usage's stored table, read with FINAL",
    ("pipeline/queries/waterfall.py", "_HEALTHY"): CONST,
    ("pipeline/queries/waterfall.py", "IDLE_MS"): "queries.policy.IDLE_MS: constant text with the bound {idle_pct:UInt8}",
    ("pipeline/queries/waterfall.py", "name"): "a constant column name; its value is the bound parameter {s_<name>:String}",
    ("pipeline/alerts/queries.py", "formulas.increase('ecc_corrected_volatile')"): FORMULA,
    ("pipeline/alerts/queries.py", "formulas.increase('pcie_replay_count')"): FORMULA,
    ("pipeline/alerts/queries.py", "formulas.increase(nvlink)"): FORMULA,
    # job-level detectors (pipeline/queries/job_signals.py builds from fragments its callers pass)
    ("pipeline/queries/formulas.py", "column"): "a constant counter column name its callers pass (rose)",
    ("pipeline/queries/job_signals.py", "formulas.rose('pcie_replay_count')"): FORMULA,
    ("pipeline/queries/job_signals.py", "formulas.rose('nvlink_errors')"): FORMULA,
    ("pipeline/queries/formulas.py", "POWER_LIMIT_W"): CONST,
    ("pipeline/queries/formulas.py", "flops_below_ratio"): FRAGMENT_ARG,
    ("pipeline/queries/formulas.py", "power_below_ratio"): FRAGMENT_ARG,
    ("pipeline/queries/formulas.py", "sm_below"): FRAGMENT_ARG,
    ("pipeline/queries/formulas.py", "tensor_below"): FRAGMENT_ARG,
    ("pipeline/queries/formulas.py", "util_above"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "JOB_ROWS"): CONST,
    ("pipeline/queries/job_signals.py", "_ORDERED"): CONST,
    ("pipeline/queries/job_signals.py", "_RUN"): CONST,
    ("pipeline/queries/job_signals.py", "_SINCE"): CONST,
    ("pipeline/queries/job_signals.py", "_job_medians(samples, terms)"): CONST,
    ("pipeline/queries/job_signals.py", "below"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "breaks"): CONST,
    ("pipeline/queries/job_signals.py", "for_ms"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "formulas.POWER_LIMIT_W"): CONST,
    ("pipeline/queries/job_signals.py", "formulas.sustained(span.since_ms, span.cover_ms)"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "gap_ms"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "links"): CONST,
    ("pipeline/queries/job_signals.py", "median"): CONST,
    ("pipeline/queries/job_signals.py", "n"): "a constant threshold name from _STALL_NAMES / _STRAGGLER_NAMES",
    ("pipeline/queries/job_signals.py", "nvlink"): CONST,
    ("pipeline/queries/job_signals.py", "per_gpu"): CONST,
    ("pipeline/queries/job_signals.py", "power"): CONST,
    ("pipeline/queries/job_signals.py", "runs"): CONST,
    ("pipeline/queries/job_signals.py", "samples"): CONST,
    ("pipeline/queries/job_signals.py", "series"): CONST,
    ("pipeline/queries/job_signals.py", "span.fresh_ms"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "span.where"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "sustained"): FRAGMENT_ARG,
    # stall candidates (migration 0108): the rollup's pick, built from the same terms as the raw test
    ("pipeline/queries/job_signals.py", "db"): "the bound `{db:Identifier}.` placeholder, or nothing (boards)",
    ("pipeline/queries/job_signals.py", "start"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "end"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.util_above"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.tensor_below"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.sm_below"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.power_below_ratio"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.flops_below_ratio"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "candidates"): FRAGMENT_ARG + " (the candidates table and its range)",
    ("pipeline/queries/job_signals.py", "candidate_rows(terms)"): CONST,
    ("pipeline/queries/job_signals.py", "jobs"): CONST,
    ("pipeline/queries/job_signals.py", "gpus"): CONST,
    ("pipeline/queries/job_signals.py", "prefix"): CONST,
    ("pipeline/queries/job_signals.py", "some"): CONST,
    ("pipeline/queries/stalls.py", "_CANDIDATES"): CONST + " with bound placeholders",
    ("pipeline/queries/job_signals.py", "table"): (
        "the gpu_samples table: `{db:Identifier}.gpu_samples` (bound) from the read side, `gpu_samples` in Grafana"),
    ("pipeline/queries/job_signals.py", "terms.like()"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.min_job_tensor"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.min_job_util"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.peers_throttling_below"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "terms.throttle_mask"): FRAGMENT_ARG,
    ("pipeline/queries/job_signals.py", "thermal"): CONST,
    ("pipeline/queries/job_signals.py", "where"): FRAGMENT_ARG,
    ("pipeline/queries/jobs.py", "WINDOW"): WINDOW,
    ("pipeline/queries/jobs.py", "formulas.MFU"): FORMULA,
    ("pipeline/queries/stalls.py", "BUSY_BY_POLICY"): CONST,
    ("pipeline/queries/stalls.py", "_IN_WINDOW"): CONST,
    ("pipeline/queries/stalls.py", "_READ"): CONST,
    ("pipeline/queries/stalls.py", "samples_sql(scope_sql)"): CONST,
    ("pipeline/queries/stalls.py", "samples_sql(where)"): CONST,
    ("pipeline/queries/stalls.py", "where"): (
        "a scope from waterfall.HardwareScope.sql (constant column names, bound values) or a bound tenant filter"),
    ("pipeline/ingest/staging.py", "', '.join(columns)"): "SELECT list generated from the wire contract's field names",
    ("pipeline/ingest/staging.py", "table"): TABLE,
    ("pipeline/ingest/staging.py", "select.format(table=table)"): "the generated SELECT with the generated table name",
    ("pipeline/ingest/staging.py", "view"): TABLE,
    ("pipeline/ingest/staging.py", "staging.table"): TABLE,
    ("pipeline/ingest/staging.py", "structure"): "column types generated from the wire contract and system.columns",
    ("pipeline/ingest/staging.py", "column"): "a gpu_samples column name from the wire contract",
    ("pipeline/ingest/staging.py", "expr"): "an expression built from a wire field name",
    ("pipeline/store/tenants.py", "ident(user)"): "tenants.ident(): a back-quoted identifier, escaped",
    ("pipeline/store/tenants.py", "ident(role)"): "tenants.ident(): a back-quoted identifier, escaped",
    ("pipeline/store/tenants.py", "ident(policy)"): "tenants.ident(): a back-quoted identifier, escaped",
    ("pipeline/store/tenants.py", "name"): "a table name from the constant TABLES, VIEWS and SHARED lists, or its "
                                           "local table (+ the constant LOCAL_SUFFIX) on a cluster",
    ("pipeline/store/tenants.py", "on"): "'' or ' ON CLUSTER ' + tenants.literal() of the checked cluster name",
    ("pipeline/store/tenants.py", "literal(cluster)"): "tenants.literal(): an escaped string literal (the cluster name)",
    ("pipeline/store/tenants.py", "settings"): "constant CLUSTER_SETTINGS names with tenants.literal() values",
    ("pipeline/store/tenants.py", "condition(table, tenant)"): "tenants.condition(): the tenant as an escaped literal",
    ("pipeline/store/tenants.py", "literal(password_hash)"): "tenants.literal(): an escaped string literal (hex digest)",
    ("pipeline/store/tenants.py", "literal(salt)"): "tenants.literal(): an escaped string literal (hex salt)",
    ("pipeline/store/tenants.py", "READONLY"): "an integer constant",
}


@dataclass(frozen=True)
class Splice:
    path: str
    line: int
    expression: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: `{self.expression}` is spliced into SQL"


def _literal(node: ast.AST) -> str:
    """The literal text of a string-ish node (f-string constant parts included)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return ""


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "string" assignments (for `NAME.format(...)` and `NAME % ...`)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            text = _literal(node.value)
            if text:
                out[node.targets[0].id] = text
    return out


def _string_like(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant | ast.JoinedStr):
        return True
    if isinstance(node, ast.IfExp):
        return _string_like(node.body) and _string_like(node.orelse)
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and _string_like(node.left) \
        and _string_like(node.right)


def splices(path: Path) -> Iterator[Splice]:
    """Every expression spliced into SQL-looking text in one file."""
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), filename=rel)
    strings = _module_strings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and SQL.search(_literal(node)):
            for v in node.values:
                if isinstance(v, ast.FormattedValue):
                    yield Splice(rel, node.lineno, ast.unparse(v.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            base = node.func.value
            text = strings.get(base.id, "") if isinstance(base, ast.Name) else _literal(base)
            if SQL.search(text):
                for arg in node.args:
                    yield Splice(rel, node.lineno, ast.unparse(arg))
                for kw in node.keywords:
                    yield Splice(rel, node.lineno, f"{kw.arg}={ast.unparse(kw.value)}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
            left = node.left
            text = strings.get(left.id, "") if isinstance(left, ast.Name) else _literal(left)
            if not SQL.search(text):
                continue
            if isinstance(node.op, ast.Mod) or not _string_like(node.right):
                yield Splice(rel, node.lineno, ast.unparse(node.right))


def _files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def test_every_spliced_expression_is_an_allowed_identifier_or_constant_fragment() -> None:
    bad = [str(s) for p in _files() for s in splices(p) if (s.path, s.expression) not in ALLOWED]
    assert bad == [], (
        "bind these as query parameters ({name:Type} and parameters=...), or, if each is an identifier "
        "checked elsewhere or a fragment built from constants, add it to ALLOWED with the reason:\n  "
        + "\n  ".join(bad)
    )


def test_the_scanner_catches_interpolated_values(tmp_path: Path) -> None:
    """The scanner itself: each way of splicing a value into SQL is found."""
    src = tmp_path / "pipeline" / "bad.py"
    src.parent.mkdir()
    src.write_text(
        "Q = 'SELECT * FROM t WHERE a = %s'\n"
        "def f(client, tenant, db):\n"
        "    client.query(f\"SELECT * FROM {db}.t WHERE tenant = '{tenant}'\")\n"
        "    client.query('SELECT * FROM t WHERE x = {}'.format(tenant))\n"
        "    client.query(Q % tenant)\n"
        "    client.query(\"SELECT * FROM t WHERE y = '\" + tenant + \"'\")\n"
        "    client.query('SELECT 1 WHERE tenant = {t:String}', parameters={'t': tenant})\n"
        "    log = f'tenant {tenant} has no rows'\n"
    )
    global ROOT  # noqa: PLW0603 (point the scanner at the fixture tree)
    saved, ROOT = ROOT, tmp_path
    try:
        found = sorted((s.line, s.expression) for s in splices(src))
    finally:
        ROOT = saved
    assert found == [(3, "db"), (3, "tenant"), (4, "tenant"), (5, "tenant"), (6, "tenant")]


def test_only_ddl_splices_the_database_name() -> None:
    """Queries bind the database (`{db:Identifier}`, through `Store`); only DDL may splice the checked name."""
    assert sorted({path for (path, _), reason in ALLOWED.items() if reason == IDENT}) == sorted(DDL_MODULES)


def test_allowed_entries_are_all_still_used() -> None:
    """An entry whose splice is gone is removed, so the list stays an honest inventory."""
    used = {(s.path, s.expression) for p in _files() for s in splices(p)}
    stale = sorted(k for k in ALLOWED if k not in used and (ROOT / k[0]).exists())
    assert stale == []
