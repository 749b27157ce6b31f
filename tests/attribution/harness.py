"""End to end for the attribution tests: node agents tick on a test clock, their spools go through a real
broker (tansu) to the real ingester, into a fresh chDB database, and `gpufleet usage --format json` (the
command, in process) says what each tenant is billed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from kafka import KafkaProducer

from gpufleet.agents.runner import NodeAgent
from gpufleet.agents.sender import Backoff, Sender
from gpufleet.agents.spool import Spool
from gpufleet.cli import cli
from gpufleet.pipeline.store.client import Target
from tests.pipeline.test_ingest import _cfg, _create, _ingester

HOUR_MS = 3_600_000
T_HOUR = 1_795_003_200_000
"""2026-11-18T12:00:00Z: an hour boundary, so each test's hour is one `usage_hourly` row."""
FAST = Backoff(initial_s=0.05, max_s=0.2)


def node_agent(tmp: Path, node: str, collector: Any, allocation: Any, cluster: str = "c1") -> NodeAgent:
    return NodeAgent(cluster=cluster, node=node, collector=collector, spool=Spool(tmp / node, 64 * 1024 * 1024),
                     allocation=allocation)


def tick(agents: Sequence[NodeAgent], times: Iterable[int], interval_ms: int,
         before: Callable[[int], None] = lambda t: None) -> int:
    """Every agent ticks at each time (the interval's end); `before(t)` changes the world first. Messages sent."""
    sent = 0
    for t in times:
        before(t)
        for a in agents:
            sent += a.tick(t, interval_ms) is not None
    return sent


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def deliver_and_ingest(broker: Any, target: Target, topic: str, agents: Sequence[NodeAgent], messages: int) -> None:
    """Send every spooled message to Kafka, then ingest the topic into `target` until all `messages` are stored."""
    cfg = _cfg(broker, target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    sender = Sender(lambda: KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all"), topic,
                    [(a.node, a.spool) for a in agents], backoff=FAST).start()
    try:
        wait_until(lambda: all(a.spool.depth == 0 for a in agents), "the spools to drain")
    finally:
        sender.stop(5)
    ing = _ingester(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: ing.stats.messages >= messages, f"{messages} messages ingested ({ing.stats})")
    finally:
        stop.set()
        thread.join(30)
    assert ing.stats.messages == messages, ing.stats


def billed_seconds(target: Target, start_ms: int = T_HOUR, end_ms: int = T_HOUR + HOUR_MS) -> dict[str, float]:
    """`gpufleet usage --format json` for the window: billable GPU-seconds per tenant (all models)."""
    iso = lambda ms: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))  # noqa: E731
    result = CliRunner().invoke(cli, ["usage", "--dsn", target.dsn, "--database", target.database,
                                      "--from", iso(start_ms), "--to", iso(end_ms), "--format", "json"])
    assert result.exit_code == 0, result.output
    out: dict[str, float] = {}
    for row in json.loads(result.output):
        out[row["tenant"]] = out.get(row["tenant"], 0.0) + row["billable_gpu_seconds"]
    return out


def close_all(agents: Sequence[NodeAgent]) -> None:
    for a in agents:
        a.close()
