"""Schema and reference checks for the boards and provisioning files, without a Grafana server.

What Grafana would reject or silently break on: a uid or schema version it does not accept, panels
overlapping or off the 24-column grid, a panel or variable not pointing at the ClickHouse
datasource variable, a `$variable` or `$__macro` that nothing defines, a variable pasted into SQL
other than as `${var:percentencode}` (any other format lets some value change the query), a
`$__conditionalAll` whose second argument is not a variable, a link to a board or variable that does not exist, a
datasource whose secrets are written out instead of read from the environment, and alert rules
whose condition, expressions or states are not what Grafana's provisioning expects. Every problem
is one line naming the file, the panel or rule, and what to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from gpufleet.dashboards import build, macros
from gpufleet.dashboards.builder import DS_REF, DS_TYPE, DS_UID, GRID_COLUMNS

UID_RE: Final = re.compile(r"^[a-zA-Z0-9_-]{1,40}$")
VAR_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_RE: Final = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*\}$")
SCHEMA_VERSIONS: Final = range(39, 43)
REQUIRED_VARIABLES: Final = ("datasource", "cluster", "node", "tenant", "model")
PANEL_TYPES: Final = frozenset({
    "row", "timeseries", "stat", "bargauge", "gauge", "barchart", "piechart", "table", "heatmap",
    "state-timeline", "status-history", "text", "histogram",
})
GRAFANA_BUILTINS: Final = frozenset({
    "__interval", "__interval_ms", "__from", "__to", "__range", "__range_s", "__range_ms", "__rate_interval",
    "__dashboard", "__org", "__user", "__timezone", "__url_time_range", "__all_variables", "__data", "__value",
    "__field", "__series", "__name",
})
"""Variables Grafana itself defines (global variables and data-link fields)."""
BROWSER_MACROS: Final = frozenset({"__conditionalAll", "__adHocFilters"})
"""Macros the ClickHouse plugin expands in the browser (so not in alert rules)."""
NO_DATA_STATES: Final = frozenset({"NoData", "Alerting", "OK", "KeepLast"})
EXEC_ERR_STATES: Final = frozenset({"Error", "Alerting", "OK", "KeepLast"})
EXPRESSION_TYPES: Final = frozenset({"threshold", "reduce", "math", "resample", "classic_conditions", "sql"})
SAFE_FORMAT: Final = "percentencode"
"""The one way a dashboard variable may reach SQL: `'${var:percentencode}'`, whose content (only
`A-Z a-z 0-9 - _ . ~ %`) cannot close the quoted literal. `singlequote` and `sqlstring` leave
backslashes, so `x\\') OR 1=1 --` escapes them; unquoted, even `--` would start a comment."""
_DURATION_RE: Final = re.compile(r"^(\d+(ms|s|m|h|d|w))+$|^0$")
_LINK_RE: Final = re.compile(r"/d/([^/?#]+)(?:/[^?#]*)?(?:\?([^#]*))?")


# --- boards --------------------------------------------------------------------------------------


def _references(text: str, where: str, variables: set[str], sql: bool) -> Iterator[str]:
    """Problems with the `$name` references in `text` (SQL may also use the plugin's macros)."""
    for name in macros.variable_names(text):
        if name in variables or name in GRAFANA_BUILTINS:
            continue
        if sql and (name.removeprefix("__") in macros.PLUGIN_MACROS or name in BROWSER_MACROS):
            continue
        kind = "macro" if name.startswith("__") else "variable"
        yield f"{where}: unknown {kind} ${name} (define the variable, or use one of the plugin's macros)"
    for name, fmt in macros.variable_formats(text):
        if fmt.split(":")[0] not in macros.FORMATS:
            yield f"{where}: ${{{name}:{fmt}}} uses a format this project does not support"
    if sql:
        yield from _unsafe_references(text, where, variables)
    yield from _conditional_all(text, where, variables)


def _conditional_all_flags(text: str) -> list[tuple[int, int]]:
    """Spans of `$__conditionalAll`'s second arguments: the browser only reads them, they never reach SQL."""
    spans = []
    opening = "$__conditionalAll("
    start = 0
    while (i := text.find(opening, start)) >= 0:
        start = i + len(opening)
        args = macros.macro_args(text, start - 1)
        if len(args) == 2:
            flag = start + len(args[0]) + 1
            spans.append((flag, flag + len(args[1])))
    return spans


def _unsafe_references(text: str, where: str, variables: set[str]) -> Iterator[str]:
    flags = _conditional_all_flags(text)
    for name, fmt, at, written in macros.variable_references(text):
        if name not in variables or any(a <= at < b for a, b in flags):
            continue
        if fmt == SAFE_FORMAT and text[at - 1 : at] == "'" and text[at + len(written) : at + len(written) + 1] == "'":
            continue
        yield (f"{where}: {written} lets a value change the query (only '${{{name}:{SAFE_FORMAT}}}' in quotes is "
               "safe: singlequote and sqlstring leave backslashes, the others quote nothing); "
               "filter with gpufleet.dashboards.fragments.condition or selected")


def _conditional_all(text: str, where: str, variables: set[str]) -> Iterator[str]:
    start = 0
    opening = "$__conditionalAll("
    while (i := text.find(opening, start)) >= 0:
        args = macros.macro_args(text, i + len(opening) - 1)
        start = i + len(opening)
        if len(args) != 2:
            yield f"{where}: $__conditionalAll needs exactly two arguments (condition, $variable)"
            continue
        names = macros.variable_names(args[1].strip())
        if len(names) != 1 or names[0] not in variables or args[1].strip() not in (f"${names[0]}", f"${{{names[0]}}}"):
            yield f"{where}: $__conditionalAll's second argument {args[1].strip()!r} must be one defined $variable"


def _variables(board: Mapping[str, Any], where: str) -> Iterator[str]:
    seen: list[str] = []
    for v in board.get("templating", {}).get("list", []):
        name = v.get("name", "")
        at = f"{where}: variable {name!r}"
        if not VAR_NAME_RE.match(name):
            yield f"{at}: name must match {VAR_NAME_RE.pattern}"
        if name in seen:
            yield f"{at}: defined twice"
        if v.get("type") == "datasource":
            if v.get("query") != DS_TYPE:
                yield f"{at}: a datasource variable must list {DS_TYPE} datasources"
        elif v.get("type") == "query":
            if v.get("datasource") != DS_REF:
                yield f"{at}: must query the datasource through ${{datasource}} ({DS_REF})"
            if v.get("refresh") != 2:
                yield f"{at}: refresh must be 2 (on time range change)"
            raw = (v.get("query") or {}).get("rawSql", "")
            if not raw.strip() or raw != v.get("definition"):
                yield f"{at}: query.rawSql must be set and equal `definition`"
            yield from _references(raw, at, set(seen), sql=True)  # only variables defined before it
        else:
            yield f"{at}: type {v.get('type')!r} is not used by these boards (datasource or query)"
        seen.append(name)
    for required in REQUIRED_VARIABLES:
        if required not in seen:
            yield f"{where}: missing the {required!r} variable every board has"


def _overlaps(boxes: list[tuple[str, dict[str, int]]]) -> Iterator[str]:
    for i, (a_name, a) in enumerate(boxes):
        for b_name, b in boxes[i + 1:]:
            if (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                    and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]):
                yield f"{a_name} overlaps {b_name}"


def _panel(panel: Mapping[str, Any], where: str, variables: set[str]) -> Iterator[str]:
    kind = panel.get("type")
    if kind not in PANEL_TYPES:
        yield f"{where}: unknown panel type {kind!r}"
    if not panel.get("title"):
        yield f"{where}: has no title"
    for text_key in ("title", "description"):
        yield from _references(panel.get(text_key, ""), f"{where} {text_key}", variables, sql=False)
    if kind == "row":
        return
    if panel.get("datasource") != DS_REF:
        yield f"{where}: datasource must be {DS_REF}"
    if (interval := panel.get("interval")) is not None:
        try:
            macros.go_duration_seconds(interval)
        except macros.MacroError:
            yield f"{where}: interval {interval!r} is not a duration like 1m"
    targets = panel.get("targets") or []
    if not targets:
        yield f"{where}: has no queries"
    refs = [t.get("refId") for t in targets]
    if len(set(refs)) != len(refs):
        yield f"{where}: duplicate refId"
    for t in targets:
        at = f"{where} query {t.get('refId')}"
        if t.get("datasource") != DS_REF:
            yield f"{at}: datasource must be {DS_REF}"
        if t.get("editorType") != "sql" or t.get("format") not in (0, 1):
            yield f"{at}: must be a SQL query (editorType 'sql') with format 0 (time series) or 1 (table)"
        if not (t.get("rawSql") or "").strip():
            yield f"{at}: rawSql is empty"
        yield from _references(t.get("rawSql", ""), at, variables, sql=True)
    for o in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = o.get("matcher", {})
        if matcher.get("id") != "byName" or not matcher.get("options"):
            yield f"{where}: overrides must match a field byName"
        for prop in o.get("properties", []):
            if not isinstance(prop, Mapping) or "id" not in prop or "value" not in prop:
                yield f"{where}: override properties need an id and a value"


def _link_target(url: str, boards: Mapping[str, Mapping[str, Any]], where: str) -> Iterator[str]:
    m = _LINK_RE.search(url)
    if not m:
        return
    uid, query = m.group(1), m.group(2) or ""
    target = boards.get(uid)
    if target is None:
        yield f"{where}: links to board {uid!r}, which does not exist"
        return
    names = {v["name"] for v in target["templating"]["list"]}
    for part in query.split("&"):
        if part.startswith("var-") and part.split("=", 1)[0][4:] not in names:
            yield f"{where}: sets {part.split('=', 1)[0]}, but board {uid!r} has no such variable"


def validate_board(board: Mapping[str, Any], boards: Mapping[str, Mapping[str, Any]], where: str) -> list[str]:
    """Every problem with one dashboard (`boards`: all dashboards by uid, for links)."""
    problems: list[str] = []
    uid = board.get("uid", "")
    if not isinstance(uid, str) or not UID_RE.match(uid):
        problems.append(f"{where}: uid {uid!r} must match {UID_RE.pattern}")
    if board.get("schemaVersion") not in SCHEMA_VERSIONS:
        problems.append(f"{where}: schemaVersion {board.get('schemaVersion')} is not current (39-42)")
    if board.get("id") is not None:
        problems.append(f"{where}: id must be null in a provisioned board (Grafana assigns it)")
    if not board.get("title"):
        problems.append(f"{where}: has no title")
    for key, kind in (("panels", list), ("templating", dict), ("time", dict), ("tags", list), ("links", list)):
        if not isinstance(board.get(key), kind):
            problems.append(f"{where}: {key!r} must be a {kind.__name__}")
    if problems:
        return problems
    problems.extend(_variables(board, where))
    variables = {v["name"] for v in board["templating"]["list"]}
    ids = [p.get("id") for p in board["panels"]]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        problems.append(f"{where}: panel ids must be unique integers")
    boxes = []
    for p in board["panels"]:
        at = f"{where}: panel {p.get('id')} {p.get('title', '')!r}"
        problems.extend(_panel(p, at, variables))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["w"] < 1 or g["h"] < 1 or g["x"] < 0 \
                or g["x"] + g["w"] > GRID_COLUMNS:
            problems.append(f"{at}: gridPos {g} is not on the {GRID_COLUMNS}-column grid")
            continue
        boxes.append((f"panel {p.get('id')}", g))
        for o in p.get("fieldConfig", {}).get("overrides", []):
            for prop in o.get("properties", []):
                if prop.get("id") == "links":
                    for link in prop["value"]:
                        problems.extend(_link_target(link.get("url", ""), boards, at))
    problems.extend(f"{where}: {o}" for o in _overlaps(boxes))
    for link in board["links"]:
        problems.extend(_link_target(link.get("url", ""), boards, f"{where} link {link.get('title')!r}"))
    return problems


# --- provisioning --------------------------------------------------------------------------------


def validate_datasources(doc: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != 1:
        problems.append(f"{where}: apiVersion must be 1")
    sources = {d.get("uid"): d for d in doc.get("datasources", [])}
    ds = sources.get(DS_UID)
    if ds is None:
        return [*problems, f"{where}: no datasource with the fixed uid {DS_UID!r} the boards point at"]
    if ds.get("type") != DS_TYPE:
        problems.append(f"{where}: datasource {DS_UID} must have type {DS_TYPE}")
    data = ds.get("jsonData", {})
    for key in ("host", "port", "protocol", "username", "defaultDatabase"):
        if key not in data:
            problems.append(f"{where}: jsonData.{key} is missing")
    if "database" in data:
        problems.append(f"{where}: the plugin reads jsonData.defaultDatabase, not jsonData.database")
    if data.get("protocol") not in ("http", "native"):
        problems.append(f"{where}: jsonData.protocol must be http or native")
    secrets = ds.get("secureJsonData", {})
    if "password" not in secrets:
        problems.append(f"{where}: secureJsonData.password is missing")
    for key, value in secrets.items():
        if not isinstance(value, str) or not ENV_RE.match(value):
            problems.append(f"{where}: secureJsonData.{key} must be an environment reference (${{VAR}}), not a value")
    return problems


def validate_provider(doc: Mapping[str, Any], where: str) -> list[str]:
    problems = [] if doc.get("apiVersion") == 1 else [f"{where}: apiVersion must be 1"]
    providers = doc.get("providers") or []
    if not providers:
        return [*problems, f"{where}: no dashboard provider"]
    for p in providers:
        options = p.get("options", {})
        if p.get("type") != "file" or options.get("path") != build.GRAFANA_BOARDS_PATH:
            problems.append(f"{where}: provider {p.get('name')!r} must read files at {build.GRAFANA_BOARDS_PATH}")
        if options.get("foldersFromFilesStructure") is not True or "folder" in p:
            problems.append(f"{where}: provider {p.get('name')!r} must use foldersFromFilesStructure (and no folder)")
    return problems


def _rule(rule: Mapping[str, Any], at: str, datasource_uids: set[str]) -> Iterator[str]:
    if not UID_RE.match(str(rule.get("uid", ""))):
        yield f"{at}: uid must match {UID_RE.pattern}"
    data = rule.get("data") or []
    refs = [d.get("refId") for d in data]
    if len(set(refs)) != len(refs) or not refs:
        yield f"{at}: data needs unique refIds"
    if rule.get("condition") not in refs:
        yield f"{at}: condition {rule.get('condition')!r} is not one of the refIds {refs}"
    for d in data:
        q = f"{at} {d.get('refId')}"
        model = d.get("model", {})
        if d.get("datasourceUid") == "__expr__":
            if model.get("type") not in EXPRESSION_TYPES:
                yield f"{q}: unknown expression type {model.get('type')!r}"
            if model.get("type") in ("threshold", "reduce", "resample") and model.get("expression") not in refs:
                yield f"{q}: expression {model.get('expression')!r} is not a refId of this rule"
            continue
        if d.get("datasourceUid") not in datasource_uids:
            yield f"{q}: datasourceUid {d.get('datasourceUid')!r} is not a provisioned datasource"
        window = d.get("relativeTimeRange", {})
        if not isinstance(window.get("from"), int) or not isinstance(window.get("to"), int) \
                or not window["from"] > window["to"] >= 0:
            yield f"{q}: relativeTimeRange needs from > to >= 0 (seconds before now)"
        raw = model.get("rawSql", "")
        if not raw.strip():
            yield f"{q}: rawSql is empty"
        for name in macros.variable_names(raw):
            if name.removeprefix("__") not in macros.PLUGIN_MACROS:
                yield f"{q}: ${name} cannot be used in an alert rule (only the plugin's backend macros expand there)"
    if rule.get("noDataState") not in NO_DATA_STATES:
        yield f"{at}: noDataState must be one of {sorted(NO_DATA_STATES)}"
    if rule.get("execErrState") not in EXEC_ERR_STATES:
        yield f"{at}: execErrState must be one of {sorted(EXEC_ERR_STATES)}"
    if not _DURATION_RE.match(str(rule.get("for", ""))):
        yield f"{at}: for {rule.get('for')!r} is not a duration"
    for key, value in (rule.get("labels") or {}).items():
        if "$" in str(value):
            yield f"{at}: label {key} contains '$', which provisioning would expand as an environment variable"
    if not (rule.get("annotations") or {}).get("summary"):
        yield f"{at}: needs a summary annotation"


def validate_rules(doc: Mapping[str, Any], datasource_uids: set[str], where: str) -> list[str]:
    problems = [] if doc.get("apiVersion") == 1 else [f"{where}: apiVersion must be 1"]
    uids: list[str] = []
    for group in doc.get("groups") or []:
        g = f"{where}: group {group.get('name')!r}"
        if not group.get("folder") or not group.get("name") or not isinstance(group.get("orgId"), int):
            problems.append(f"{g}: needs orgId, name and folder")
        if not _DURATION_RE.match(str(group.get("interval", ""))):
            problems.append(f"{g}: interval {group.get('interval')!r} is not a duration")
        for rule in group.get("rules") or []:
            uids.append(rule.get("uid"))
            problems.extend(_rule(rule, f"{g} rule {rule.get('title')!r}", datasource_uids))
    if len(set(uids)) != len(uids):
        problems.append(f"{where}: rule uids must be unique")
    if not uids:
        problems.append(f"{where}: no rules")
    return problems


# --- the tree ------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def validate_tree(root: Path = build.ROOT) -> list[str]:
    """Check every committed board and provisioning file under `root`; [] when all is well."""
    problems: list[str] = []
    docs: dict[Path, Any] = {}
    files = [*sorted((root / build.BOARDS_DIR).glob("*.json")),
             root / build.DATASOURCE_FILE, root / build.PROVIDER_FILE, root / build.RULES_FILE]
    for path in files:
        rel = path.relative_to(root)
        try:
            docs[rel] = _load(path)
        except FileNotFoundError:
            problems.append(f"{rel}: missing (run `gpufleet dashboards build`)")
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            problems.append(f"{rel}: does not parse: {exc}")
    boards = {d.get("uid"): d for p, d in docs.items() if p.suffix == ".json" and isinstance(d, dict)}
    if len(boards) != sum(1 for p in docs if p.suffix == ".json"):
        problems.append(f"{build.BOARDS_DIR}: two boards share a uid")
    titles = [b.get("title") for b in boards.values()]
    if len(set(titles)) != len(titles):
        problems.append(f"{build.BOARDS_DIR}: two boards share a title")
    for path, doc in docs.items():
        if path.suffix == ".json":
            problems.extend(validate_board(doc, boards, str(path)))
    ds_doc = docs.get(build.DATASOURCE_FILE)
    if ds_doc is not None:
        problems.extend(validate_datasources(ds_doc, str(build.DATASOURCE_FILE)))
    if (provider := docs.get(build.PROVIDER_FILE)) is not None:
        problems.extend(validate_provider(provider, str(build.PROVIDER_FILE)))
    if (rules := docs.get(build.RULES_FILE)) is not None:
        uids = {d.get("uid") for d in (ds_doc or {}).get("datasources", [])}
        problems.extend(validate_rules(rules, uids, str(build.RULES_FILE)))
    return problems
