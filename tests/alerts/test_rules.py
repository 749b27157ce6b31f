"""The rules file: durations, the shipped files, and clear errors naming the rule and the key."""

from __future__ import annotations

import pytest

from gpufleet.pipeline.alerts.rules import (
    DEMO_RULES,
    GpuIdleAllocated,
    RulesError,
    duration_ms,
    format_duration,
    load_rules,
    packaged_rules,
    parse_rules,
)


@pytest.mark.parametrize(("text", "ms"), [
    ("0", 0), (0, 0), ("30s", 30_000), ("5m", 300_000), ("1h30m", 5_400_000), ("2d", 172_800_000),
    ("1h0m5s", 3_605_000), ("250ms", 250), (90, 90_000),
])
def test_durations(text, ms) -> None:
    assert duration_ms(text) == ms


@pytest.mark.parametrize("text", ["5 minutes", "m5", "1.5h", "", "-5m", "5M"])
def test_bad_durations(text) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        duration_ms(text)


def test_format_duration() -> None:
    assert [format_duration(ms) for ms in (0, 999, 60_000, 5_400_000, 97_265_000)] == [
        "0s", "999ms", "1m", "1h30m", "1d3h1m5s"]


def test_shipped_files_are_valid() -> None:
    default = load_rules()
    demo = packaged_rules(DEMO_RULES)
    assert [r.name for r in demo.rules] == [r.name for r in default.rules]
    idle = default.by_name()["GpuIdleAllocated"]
    assert isinstance(idle, GpuIdleAllocated)
    assert (idle.for_ms, idle.util_below, idle.severity) == (900_000, 0.05, "warning")


def _rule(**over: object) -> dict[str, object]:
    return {"name": "Idle", "kind": "gpu_idle_allocated", "severity": "warning",
            "annotations": {"summary": "idle {tenant}"}, **over}


def _error(raw: object) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules(raw, "rules.yaml")
    return str(info.value)


@pytest.mark.parametrize(("rule", "message"), [
    (_rule(threshold=0.1),
     "rules.yaml: rule 'Idle' (rules[0]): Object contains unknown field `threshold` (remove it or fix its spelling; "
     "docs/alerts.md lists each kind's keys)"),
    (_rule(util_below="five"), "rules.yaml: rule 'Idle' (rules[0]): Expected `float`, got `str` - at `util_below`"),
    (_rule(util_below=5), "rules.yaml: rule 'Idle' (rules[0]): Expected `float` <= 1.0 - at `util_below`"),
    (_rule(severity="page"), "rules.yaml: rule 'Idle' (rules[0]): Invalid enum value 'page' - at `severity`"),
    (_rule(**{"for": "15 min"}),
     "rules.yaml: rule 'Idle' (rules[0]): `for`: '15 min' is not a duration: write e.g. 30s, 5m, 1h30m, 2d, or 0"),
    (_rule(annotations={"runbook_url": "x"}),
     "rules.yaml: rule 'Idle' (rules[0]): `annotations` needs a `summary` (one line saying what is wrong)"),
    (_rule(annotations={"summary": "idle {reasons}"}),
     "rules.yaml: rule 'Idle' (rules[0]): `annotations.summary` uses {reasons}, which kind 'gpu_idle_allocated' "
     "does not provide; use one of {cluster}, {node}, {gpu}, {gpu_index}, {tenant}, {job}, {model}, {for}, "
     "{active_for}, {value}, {util_pct}, {threshold_pct}, {gpu_hours_wasted}"),
    (_rule(annotations={"summary": "{util_pct:.1q}"}),
     "rules.yaml: rule 'Idle' (rules[0]): `annotations.summary`: Unknown format code 'q' for object of type 'float'"),
    (_rule(annotations={"summary": "{tenant"}),
     "rules.yaml: rule 'Idle' (rules[0]): `annotations.summary`: expected '}' before end of string "
     "(write literal braces as {{ and }})"),
    (_rule(labels={"node": "x"}),
     "rules.yaml: rule 'Idle' (rules[0]): `labels` may not set node: the evaluator sets those"),
    (_rule(labels={"team-name": "x"}),
     "rules.yaml: rule 'Idle' (rules[0]): Expected `str` matching regex '^[A-Za-z_][A-Za-z0-9_]*$' - at "
     "`key` in `labels`"),
    (_rule(kind="gpu_sleepy"),
     "rules.yaml: rule 'Idle' (rules[0]): unknown kind 'gpu_sleepy'; use one of gpu_failing, gpu_degraded, "
     "gpu_idle_allocated, gpu_held_no_process, gpu_busy_unallocated, node_silent, mfu_below_target, "
     "agent_spool_dropping, agent_send_errors, gpu_claim_conflict, job_stalled, job_straggler, "
     "agent_allocation_unknown, gpu_recovery_action, node_recovery_action, fabric_degraded, network_port_down, "
     "network_port_degraded, gpu_missing, node_config_drift"),
    ({"kind": "node_silent", "severity": "critical", "annotations": {"summary": "s"}},
     "rules.yaml: rules[0]: Object missing required field `name`"),
    ({"name": "S", "kind": "node_silent", "severity": "critical", "annotations": {"summary": "s"},
      "silent_after": "1h", "forget_after": "30m"},
     "rules.yaml: rule 'S' (rules[0]): `forget_after` must be longer than `silent_after`"),
    ({"name": "M", "kind": "mfu_below_target", "severity": "info", "annotations": {"summary": "s"},
      "by": ["node"]},
     "rules.yaml: rule 'M' (rules[0]): Invalid enum value 'node' - at `by[0]`"),
])
def test_rule_errors_name_rule_and_key(rule, message) -> None:
    assert _error({"rules": [rule]}) == message


def test_duplicate_names_and_file_shape() -> None:
    assert _error({"rules": [_rule(), _rule()]}) == (
        "rules.yaml: rule 'Idle' (rules[1]): the name 'Idle' is used twice; alert names must be unique")
    assert _error([_rule()]) == (
        "rules.yaml: a rules file is a mapping with one key, `rules`, holding a list of rules")
    assert _error({"rules": [_rule()], "groups": []}) == (
        "rules.yaml: a rules file is a mapping with one key, `rules`, holding a list of rules")


def test_missing_and_unparsable_files(tmp_path) -> None:
    with pytest.raises(RulesError, match=r"rules file .*nope.yaml does not exist: fix alerts.rules_file or --rules"):
        load_rules(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(RulesError, match=r"bad.yaml is not valid YAML"):
        load_rules(bad)
