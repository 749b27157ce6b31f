"""The simulated collector backend: a deterministic fleet with jobs, faults and ground truth.

Use it where there is no GPU (demo, tests, benchmarks)::

    fleet = SimulatedFleet(nodes=4, start_ms=now_ms, faults=default_faults(now_ms, nodes=4))
    node = fleet.nodes[0]                   # a Collector: node.collect(now_ms) -> [GpuSample]
    source = node.allocation_source()       # an AllocationSource matching the ground truth
    fleet.write_ground_truth("truth.json", start_ms, end_ms)

The implementation lives in the `agents.simulation` package; this module is its public surface.
"""

from gpufleet.agents.collectors.base import NodeDown
from gpufleet.agents.simulation.faults import FAULT_KINDS, XID_OF, Fault, default_faults
from gpufleet.agents.simulation.fleet import SimulatedAllocationSource, SimulatedFleet, SimulatedNode, tenant_name
from gpufleet.agents.simulation.reports import simulate_reports

__all__ = [
    "FAULT_KINDS",
    "XID_OF",
    "Fault",
    "NodeDown",
    "SimulatedAllocationSource",
    "SimulatedFleet",
    "SimulatedNode",
    "default_faults",
    "simulate_reports",
    "tenant_name",
]
