"""The alert evaluator: each interval, run every rule over ClickHouse, move alerts through their
lifecycle, store them, and tell Alertmanager what fires and what resolved.

Time comes from an injected clock (`evaluate_once(now_ms)` in tests, the wall clock in production),
and only samples up to `now` count. Failures stay local: a rule whose query fails keeps its alerts
as they were, an unreachable Alertmanager leaves notifications due for the next evaluation, a
failed write is retried; none of them stops the loop. State is reloaded from the `alerts` table on
start, so a restarted evaluator keeps each alert's `startsAt` and sends nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gpufleet.config import Config
from gpufleet.liveness import Liveness
from gpufleet.pipeline.alerts import gate
from gpufleet.pipeline.alerts import lifecycle as lc
from gpufleet.pipeline.alerts.alertmanager import AlertmanagerClient, AlertmanagerError, payload
from gpufleet.pipeline.alerts.lifecycle import AlertRecord
from gpufleet.pipeline.alerts.queries import Candidate, build, candidates, iso
from gpufleet.pipeline.alerts.rules import AnyRule, RuleSet, format_duration, load_rules, runbook_link
from gpufleet.pipeline.alerts.state import AlertStore

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger("gpufleet.alerts")

Clock = Callable[[], int]
"""Returns the current time in Unix milliseconds."""
EVALUATED = "evaluated"


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Notifier(Protocol):
    """Where alerts go: `AlertmanagerClient`, or anything with its `post`."""

    def post(self, alerts: Sequence[dict[str, Any]]) -> None: ...


@dataclass
class EvalReport:
    """What one evaluation did."""

    now_ms: int
    firing: int = 0
    pending: int = 0
    fired: list[AlertRecord] = field(default_factory=list)
    resolved: list[AlertRecord] = field(default_factory=list)
    sent: int = 0
    errors: list[str] = field(default_factory=list)


class Evaluator:
    """Evaluates the rules against ClickHouse and notifies Alertmanager; `run()` loops until stopped."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        alertmanager_url: str | None = None,
        *,
        clock: Clock | None = None,
        rules: RuleSet | None = None,
        notifier: Notifier | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.rules = rules if rules is not None else load_rules(cfg.alerts.rules_file)
        self.alert_store = AlertStore(store)
        url = alertmanager_url or cfg.alerts.alertmanager_url
        self.notifier: Notifier | None = notifier or (AlertmanagerClient(url) if url else None)
        self.clock = clock or wall_ms
        self.interval_s = cfg.alerts.interval_s
        self.resend_ms = int(cfg.alerts.resend_s * 1000)
        self.valid_ms = 4 * max(self.resend_ms, int(self.interval_s * 1000))
        self._records: dict[str, AlertRecord] | None = None
        self._written_at: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._logged_errors: set[str] = set()
        self._materialized_cte: bool | None = None
        """Whether the server has materialized CTEs (asked once, at the first evaluation)."""
        self.last_report: EvalReport | None = None
        self.liveness = liveness or Liveness().expect(EVALUATED, cfg.alerts.eval_stale_s)
        """`evaluated` beats after each evaluation without error (`alerts.status_port` serves it)."""

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Evaluate every `alerts.interval_s` until `stop_event` is set; never raises."""
        log.info("alert evaluator: %d rules, every %.1f s, Alertmanager %s", len(self.rules.rules), self.interval_s,
                 self.notifier or "not configured")
        while not stop_event.is_set():
            started = time.monotonic()
            try:
                self.evaluate_once()
            except Exception:
                log.exception("alert evaluation failed; retrying next interval")
            stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def evaluate_once(self, now_ms: int | None = None) -> EvalReport:
        """One evaluation at `now_ms` (default: the clock): query, transition, store, notify."""
        now = self.clock() if now_ms is None else int(now_ms)
        report = EvalReport(now)
        if self._records is None:
            try:
                self._records = self.alert_store.load_open()
            except Exception as exc:
                report.errors.append(str(exc))
                return self._finish(report)
        records = self._records
        before = dict(records)
        names = set()
        holding: dict[str, list[str]] = {}  # rule name -> its open alerts (names are unique: only it changes them)
        for fp, rec in records.items():
            if rec.open:
                holding.setdefault(rec.alertname, []).append(fp)
        # A rule with open alerts runs even when the gate says it finds nothing: its own query closes them, or,
        # when it fails (raw samples unreadable while the rollups answer), keeps them as they were.
        skip = {i for i in self._quiet_rules(now) if self.rules.rules[i].name not in holding}
        for i, rule in enumerate(self.rules.rules):
            names.add(rule.name)
            try:
                rows: list[dict[str, Any]] = []
                if i not in skip:
                    rows = self._rule_rows(rule, now)
                found = candidates(rule, rows, now)
            except Exception as exc:
                report.errors.append(f"rule {rule.name}: query failed, its alerts stay as they were: {exc}")
                continue
            self._apply(rule, found, now, holding.get(rule.name, ()))
        for fp, rec in list(records.items()):
            if rec.open and rec.alertname not in names:  # its rule was removed from the rules file
                records[fp] = lc.close(rec, now)
        self._notify(now, report)
        self._store(before, now, report)
        for fp, rec in records.items():
            old = before.get(fp)
            if rec.state == "firing" and (old is None or old.state != "firing" or old.active_at != rec.active_at):
                report.fired.append(rec)
            if rec.state == "resolved" and old is not None and old.state == "firing":
                report.resolved.append(rec)
        report.firing = sum(r.state == "firing" for r in records.values())
        report.pending = sum(r.state == "pending" for r in records.values())
        return self._finish(report)

    # --- steps ----------------------------------------------------------------------------------

    def _rule_rows(self, rule: AnyRule, now: int) -> list[dict[str, Any]]:
        """The rows of `rule`'s query at `now`. A query in the materialized-CTE form (an experimental
        server setting) that fails is asked again in the plain form, which every later cycle then uses: a
        server that knows the setting but refuses it (a settings constraint, a readonly profile) costs one
        failed query, never a rule that stops evaluating."""
        materialized = self._has_materialized_cte()
        q = build(rule, now, materialized_cte=materialized)
        try:
            return list(self.store.query(q.sql, q.parameters, q.settings).named_results())
        except Exception as exc:
            if not materialized or not q.settings:
                raise
            log.warning("rule %s: its materialized-CTE query failed (%s); using the plain form from now on",
                        rule.name, exc)
            self._materialized_cte = False
            q = build(rule, now, materialized_cte=False)
            return list(self.store.query(q.sql, q.parameters, q.settings).named_results())

    def _has_materialized_cte(self) -> bool:
        """Whether the server knows `enable_materialized_cte` (ClickHouse 25.x on; chDB 26.9 does); asked
        once. Unknown (the question failed): no, and asked again next evaluation."""
        if self._materialized_cte is None:
            try:
                (row,) = self.store.rows("SELECT count() FROM system.settings WHERE name = 'enable_materialized_cte'")
            except Exception as exc:
                log.debug("could not ask the server for materialized CTEs: %s", exc)
                return False
            self._materialized_cte = bool(row[0])
        return self._materialized_cte

    def _quiet_rules(self, now: int) -> set[int]:
        """The rules (positions) whose query would find nothing at `now`, per the gate (alerts/gate.py); none
        when the gate fails (every rule's query then runs and reports its own failure)."""
        gated = gate.gate(self.rules.rules, now)
        if gated is None:
            return set()
        q, columns = gated
        try:
            (row,) = list(self.store.query(q.sql, q.parameters).named_results())
        except Exception as exc:
            log.debug("alert gate failed, running every rule: %s", exc)
            return set()
        return gate.quiet(columns, row)

    def _apply(self, rule: AnyRule, found: list[Candidate], now: int, held: Sequence[str]) -> None:
        """`found` into the rule's records; its alerts open before (`held`) that are not found close."""
        records = self._records
        assert records is not None
        seen: set[str] = set()
        for cand in found:
            labels = {**rule.labels, **cand.labels, "alertname": rule.name, "severity": rule.severity}
            fp = lc.fingerprint(labels)
            seen.add(fp)
            rec = lc.observe(records.get(fp), alertname=rule.name, severity=rule.severity, labels=labels,
                             firing=cand.firing, since_ms=cand.since_ms, now_ms=now)
            records[fp] = _render(rule, rec, cand, now, self.cfg.alerts.runbook_base_url)
        for fp in held:
            if fp not in seen:
                records[fp] = lc.close(records[fp], now)

    def _notify(self, now: int, report: EvalReport) -> None:
        records = self._records
        assert records is not None
        due = [r for r in records.values() if lc.due(r, now, self.resend_ms)]
        if not due or self.notifier is None:
            return
        try:
            self.notifier.post([payload(r, now, self.valid_ms) for r in due])
        except AlertmanagerError as exc:
            report.errors.append(f"{exc}; {len(due)} notification(s) kept for the next evaluation"
                                 if exc.retryable else f"{exc}; dropped (sending again would not help)")
            if exc.retryable:
                return
        except Exception as exc:
            report.errors.append(f"notifying failed ({type(exc).__name__}: {exc}); retrying next evaluation")
            return
        for r in due:
            records[r.fingerprint] = lc.delivered(r, now)
        report.sent = len(due)

    def _store(self, before: dict[str, AlertRecord], now: int, report: EvalReport) -> None:
        records = self._records
        assert records is not None
        for fp, rec in records.items():
            old = before.get(fp)
            if old is None or _essential(old) != _essential(rec):
                self._dirty.add(fp)
            elif rec.open and now - self._written_at.get(fp, 0) >= self.resend_ms:
                self._dirty.add(fp)  # keep last_eval, value and annotations fresh for dashboards
        todo = [records[fp] for fp in sorted(self._dirty)]
        stamped = [lc.replace(r, revision=lc.next_revision(r, now)) for r in todo]
        try:
            self.alert_store.write(stamped)
        except Exception as exc:
            report.errors.append(f"writing {len(todo)} alert(s) to {self.store.table('alerts')} failed, retrying next "
                                 f"evaluation: {exc}")
            return
        for r in stamped:
            records[r.fingerprint] = r
            self._written_at[r.fingerprint] = now
        self._dirty.clear()

    def _finish(self, report: EvalReport) -> EvalReport:
        errors = set(report.errors)
        for e in sorted(errors - self._logged_errors):
            log.warning("alerts: %s", e)
        if self._logged_errors and not errors:
            log.info("alerts: evaluation healthy again")
        self._logged_errors = errors
        self.last_report = report
        if not errors:
            self.liveness.beat(EVALUATED)
        return report

    def open_alerts(self) -> list[AlertRecord]:
        """Pending and firing alerts as this evaluator holds them."""
        return [r for r in (self._records or {}).values() if r.open]


def _essential(rec: AlertRecord) -> tuple[object, ...]:
    return (rec.state, rec.active_at, rec.starts_at, rec.ends_at, rec.sent_state, rec.last_sent_at)


def _render(rule: AnyRule, rec: AlertRecord, cand: Candidate, now: int, runbook_base: str | None = None) -> AlertRecord:
    """Annotations, value and generator URL from the rule's templates and the candidate's context; a relative
    `runbook_url` goes under `runbook_base` (`alerts.runbook_base_url`, `runbook_link`)."""
    ctx = dict(cand.context)
    ctx["active_for"] = format_duration(max(0, now - rec.active_at))
    ctx["since"] = iso(rec.active_at)  # when the condition began, as first seen (a query sees only its window)
    value = cand.value
    if cand.tracks_waste:
        hours = cand.gpus * max(0, cand.last_ms - rec.active_at) / 3_600_000
        ctx["gpu_hours_wasted"] = hours
        if value is None:
            value = hours
    ctx["value"] = value if value is not None else float("nan")
    annotations = {k: _fill(t, ctx) for k, t in rule.annotations.items()}
    if "runbook_url" in annotations:
        annotations["runbook_url"] = runbook_link(annotations["runbook_url"], runbook_base)
    url = _fill(rule.generator_url, ctx) if rule.generator_url else ""
    return lc.replace(rec, annotations=annotations, value=value, generator_url=url)


def _fill(template: str, ctx: dict[str, Any]) -> str:
    try:
        return template.format_map(ctx)
    except (KeyError, ValueError, TypeError, IndexError) as exc:  # validated on load; belt and braces
        return f"{template} (template error: {exc})"
