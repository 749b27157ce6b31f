"""The status document from a store, and over the status API, with hand-computed values."""

from __future__ import annotations

import json
import urllib.request

from gpufleet.config import Config, with_clickhouse
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries.status import fleet_status
from gpufleet.pipeline.queries.status_api import StatusServer
from gpufleet.pipeline.store import Store
from tests.builders import T0_MS, gpu, report


def _load(store: Store) -> None:
    reports = []
    for s in range(3):
        for n in ("a", "b"):
            gpus = [gpu(0, n, tenant="acme", job="j1"), gpu(1, n, tenant="zeta" if n == "a" else None)]
            reports.append(report(node=n, seq=s, time_ms=T0_MS + 1000 * (s + 1), gpus=gpus))
    # Node c reported once, 60 s before the newest sample: no longer "reporting".
    reports.append(report(node="c", seq=0, time_ms=T0_MS + 3000 - 60_000, n_gpus=1))
    insert_reports(store, reports, ingest_ms=T0_MS + 5000)


def test_status_document(ch_store, ch_target) -> None:
    _load(ch_store)
    cfg = with_clickhouse(Config(), ch_target.dsn, ch_target.database)
    doc = fleet_status(ch_store, cfg)
    assert doc["gpus_reporting"] == 4
    assert doc["nodes_reporting"] == 2
    assert doc["samples_total"] == 3 * 2 * 2 + 1
    assert doc["tenants"] == ["acme", "zeta"]
    assert doc["dlq_total"] == 0
    assert doc["last_sample_at"] == "2026-11-18T11:06:43Z"
    assert doc["alerts_firing"] == []
    # Every GPU sample is 1 s; acme holds 2 GPUs x 3 s, zeta 1 GPU x 3 s; nothing is failing.
    assert doc["billable_gpu_hours_by_tenant"] == {"acme": 6 / 3600, "zeta": 3 / 3600}
    assert doc["health"]["ok"] == 4
    for key in ("fleet_mfu", "fleet_mfu_allocated", "mfu", "mfu_measured_coverage", "billable_gpu_hours"):
        assert key in doc


def test_status_api_serves_the_same_document(ch_store, ch_target) -> None:
    _load(ch_store)
    cfg = with_clickhouse(Config(), ch_target.dsn, ch_target.database)
    server = StatusServer(lambda: fleet_status(ch_store, cfg)).start()
    try:
        with urllib.request.urlopen(f"{server.url}/status", timeout=30) as r:
            served = json.loads(r.read())
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=30) as r:
            assert json.loads(r.read()) == {"ok": True}
    finally:
        server.stop()
    assert served == json.loads(json.dumps(fleet_status(ch_store, cfg), default=str))
