"""Ground truth of a simulated fleet: which GPUs exist, who held them when, and what broke.

Design notes: docs/design-notes.md#agents-simulation-truth-py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.agents.simulation import faults as fk
from gpufleet.agents.simulation.faults import JOB_KINDS, Fault
from gpufleet.agents.simulation.network import port_device

if TYPE_CHECKING:
    from gpufleet.agents.simulation.fleet import SimulatedFleet


def ground_truth(fleet: SimulatedFleet, start_ms: int, end_ms: int) -> dict[str, Any]:
    """The truth of `[start_ms, end_ms)` as plain JSON-ready data."""
    gpus_per_node = fleet.gpus_per_node

    def uuid(node: int, gpu: int | None) -> str | None:
        return None if gpu is None else fleet.gpu_const(node, gpu).uuid

    allocations = [
        {
            "tenant": job.tenant,
            "job": job.id,
            "node": fleet.node_names[node],
            "gpu": gpu,
            "uuid": uuid(node, gpu),
            "start_ms": job.start_ms,
            "end_ms": job.end_ms,
        }
        for job in fleet.jobs_between(start_ms, end_ms)
        for node, gpu in job.gpus
    ]
    allocations.sort(key=lambda a: (a["start_ms"], a["node"], a["gpu"]))
    faults = [
        {
            "kind": f.kind,
            "node": fleet.node_names[f.node],
            "gpu": f.gpu,
            "uuid": uuid(f.node, f.gpu),
            "xid": f.xid,
            "port": f"{port_device(f.gpu)}/1" if f.kind in fk.PORT_KINDS and f.gpu is not None else None,
            "start_ms": f.start_ms,
            "end_ms": f.end_ms,
            **_job_of(fleet, f),
        }
        for f in sorted(fleet.faults, key=lambda f: (f.start_ms, f.node, f.gpu or 0, f.kind))
        if f.start_ms < end_ms and f.end_ms > start_ms
    ]
    return {
        "cluster": fleet.cluster,
        "seed": fleet.seed,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "nodes": list(fleet.node_names),
        "gpus": [
            {"node": name, "index": g, "uuid": uuid(n, g), "model": fleet.model}
            for n, name in enumerate(fleet.node_names)
            for g in range(gpus_per_node)
        ],
        "allocations": allocations,
        "faults": faults,
    }


def _job_of(fleet: SimulatedFleet, fault: Fault) -> dict[str, Any]:
    """A job fault's job: tenant, id, nodes and GPUs (nothing for other faults)."""
    if fault.kind not in JOB_KINDS:
        return {}
    job = fleet.fault_job(fault)
    if job is None:
        return {"tenant": None, "job": None, "nodes": [], "gpus": []}
    return {
        "tenant": job.tenant,
        "job": job.id,
        "nodes": sorted({fleet.node_names[n] for n, _ in job.gpus}),
        "gpus": [{"node": fleet.node_names[n], "gpu": g, "uuid": fleet.gpu_const(n, g).uuid} for n, g in job.gpus],
    }


def write(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write the truth as JSON (atomically: a reader never sees half a file)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(p)
