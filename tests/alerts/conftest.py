"""Fixtures for the alert tests: a real Prometheus Alertmanager per test, and the evaluator's config.

Each test gets its own Alertmanager (free loopback port, temp config and storage) so no test sees
another's alerts. The tests skip only when the Alertmanager binary is not installed
(`apt-get install prometheus-alertmanager`; .ci/run installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.config import Config, parse
from gpufleet.embedded.alertmanager import EmbeddedAlertmanager, find_binary
from gpufleet.pipeline.store.client import Target


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[EmbeddedAlertmanager]:
    """A real Alertmanager, ready (`/-/ready` answered), stopped after the test."""
    if find_binary() is None:
        pytest.skip("Prometheus Alertmanager is not installed: apt-get install prometheus-alertmanager")
    with EmbeddedAlertmanager(tmp_path / "alertmanager") as am:
        yield am


@pytest.fixture
def alerts_cfg(ch_target: Target) -> Config:
    """Config for an evaluator on this test's database. `resend_s` is an hour, so firing alerts say
    they are valid for 4 h: the tests evaluate at instants up to an hour before the wall clock, and
    Alertmanager (which runs on the wall clock) must still see those alerts as active."""
    return parse({
        "clickhouse": {"dsn": ch_target.dsn, "database": ch_target.database},
        "alerts": {"resend_s": 3600},
    })
