"""JobStalled and JobStraggler on hand-built one-minute samples, checked in a real Alertmanager, with the
negative cases next to each positive one: a busy job with slow steps, a job with one hung GPU, a job
that reports FLOPs, an unknown model; a job whose GPUs all throttle, an idle job, a one-GPU job."""

from __future__ import annotations

from typing import Any

from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.queries import build, iso
from gpufleet.pipeline.alerts.rules import parse_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.wire import GpuSample
from tests.alerts.helpers import MIN, am_alerts, base_ms, minute_reports
from tests.builders import gpu

H100_PEAK = 989e12

RULES = {"rules": [
    {"name": "JobStalled", "kind": "job_stalled", "severity": "warning", "for": "5m",
     "annotations": {"summary": "{job} ({tenant}) hung since {since} on {gpus} GPUs of {nodes}: "
                                "{util_pct:.0f}% util, {power_pct:.1f}% power; {gpu_hours_wasted:.2f} GPU-h",
                     "gpus": "{gpu_list}"}},
    {"name": "JobStraggler", "kind": "job_straggler", "severity": "warning", "for": "5m",
     "annotations": {"summary": "{job}: {scope} on {node}: {cause}",
                     "numbers": "{clock_mhz:.0f}/{job_clock_mhz:.0f} MHz, {tensor_pct:.0f}/{job_tensor_pct:.0f}%, "
                                "{job_gpus} GPUs, value {value:.3f}"}},
]}


def _busy(i: int, node: str, job: str, **over: Any) -> GpuSample:
    fields = {"tenant": "acme", "job": job, "util_gpu_ratio": 0.95, "tensor_active_ratio": 0.5,
              "sm_active_ratio": 0.9, "power_w": 600.0, "clock_sm_mhz": 1980, "clock_event_reasons": 0,
              "compute_processes": 1, **over}
    return gpu(i, node, **fields)


def _hung(i: int, node: str, job: str, **over: Any) -> GpuSample:
    """What a GPU spinning in a hung collective reports: ~100 % busy, no tensor work, ~13 % of 700 W."""
    return _busy(i, node, job, util_gpu_ratio=1.0, tensor_active_ratio=0.0, sm_active_ratio=0.2, power_w=90.0,
                 **over)


def _load(store: Any, b: int, nodes: dict[str, Any]) -> None:
    reports = []
    for node, gpus in nodes.items():
        reports += minute_reports(node, b, range(1, 13), lambda k, g=gpus, n=node: g(k, n))
    insert_reports(store, reports, b)


def _evaluator(alerts_cfg: Any, store: Any, url: str, name: str) -> Evaluator:
    return Evaluator(alerts_cfg, store, alertmanager_url=url,
                     rules=parse_rules({"rules": [r for r in RULES["rules"] if r["name"] == name]}))


def test_job_stalled_fires_for_a_hung_job_and_not_for_look_alikes(alertmanager, alerts_cfg, ch_store) -> None:
    b = base_ms()

    def n1(k: int, node: str) -> list[GpuSample]:
        state = _hung if k >= 6 else _busy  # "train" hangs from minute 5 on: samples k >= 6
        return [state(0, node, "train"), state(1, node, "train"),
                # "steady": a busy job whose every other step waits (stall-like for a minute, then busy)
                (_hung if k % 2 else _busy)(2, node, "steady"),
                # "half": one GPU hung, its peer busy: not the whole job
                _hung(3, node, "half")]

    def n2(k: int, node: str) -> list[GpuSample]:
        state = _hung if k >= 6 else _busy
        return [state(0, node, "train"), _busy(1, node, "half"),
                # "measured": hung-looking counters, but the job reports 30 % MFU: it computes
                _hung(2, node, "measured", flops_measured=0.3 * H100_PEAK * 60),
                # an unknown model: no power limit to compare with, so never called stalled
                _hung(3, node, "mystery", model="Mystery GPU 9000")]

    _load(ch_store, b, {"n1": n1, "n2": n2})
    ev = _evaluator(alerts_cfg, ch_store, alertmanager.url, "JobStalled")

    report = ev.evaluate_once(b + 9 * MIN)  # k=6..9: 4 of the 5 minutes; "steady" is in a slow step
    assert report.errors == []
    assert sorted((r.labels["job"], r.state) for r in ev.open_alerts()) == [("steady", "pending"),
                                                                           ("train", "pending")]
    assert am_alerts(alertmanager.url) == []

    report = ev.evaluate_once(b + 10 * MIN)  # k=6..10: the stall reaches back 5 minutes
    assert report.errors == []
    (alert,) = am_alerts(alertmanager.url)
    assert alert["labels"] == {"alertname": "JobStalled", "severity": "warning", "cluster": "c1",
                               "tenant": "acme", "job": "train"}
    # active since the end of the last busy sample (k=5); 3 GPUs x 5 minutes = 0.25 GPU-hours
    assert alert["annotations"]["summary"] == (
        f"train (acme) hung since {iso(b + 5 * MIN)} on 3 GPUs of n1, n2: 100% util, 12.9% power; 0.25 GPU-h")
    assert alert["annotations"]["gpus"] == "GPU-n1-0, GPU-n1-1, GPU-n2-0"
    assert alert["startsAt"] == iso(b + 10 * MIN)
    (rec,) = ev.open_alerts()  # the slow step ended: "steady" cleared without firing
    assert (rec.labels["job"], rec.value) == ("train", 0.25)

    # k=11: one GPU of "train" computes again: no longer the whole job, the alert resolves.
    ch_store.command(f"ALTER TABLE {ch_store.table('gpu_samples')} DELETE WHERE gpu_uuid = 'GPU-n2-0' "
                     f"AND time > fromUnixTimestamp64Milli({b + 10 * MIN})")
    insert_reports(ch_store, minute_reports("n2", b, [11], lambda k: [_busy(0, "n2", "train")]), b)
    report = ev.evaluate_once(b + 11 * MIN)
    assert [r.labels["job"] for r in report.resolved] == ["train"]


def test_job_straggler_names_the_gpu_the_node_and_the_cause(alertmanager, alerts_cfg, ch_store) -> None:
    b = base_ms()
    thermal = {"clock_sm_mhz": 1400, "clock_event_reasons": 0x40, "tensor_active_ratio": 0.35}

    def n1(k: int, node: str) -> list[GpuSample]:
        return [_busy(i, node, "big") for i in range(4)]

    def n2(k: int, node: str) -> list[GpuSample]:
        return [_busy(i, node, "big", **thermal) for i in range(4)]  # the whole node runs hot

    def n3(k: int, node: str) -> list[GpuSample]:
        return [_busy(0, node, "pair"), _busy(1, node, "pair", clock_sm_mhz=1500),  # clocks set low
                _busy(2, node, "hot", **thermal), _busy(3, node, "hot", **thermal)]  # all of "hot" throttles

    def n4(k: int, node: str) -> list[GpuSample]:
        return [_busy(0, node, "idle", util_gpu_ratio=0.02, tensor_active_ratio=0.0),  # an idle job: no pace
                _busy(1, node, "idle", util_gpu_ratio=0.02, tensor_active_ratio=0.0, clock_sm_mhz=900),
                _busy(2, node, "solo", **thermal),  # one GPU: no peers to lag behind
                _busy(3, node, "capped", clock_event_reasons=0x4)]  # SW power cap while its peers run free

    def n5(k: int, node: str) -> list[GpuSample]:
        return [_busy(0, node, "capped"), _busy(1, node, "capped"),
                _busy(2, node, "links"), _busy(3, node, "links", tensor_active_ratio=0.3, pcie_replay_count=100 + k)]

    def n6(k: int, node: str) -> list[GpuSample]:
        per_minute = 0.4 * H100_PEAK * 60
        return [_busy(0, node, "links"),
                _busy(1, node, "ranks", flops_measured=per_minute), _busy(2, node, "ranks", flops_measured=per_minute),
                _busy(3, node, "ranks", flops_measured=per_minute / 2)]  # half the FLOPs of its peers

    _load(ch_store, b, {"n1": n1, "n2": n2, "n3": n3, "n4": n4, "n5": n5, "n6": n6})
    ev = _evaluator(alerts_cfg, ch_store, alertmanager.url, "JobStraggler")

    report = ev.evaluate_once(b + 4 * MIN)  # k=1..4: not yet 5 minutes
    assert report.errors == []
    assert am_alerts(alertmanager.url) == []
    assert len(ev.open_alerts()) == 8
    assert {r.state for r in ev.open_alerts()} == {"pending"}

    report = ev.evaluate_once(b + 10 * MIN)
    assert report.errors == []
    got = {(a["labels"]["job"], a["labels"]["node"], a["labels"]["gpu_index"]): a for a in am_alerts(alertmanager.url)}
    assert set(got) == {("big", "n2", str(i)) for i in range(4)} | {
        ("pair", "n3", "1"), ("capped", "n4", "3"), ("links", "n5", "3"), ("ranks", "n6", "3")}
    assert got[("pair", "n3", "1")]["labels"] == {
        "alertname": "JobStraggler", "severity": "warning", "cluster": "c1", "node": "n3", "gpu": "GPU-n3-1",
        "gpu_index": "1", "tenant": "acme", "job": "pair"}
    summaries = {k: a["annotations"]["summary"] for k, a in got.items()}
    assert summaries[("big", "n2", "0")] == "big: node n2 (all 4 of the job's GPUs on it) on n2: thermal throttling"
    assert summaries[("pair", "n3", "1")] == (
        "pair: GPU 1 on n3: SM clock held low (no throttle reason: clocks set or locked low?)")
    assert summaries[("capped", "n4", "3")] == "capped: GPU 3 on n4: power throttling"
    assert summaries[("links", "n5", "3")] == "links: GPU 3 on n5: PCIe/NVLink errors"
    assert summaries[("ranks", "n6", "3")] == (
        "ranks: GPU 3 on n6: tensor activity or FLOPs below the job's median (no throttling, clock or link "
        "errors seen)")
    # medians over the job's GPUs: big (1400 + 1980) / 2 = 1690 MHz, tensor (0.35 + 0.5) / 2; pair 1740 MHz
    assert got[("big", "n2", "0")]["annotations"]["numbers"] == "1400/1690 MHz, 35/42%, 8 GPUs, value 0.828"
    assert got[("pair", "n3", "1")]["annotations"]["numbers"] == "1500/1740 MHz, 50/50%, 2 GPUs, value 0.862"


def test_job_straggler_reads_its_window_once_with_the_same_answer(alerts_cfg, ch_store) -> None:
    """The evaluator's JobStraggler query reads the window's samples once (a materialized CTE, chDB has
    them) and finds exactly the rows of the plain form the boards and Grafana run."""
    b = base_ms()
    thermal = {"clock_sm_mhz": 1400, "clock_event_reasons": 0x40, "tensor_active_ratio": 0.35}
    _load(ch_store, b, {
        "n1": lambda k, node: [_busy(i, node, "big") for i in range(4)],
        "n2": lambda k, node: [_busy(i, node, "big", **thermal) for i in range(4)],
        "n3": lambda k, node: [_busy(0, node, "pair"), _busy(1, node, "pair", clock_sm_mhz=1500)],
    })
    ev = Evaluator(alerts_cfg, ch_store, rules=parse_rules({"rules": [RULES["rules"][1]]}))
    assert ev._has_materialized_cte()
    (rule,) = ev.rules.rules
    now = b + 10 * MIN
    once, plain = build(rule, now, materialized_cte=True), build(rule, now)
    assert "AS MATERIALIZED" in once.sql
    assert "MATERIALIZED" not in plain.sql
    assert once.settings == {"enable_materialized_cte": 1}
    assert plain.settings is None
    keys = ("job", "node", "gpu_index", "job_gpus", "node_job_gpus", "clock_mhz", "job_clock_mhz", "cause",
            "sustained")
    rows = [[tuple(r[k] for k in keys) for r in ch_store.query(q.sql, q.parameters, q.settings).named_results()]
            for q in (once, plain)]
    # medians over the job's GPUs: big (1400 + 1980) / 2 = 1690 MHz, pair (1980 + 1500) / 2 = 1740 MHz
    assert rows[0] == rows[1] == [("big", "n2", i, 8, 4, 1400.0, 1690.0, "thermal_throttle", 1) for i in range(4)] + [
        ("pair", "n3", 1, 2, 2, 1500.0, 1740.0, "clock", 1)]


class _RefusingStore:
    """`ch_store` behind a server that knows `enable_materialized_cte` but refuses it (a settings constraint:
    ClickHouse answers SETTING_CONSTRAINT_VIOLATION, code 452). chDB cannot be configured with a constraint
    here, so this wrapper refuses the setting the way such a server would and passes everything else on."""

    def __init__(self, store: Any) -> None:
        self._store, self.refused = store, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def query(self, sql: str, params: Any = None, settings: Any = None) -> Any:
        if settings and "enable_materialized_cte" in settings:
            self.refused += 1
            raise RuntimeError("Code: 452. DB::Exception: Setting enable_materialized_cte should not be changed. "
                               "(SETTING_CONSTRAINT_VIOLATION)")
        return self._store.query(sql, params, settings)


def test_job_straggler_falls_back_to_the_plain_form_when_the_server_refuses_materialized_ctes(
        alerts_cfg, ch_store) -> None:
    """A server that lists the experimental setting but refuses it costs one refused query: the rule is asked
    again in the plain form in the same cycle, finds its stragglers, and later cycles never ask again."""
    b = base_ms()
    thermal = {"clock_sm_mhz": 1400, "clock_event_reasons": 0x40, "tensor_active_ratio": 0.35}
    _load(ch_store, b, {
        "n1": lambda k, node: [_busy(i, node, "big") for i in range(4)],
        "n2": lambda k, node: [_busy(i, node, "big", **thermal) for i in range(4)],
    })
    store = _RefusingStore(ch_store)
    ev = Evaluator(alerts_cfg, store, rules=parse_rules({"rules": [RULES["rules"][1]]}))  # type: ignore[arg-type]
    report = ev.evaluate_once(b + 4 * MIN)
    assert report.errors == []
    assert store.refused == 1
    assert ev._materialized_cte is False
    assert sorted((r.labels["node"], r.labels["gpu_index"]) for r in ev.open_alerts()) == [
        ("n2", str(i)) for i in range(4)]
    ev.evaluate_once(b + 5 * MIN)
    assert store.refused == 1
