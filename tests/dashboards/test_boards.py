"""The committed boards and provisioning files: they parse, follow the schema, resolve every reference,
and equal a fresh build; and the validator catches the mistakes it exists for."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from gpufleet.dashboards import alerting, build, validate
from gpufleet.dashboards.builder import DS_REF, DS_UID
from gpufleet.dashboards.definitions import BOARDS

BOARD_FILES = sorted((build.ROOT / build.BOARDS_DIR).glob("*.json"))


def load(path: Any) -> Any:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def test_committed_files_equal_a_fresh_build() -> None:
    assert build.drift() == [], "run `gpufleet dashboards build` and commit the result"
    assert {p.relative_to(build.ROOT) for p in BOARD_FILES} == {build.board_path(b) for b in BOARDS}


def test_committed_files_pass_the_validator() -> None:
    assert validate.validate_tree() == []


@pytest.mark.parametrize("path", BOARD_FILES, ids=lambda p: p.name)
def test_board_schema(path: Any) -> None:
    board = load(path)
    assert path.stem == board["uid"]
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"])
    assert 39 <= board["schemaVersion"] <= 42
    assert path.read_text() == json.dumps(board, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["current"]["value"] == DS_UID
    for name in ("cluster", "node", "tenant", "model"):
        v = variables[name]
        assert (v["type"], v["refresh"], v["includeAll"], v["multi"]) == ("query", 2, True, True), name
        assert v["datasource"] == DS_REF
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == DS_REF
            assert all(t["datasource"] == DS_REF for t in panel["targets"])


def test_estimated_mfu_is_labelled_a_hardware_estimate_wherever_shown() -> None:
    for path in BOARD_FILES:
        for panel in load(path)["panels"]:
            sql = " ".join(t.get("rawSql", "") for t in panel.get("targets", []))
            if "estimated_unmeasured_flop" not in sql:
                continue
            shown = json.dumps([panel["title"], panel["description"], panel["fieldConfig"]["overrides"]])
            assert "hardware estimate" in shown, f"{path.name} panel {panel['title']!r}"
            for o in panel["fieldConfig"]["overrides"]:
                if o["matcher"]["options"] == "mfu_hw_estimate" and o["properties"][0]["id"] == "displayName":
                    assert "hardware estimate" in o["properties"][0]["value"]


def test_provisioning_files() -> None:
    ds = load(build.ROOT / build.DATASOURCE_FILE)["datasources"][0]
    assert (ds["uid"], ds["type"]) == (DS_UID, "grafana-clickhouse-datasource")
    assert ds["jsonData"]["host"] == "${CLICKHOUSE_HOST}"
    assert ds["jsonData"]["defaultDatabase"] == "${CLICKHOUSE_DATABASE}"
    assert ds["secureJsonData"] == {"password": "${GF_CLICKHOUSE_PASSWORD}"}
    provider = load(build.ROOT / build.PROVIDER_FILE)["providers"][0]
    assert provider["options"] == {"path": "/var/lib/grafana/dashboards", "foldersFromFilesStructure": True}
    rules = load(build.ROOT / build.RULES_FILE)["groups"][0]["rules"]
    assert {r["title"] for r in rules} >= {
        "GpuFailing", "GpuDegraded", "GpuIdleAllocated", "GpuHeldNoProcess", "GpuBusyUnallocated", "NodeSilent",
        "FleetMfuBelowTarget",
    }
    for r in rules:
        assert "$__conditionalAll" not in r["data"][0]["model"]["rawSql"]


def test_runbook_links_go_under_the_configured_base() -> None:
    shipped = yaml.safe_load((build.ROOT / "pipeline/alerts/default_rules.yaml").read_text())["rules"]
    links = {r["name"]: r["annotations"]["runbook_url"] for r in shipped}
    assert all(link.startswith("docs/alerts.md#") for link in links.values())  # relative to the repository
    committed = load(build.ROOT / build.RULES_FILE)["groups"][0]["rules"]
    assert {r["title"]: r["annotations"]["runbook_url"] for r in committed} == links  # no base: as written
    rules = alerting.provisioning("https://git.example.com/gpufleet/blob/main/")["groups"][0]["rules"]
    assert {r["title"]: r["annotations"]["runbook_url"] for r in rules} == {
        name: f"https://git.example.com/gpufleet/blob/main/{link}" for name, link in links.items()}


def test_compose_mounts_the_provisioning_and_the_boards() -> None:
    compose = yaml.safe_load((build.ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    # Datasources and boards; no alert rules: the evaluator and Alertmanager are the one alert path.
    assert "./dashboards/provisioning/datasources:/etc/grafana/provisioning/datasources:ro" in volumes
    assert "./dashboards/provisioning/dashboards:/etc/grafana/provisioning/dashboards:ro" in volumes
    assert f"./dashboards/boards:{build.GRAFANA_BOARDS_PATH}:ro" in volumes
    env = compose["services"]["grafana"]["environment"]
    for var in re.findall(r"\$\{([A-Z_]+)\}", (build.ROOT / build.DATASOURCE_FILE).read_text()):
        # GF_X is filled by Grafana's image from GF_X__FILE (a secret file).
        assert var in env or f"{var}__FILE" in env, f"the datasource reads ${{{var}}}, which compose does not give"


# --- the validator finds what it should ----------------------------------------------------------

FLEET = json.loads((build.ROOT / build.BOARDS_DIR / "gpufleet-fleet.json").read_text())
ALL = {b.uid: json.loads((build.ROOT / build.board_path(b)).read_text()) for b in BOARDS}


def broken(change: Any) -> list[str]:
    board = copy.deepcopy(FLEET)
    change(board)
    return validate.validate_board(board, {**ALL, board["uid"]: board}, "fleet")


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    return next(p for p in board["panels"] if p["title"] == title)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(uid="has spaces"), "uid 'has spaces' must match"),
        (lambda b: b.update(schemaVersion=27), "schemaVersion 27 is not current"),
        (lambda b: _panel(b, "Power draw")["targets"][0].update(rawSql="SELECT $nodes FROM x"),
         "unknown variable $nodes"),
        (lambda b: _panel(b, "Power draw")["targets"][0].update(rawSql="SELECT $__timeFilterr(t)"),
         "unknown macro $__timeFilterr"),
        (lambda b: _panel(b, "Power draw")["targets"][0].update(rawSql="WHERE $__conditionalAll(a = 1, 'x')"),
         "second argument"),
        (lambda b: _panel(b, "Power draw").update(datasource={"uid": "other"}), "datasource must be"),
        (lambda b: _panel(b, "Power draw")["gridPos"].update(x=20), "not on the 24-column grid"),
        (lambda b: _panel(b, "Energy over the time range")["gridPos"].update(x=0), "overlaps"),
        (lambda b: b["templating"]["list"].pop(1), "missing the 'cluster' variable"),
        (lambda b: b["templating"]["list"][2].update(refresh=1), "refresh must be 2"),
        (lambda b: b["links"][0].update(url="/d/nope"), "links to board 'nope'"),
        (lambda b: _panel(b, "Power draw")["targets"][0].update(rawSql="${node:regexx}"), "format"),
        (lambda b: _panel(b, "Power draw")["targets"][0].update(
            rawSql="WHERE $__conditionalAll(node IN (${node:singlequote}), $node)"), "lets a value change the query"),
        (lambda b: _panel(b, "Power draw")["targets"][0].update(rawSql="WHERE node = ${node:percentencode}"),
         "lets a value change the query"),
        (lambda b: _panel(b, "Power draw")["targets"][0].update(rawSql="WHERE node = $node"),
         "lets a value change the query"),
    ],
)
def test_validator_catches(change: Any, message: str) -> None:
    problems = broken(change)
    assert any(message in p for p in problems), problems


def test_validator_checks_data_links_and_provisioning() -> None:
    health = copy.deepcopy(ALL["gpufleet-health"])
    worst = _panel(health, "Worst GPUs")
    link = next(o for o in worst["fieldConfig"]["overrides"] if o["properties"][0]["id"] == "links")
    link["properties"][0]["value"][0]["url"] = "/d/gpufleet-gpu/x?var-gpuu=${__value.raw}"
    assert any("has no such variable" in p for p in validate.validate_board(health, ALL, "health"))

    ds = load(build.ROOT / build.DATASOURCE_FILE)
    ds["datasources"][0]["secureJsonData"]["password"] = "hunter2"
    assert any("environment reference" in p for p in validate.validate_datasources(ds, "ds"))

    rules = load(build.ROOT / build.RULES_FILE)
    rule = rules["groups"][0]["rules"][0]
    rule["condition"] = "Z"
    rule["data"][0]["model"]["rawSql"] += " AND cluster IN (${cluster:singlequote})"
    rule["labels"]["team"] = "$TEAM"
    problems = validate.validate_rules(rules, {DS_UID}, "rules")
    assert any("condition 'Z'" in p for p in problems)
    assert any("$cluster cannot be used in an alert rule" in p for p in problems)
    assert any("environment variable" in p for p in problems)
