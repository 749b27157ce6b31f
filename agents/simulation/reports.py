"""Complete wire messages from a simulated fleet without an agent or Kafka, for tests and benchmarks.

`simulate_reports` does what the agent runtime does each interval, minus the I/O: collect every
node, stamp tenant and job from the node's allocation, add the node's enumeration and network ports,
number the messages per node. A node inside
a node_silent window sends nothing (its sequence does not advance).
"""

from __future__ import annotations

from collections.abc import Iterator

from gpufleet.agents.collectors.base import NodeDown
from gpufleet.agents.simulation.fleet import SimulatedFleet
from gpufleet.agents.simulation.rng import text_key
from gpufleet.wire import SCHEMA_VERSION, NodeReport


def boot_id(fleet: SimulatedFleet, node: int) -> str:
    """A stable boot id per (seed, cluster, node)."""
    return f"sim-{text_key(f'{fleet.seed}/{fleet.cluster}/{fleet.node_names[node]}'):016x}"


def simulate_reports(fleet: SimulatedFleet, start_ms: int, end_ms: int, interval_ms: int) -> Iterator[NodeReport]:
    """Reports for the intervals ending at `start_ms + k * interval_ms` (k >= 1) up to `end_ms`
    inclusive, time-major then node order. `seq` starts at 0 per node. Uses fresh node
    collectors, so the fleet's own `nodes` keep their state."""
    if interval_ms < 1:
        raise ValueError("interval_ms must be positive")
    nodes = [fleet.make_node(i, interval_ms) for i in range(len(fleet.node_names))]
    sources = [node.allocation_source() for node in nodes]
    ports = [node.network_source() for node in nodes]
    boots = [boot_id(fleet, i) for i in range(len(nodes))]
    seqs = [0] * len(nodes)
    for t in range(start_ms + interval_ms, end_ms + 1, interval_ms):
        for i, node in enumerate(nodes):
            try:
                gpus = node.collect(t)
            except NodeDown:
                continue
            allocations = sources[i].read()  # at the node's last collect: t
            for sample in gpus:
                alloc = allocations.get(sample.index)
                if alloc is not None:
                    sample.tenant = alloc.tenant
                    sample.job = alloc.job
            yield NodeReport(
                schema_version=SCHEMA_VERSION,
                cluster=fleet.cluster,
                node=node.name,
                boot_id=boots[i],
                seq=seqs[i],
                time_ms=t,
                interval_ms=interval_ms,
                gpus=gpus,
                gpus_expected=node.enumeration.expected,
                gpus_missing=list(node.enumeration.missing),
                network=ports[i].read(),
            )
            seqs[i] += 1
