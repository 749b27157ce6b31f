"""A restarted evaluator neither re-fires nor loses alerts; an unreachable Alertmanager costs no alert.

Data (one sample a minute): n1 gpu0 fallen off the bus k=1..12; n1 gpu1 allocated to gamma with no
process k=5..40; n1 gpu2 busy and healthy throughout.
"""

from __future__ import annotations

from gpufleet.embedded.broker import free_port
from gpufleet.pipeline.alerts.alertmanager import AlertmanagerClient
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.state import firing_alerts
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.store import Store
from tests.alerts.helpers import MIN, Recording, am_alerts, base_ms, by_name, iso, minute_reports
from tests.builders import gpu


def _gpus(k: int):
    lost = {"error": "GPU is lost", "util_gpu_ratio": None, "tensor_active_ratio": None, "compute_processes": None}
    held = {"util_gpu_ratio": 0.0, "compute_processes": 0} if 5 <= k <= 40 else {}
    return [gpu(0, "n1", tenant="acme", job="j-a", **(lost if k <= 12 else {})),
            gpu(1, "n1", tenant="gamma", job="j-g", **held),
            gpu(2, "n1", tenant="acme", job="j-a")]


def _setup(store: Store) -> int:
    b = base_ms()
    insert_reports(store, minute_reports("n1", b, range(1, 41), _gpus), b)
    return b


def test_restart_sends_nothing_twice_and_keeps_every_alert(alertmanager, alerts_cfg, ch_store) -> None:
    b = _setup(ch_store)
    first = Recording(AlertmanagerClient(alertmanager.url))
    ev1 = Evaluator(alerts_cfg, ch_store, notifier=first)
    ev1.evaluate_once(b + 10 * MIN)  # failing fires; held (k=5..10, needs 10m) is pending since 4m
    assert [[a["labels"]["alertname"] for a in batch] for batch in first.posts] == [["GpuFailing"]]
    before = firing_alerts(ch_store)

    # A new evaluator on the same database: it loads the state, so nothing is due and nothing is sent.
    second = Recording(AlertmanagerClient(alertmanager.url))
    ev2 = Evaluator(alerts_cfg, ch_store, notifier=second)
    report = ev2.evaluate_once(b + 11 * MIN)
    assert report.errors == []
    assert report.fired == []
    assert second.posts == []
    assert firing_alerts(ch_store) == before
    assert [(a["labels"]["alertname"], a["startsAt"]) for a in am_alerts(alertmanager.url)] == [
        ("GpuFailing", iso(b + 10 * MIN))]

    # k=20: the held GPU fires with the active_at the first evaluator saw (4m), not the window start
    # (10m); the failing GPU (healthy since k=13, keep_firing_for 5m) resolves with its original startsAt.
    report = ev2.evaluate_once(b + 20 * MIN)
    assert [r.alertname for r in report.fired] == ["GpuHeldNoProcess"]
    assert [r.alertname for r in report.resolved] == ["GpuFailing"]
    sent = {a["labels"]["alertname"]: a for batch in second.posts for a in batch}
    assert sent["GpuFailing"]["startsAt"] == iso(b + 10 * MIN)
    assert sent["GpuFailing"]["endsAt"] == iso(b + 20 * MIN)
    held = by_name(am_alerts(alertmanager.url))
    assert list(held) == ["GpuHeldNoProcess"]
    assert held["GpuHeldNoProcess"]["annotations"]["summary"] == (
        "Tenant gamma holds GPU 1 on n1 with no process for 16m (job 'j-g' crashed or never started): "
        "0.27 GPU-hours wasted so far")


def test_alertmanager_down_keeps_state_and_delivers_later(alertmanager, alerts_cfg, ch_store) -> None:
    b = _setup(ch_store)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ev = Evaluator(alerts_cfg, ch_store, alertmanager_url=dead)
    report = ev.evaluate_once(b + 10 * MIN)
    assert report.sent == 0
    assert report.errors == [
        f"Alertmanager at {dead} unreachable: ConnectionError; 1 notification(s) kept for the next evaluation"]
    assert [a["alertname"] for a in firing_alerts(ch_store)] == ["GpuFailing"]

    # Alertmanager back: the next evaluation delivers the alert with its original startsAt.
    ev.notifier = AlertmanagerClient(alertmanager.url)
    report = ev.evaluate_once(b + 11 * MIN)
    assert report.errors == []
    assert report.sent == 1
    assert [(a["labels"]["alertname"], a["startsAt"]) for a in am_alerts(alertmanager.url)] == [
        ("GpuFailing", iso(b + 10 * MIN))]

    # Down again while it resolves: the resolve is kept (state resolved, Alertmanager told "firing")...
    ev.notifier = AlertmanagerClient(dead)
    report = ev.evaluate_once(b + 20 * MIN)
    assert [r.alertname for r in report.resolved] == ["GpuFailing"]
    assert report.errors == [
        f"Alertmanager at {dead} unreachable: ConnectionError; 2 notification(s) kept for the next evaluation"]
    assert [a["labels"]["alertname"] for a in am_alerts(alertmanager.url)] == ["GpuFailing"]

    # ...across a restart too: a new evaluator loads the undelivered resolve and sends it.
    restarted = Evaluator(alerts_cfg, ch_store, alertmanager_url=alertmanager.url)
    report = restarted.evaluate_once(b + 21 * MIN)
    assert report.errors == []
    assert [a["labels"]["alertname"] for a in am_alerts(alertmanager.url)] == ["GpuHeldNoProcess"]
    assert [a["alertname"] for a in firing_alerts(ch_store)] == ["GpuHeldNoProcess"]


def test_missing_alerts_table_is_reported_not_raised(alerts_cfg, ch_client, ch_store, ch_target) -> None:
    ch_client.command(f"DROP TABLE {ch_target.database}.alerts")
    report = Evaluator(alerts_cfg, ch_store).evaluate_once(base_ms())
    assert report.errors == [f"table {ch_target.database}.alerts does not exist: run `gpufleet migrate` first"]


def test_run_loop_survives_a_failing_evaluation_and_stops(alerts_cfg, ch_client, ch_store, ch_target) -> None:
    import threading
    import time

    import msgspec

    b = _setup(ch_store)
    calls: list[int] = []

    def clock() -> int:  # the first evaluation blows up; the loop must carry on
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("clock broke")
        return b + 10 * MIN

    cfg = msgspec.structs.replace(alerts_cfg, alerts=msgspec.structs.replace(alerts_cfg.alerts, interval_s=0.05))
    ev = Evaluator(cfg, ch_store, clock=clock)
    stop = threading.Event()
    t = threading.Thread(target=ev.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while ev.last_report is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(30)
    assert not t.is_alive()
    assert ev.last_report is not None
    assert ev.last_report.errors == []
    assert [a["alertname"] for a in firing_alerts(ch_store)] == ["GpuFailing"]
