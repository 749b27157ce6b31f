"""Alerts on idle and failing GPUs: declarative rules evaluated over ClickHouse, state kept in
ClickHouse, notifications through a real Prometheus Alertmanager (v2 API).

Modules: `rules` (the rules file and its validation), `queries` (rule -> SQL -> candidates),
`lifecycle` (pending -> firing -> resolved), `state` (the `alerts` table), `alertmanager` (the HTTP
adapter), `evaluator` (the loop), `command` (`gpufleet alerts`). docs/alerts.md is the guide.
"""

from __future__ import annotations

from gpufleet.pipeline.alerts.evaluator import EvalReport, Evaluator
from gpufleet.pipeline.alerts.rules import RulesError, RuleSet, load_rules
from gpufleet.pipeline.alerts.state import firing_alerts

__all__ = ["EvalReport", "Evaluator", "RuleSet", "RulesError", "firing_alerts", "load_rules"]
