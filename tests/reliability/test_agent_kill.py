"""The agent killed with SIGKILL twice while the broker is away: its spool survives, replays, and seq continues.

`gpufleet agent` (a simulated fleet of 2 nodes) runs as a child process and reaches the broker
through `TcpProxy`, which resets every connection until the third start. The spool directory is
read here directly (its layout is documented in agents/spool.py), so what the agent had spooled
before each kill is known independently of the agent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from gpufleet.agents.spool import RECORD_OVERHEAD
from gpufleet.config import KafkaConfig
from gpufleet.kafka import consumer_kwargs, ensure_topics
from gpufleet.wire import decode
from tests.reliability.harness import Child, broker_behind_proxy, gpufleet, wait_until

pytestmark = pytest.mark.integration  # starts a server or a process

NODES = ("default-node-000", "default-node-001")


def spooled(spool_dir: Path) -> dict[str, dict[int, bytes]]:
    """Per node: seq -> message bytes, read from the spool's queue files."""
    out: dict[str, dict[int, bytes]] = {}
    for node in NODES:
        queue = spool_dir / node / "queue"
        files = sorted(queue.glob("*.msg")) if queue.exists() else []
        out[node] = {int(f.name.removesuffix(".msg")): f.read_bytes()[RECORD_OVERHEAD:] for f in files}
    return out


def boot_ids(spool_dir: Path) -> dict[str, str]:
    return {node: json.loads((spool_dir / node / "state.json").read_text())["boot_id"] for node in NODES}


def agent(spool_dir: Path, bootstrap: str, topic: str, log: Path, *extra: str) -> Child:
    return Child(gpufleet("agent", "--backend", "simulated", "--nodes", "2", "--gpus", "2", "--faults", "none",
                          "--interval", "0.2", "--bootstrap", bootstrap, "--topic", topic,
                          "--spool-dir", str(spool_dir), *extra), log).start()


def test_agent_killed_twice_mid_spool_replays_everything_once_in_order(tmp_path: Path, topic: str) -> None:
    spool_dir = tmp_path / "spool"
    with broker_behind_proxy(tmp_path / "tansu.log") as proxy:
        ensure_topics(KafkaConfig(bootstrap_servers=proxy.address), [topic], partitions=2, environ={})
        proxy.cut()  # the broker is unreachable for the first two lives of the agent
        first = agent(spool_dir, proxy.address, topic, tmp_path / "agent1.log")
        wait_until(lambda: all(len(s) >= 5 for s in spooled(spool_dir).values()), "5 messages spooled per node")
        first.kill()
        life1 = spooled(spool_dir)
        boots = boot_ids(spool_dir)
        for node in NODES:
            assert sorted(life1[node]) == list(range(len(life1[node])))

        second = agent(spool_dir, proxy.address, topic, tmp_path / "agent2.log")
        wait_until(lambda: all(len(s) >= len(life1[n]) + 5 for n, s in spooled(spool_dir).items()),
                   "5 more messages spooled per node")
        second.kill()
        life2 = spooled(spool_dir)
        assert boot_ids(spool_dir) == boots  # the same identity across restarts
        for node in NODES:
            assert sorted(life2[node]) == list(range(len(life2[node])))  # seq continued where it stopped
            assert {s: life2[node][s] for s in life1[node]} == life1[node]  # the first life's messages intact

        proxy.pass_through()
        third = agent(spool_dir, proxy.address, topic, tmp_path / "agent3.log", "--duration", "2")
        assert third.proc is not None
        assert third.proc.wait(120) == 0, third.log()[-3000:]
        summary = third.log().split("gpufleet agent: ")[-1]
        intervals = int(summary.split(" intervals")[0])
        backlog = sum(len(life2[node]) for node in NODES)
        assert f"{backlog + 2 * intervals} messages delivered, 0 left spooled" in summary
        assert spooled(spool_dir) == {node: {} for node in NODES}

        consumer = KafkaConsumer(topic, **consumer_kwargs(KafkaConfig(bootstrap_servers=proxy.address),
                                                          group_id=None, environ={}, consumer_timeout_ms=3000))
        got: dict[str, list[tuple[int, bytes]]] = {node: [] for node in NODES}
        try:
            for m in consumer:
                got[m.key.decode()].append((decode(m.value).seq, m.value))
        finally:
            consumer.close()
    for node in NODES:
        total = len(life2[node]) + intervals
        first_seen = dict.fromkeys(seq for seq, _ in got[node])
        assert list(first_seen) == list(range(total)), node  # in order, nothing missing
        assert len(got[node]) == total, node  # and nothing sent twice (no ack was lost here)
        assert {seq: value for seq, value in got[node] if seq in life2[node]} == life2[node]  # byte for byte
        assert {decode(v).boot_id for _, v in got[node]} == {boots[node]}
