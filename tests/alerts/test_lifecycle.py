"""The pure lifecycle and the Alertmanager payload, with times worked out by hand."""

from __future__ import annotations

import pytest

from gpufleet.pipeline.alerts import lifecycle as lc
from gpufleet.pipeline.alerts.alertmanager import AlertmanagerClient, payload

T = 1_795_000_000_000  # 2026-11-18T11:06:40Z
LABELS = {"alertname": "GpuIdleAllocated", "severity": "warning", "node": "n1"}


def _observe(rec, firing: bool, since: int, now: int) -> lc.AlertRecord:
    return lc.observe(rec, alertname="GpuIdleAllocated", severity="warning", labels=LABELS, firing=firing,
                      since_ms=since, now_ms=now)


def test_pending_then_firing_then_resolved() -> None:
    rec = _observe(None, False, T - 60_000, T)
    assert (rec.state, rec.active_at, rec.starts_at, rec.ends_at) == ("pending", T - 60_000, None, None)
    rec = _observe(rec, False, T, T + 5000)  # a later `since` does not move active_at
    assert (rec.state, rec.active_at) == ("pending", T - 60_000)
    rec = _observe(rec, True, T, T + 10_000)
    assert (rec.state, rec.active_at, rec.starts_at) == ("firing", T - 60_000, T + 10_000)
    rec = _observe(rec, False, T + 12_000, T + 15_000)  # a blip in the window: stays firing, startsAt kept
    assert (rec.state, rec.starts_at) == ("firing", T + 10_000)
    rec = lc.close(rec, T + 20_000)
    assert (rec.state, rec.starts_at, rec.ends_at) == ("resolved", T + 10_000, T + 20_000)


def test_pending_that_clears_never_fires() -> None:
    rec = lc.close(_observe(None, False, T, T), T + 5000)
    assert (rec.state, rec.starts_at, rec.ends_at) == ("cleared", None, T + 5000)


def test_a_new_episode_gets_its_own_key_and_a_higher_revision() -> None:
    old = lc.close(_observe(None, True, T, T), T + 5000)
    new = _observe(old, True, T, T + 10_000)  # same `since` as the closed episode (late data)
    assert (new.state, new.active_at, new.starts_at) == ("firing", T + 1, T + 10_000)
    assert new.revision > old.revision
    assert new.fingerprint == old.fingerprint == lc.fingerprint(dict(reversed(list(LABELS.items()))))


def test_due_and_delivered() -> None:
    rec = _observe(None, True, T, T)
    assert lc.due(rec, T, 60_000)
    rec = lc.delivered(rec, T)
    assert not lc.due(rec, T + 59_999, 60_000)
    assert lc.due(rec, T + 60_000, 60_000)  # re-sent every resend interval
    resolved = lc.close(rec, T + 70_000)
    assert lc.due(resolved, T + 70_000, 60_000)
    assert not lc.due(lc.delivered(resolved, T + 70_000), T + 70_000, 60_000)
    assert not lc.due(lc.close(_observe(None, True, T, T), T + 1), T + 1, 60_000)  # never sent: no resolve


def test_payload_firing_and_resolved() -> None:
    rec = _observe(None, True, T - 60_000, T)
    rec = lc.AlertRecord(**{**rec.__dict__, "annotations": {"summary": "s"}, "generator_url": "http://g/x"})
    assert payload(rec, T + 1000, 240_000) == {
        "labels": LABELS, "annotations": {"summary": "s"}, "startsAt": "2026-11-18T11:06:40.000Z",
        "endsAt": "2026-11-18T11:10:41.000Z", "generatorURL": "http://g/x",
    }
    done = lc.close(rec, T + 30_000)
    assert payload(done, T + 31_000, 240_000)["endsAt"] == "2026-11-18T11:07:10.000Z"
    with pytest.raises(ValueError, match="never fired"):
        payload(_observe(None, False, T, T), T, 1)


def test_client_refuses_a_non_http_url_and_hides_credentials() -> None:
    with pytest.raises(ValueError, match=r"'ftp://am:9093' is not http\(s\)://host:port"):
        AlertmanagerClient("ftp://am:9093")
    assert repr(AlertmanagerClient("https://bob:s3cret@am:9093")) == "AlertmanagerClient('https://bob:***@am:9093')"
