"""The alert evaluator dying between notifying Alertmanager and recording it: receivers hear of it once.

tests/alerts/test_restart.py already proves a restarted evaluator re-fires nothing and loses
nothing when it stopped cleanly between evaluations, and that undelivered notifications survive a
restart. What it leaves out is the one crash window of `Evaluator.evaluate_once`: Alertmanager has
the alert, the `alerts` table does not (the process died before `_store`). Here a real Alertmanager
routes to a webhook receiver served by this test, so what an on-call receiver would get is counted:
exactly one firing notification and, once the GPU is healthy, exactly one resolved one.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpufleet.config import parse
from gpufleet.embedded.alertmanager import EmbeddedAlertmanager, find_binary
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.state import firing_alerts
from gpufleet.pipeline.ingest.rows import insert_reports
from tests.alerts.helpers import MIN, am_alerts, base_ms, minute_reports
from tests.builders import gpu
from tests.reliability.harness import wait_until


class Receiver:
    """A webhook receiver on loopback: records every notification Alertmanager sends it."""

    def __init__(self) -> None:
        got: list[dict[str, Any]] = []
        self.notifications = got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def statuses(self, alertname: str) -> list[str]:
        return [a["status"] for n in self.notifications for a in n["alerts"] if a["labels"]["alertname"] == alertname]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.httpd.shutdown()
    r.httpd.server_close()


@pytest.fixture
def alertmanager(tmp_path: Path, receiver: Receiver) -> Iterator[EmbeddedAlertmanager]:
    if find_binary() is None:
        pytest.skip("Prometheus Alertmanager is not installed: apt-get install prometheus-alertmanager")
    config = f"""\
route:
  receiver: hook
  group_by: ["alertname", "cluster", "node"]
  group_wait: 1s
  group_interval: 2s
  repeat_interval: 4h
receivers:
  - name: hook
    webhook_configs:
      - url: "{receiver.url}"
        send_resolved: true
"""
    with EmbeddedAlertmanager(tmp_path / "alertmanager", config=config) as am:
        yield am


class _Died(RuntimeError):
    """Stands for the process dying: nothing after the notification is recorded."""


def test_evaluator_dying_after_notifying_sends_nothing_twice(alertmanager, receiver, ch_store, ch_target) -> None:
    b = base_ms()
    lost = {"error": "GPU is lost", "util_gpu_ratio": None, "tensor_active_ratio": None, "compute_processes": None}
    reports = minute_reports("n1", b, range(1, 41),
                             lambda k: [gpu(0, "n1", tenant="acme", job="j", **(lost if k <= 12 else {}))])
    insert_reports(ch_store, reports, b)
    cfg = parse({"clickhouse": {"dsn": ch_target.dsn, "database": ch_target.database}, "alerts": {"resend_s": 3600}})

    doomed = Evaluator(cfg, ch_store, alertmanager_url=alertmanager.url)

    def die(*_: object) -> None:
        raise _Died("killed before recording")

    doomed.alert_store.write = die  # type: ignore[method-assign]
    report = doomed.evaluate_once(b + 10 * MIN)
    assert report.sent == 1
    assert firing_alerts(ch_store) == []  # Alertmanager knows, the table does not
    wait_until(lambda: receiver.statuses("GpuFailing") == ["firing"], "the firing notification")

    restarted = Evaluator(cfg, ch_store, alertmanager_url=alertmanager.url)
    report = restarted.evaluate_once(b + 11 * MIN)
    assert report.errors == []
    assert report.sent == 1  # it cannot know Alertmanager has it, so it says it again...
    assert [a["labels"]["alertname"] for a in am_alerts(alertmanager.url)] == ["GpuFailing"]  # ...as the same alert
    assert [a["alertname"] for a in firing_alerts(ch_store)] == ["GpuFailing"]

    report = restarted.evaluate_once(b + 20 * MIN)  # healthy since k=13: resolved
    assert [r.alertname for r in report.resolved] == ["GpuFailing"]
    wait_until(lambda: receiver.statuses("GpuFailing") == ["firing", "resolved"], "the resolved notification")
    time.sleep(3)  # longer than group_interval: a duplicate would have arrived by now
    assert receiver.statuses("GpuFailing") == ["firing", "resolved"]
