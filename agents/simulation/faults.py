"""Injected faults: what can go wrong with a simulated GPU, node or job, when, and its XID.

A `Fault` is active on the half-open window `[start_ms, end_ms)`. Its XID (if the kind has one) is
an event at `start_ms`, reported once, in the collect interval that contains that instant. A job
fault (`JOB_KINDS`) names one GPU and acts on the whole job holding that GPU at `start_ms`; a node
kind (`NODE_KINDS`) names no GPU; a port kind (`PORT_KINDS`) acts on the InfiniBand port paired with
its GPU. `default_faults` gives the demo one fault of every kind shortly after start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

FELL_OFF_BUS: Final = "fell_off_bus"
ECC_DBE: Final = "ecc_dbe"
PAGE_RETIREMENT_PENDING: Final = "page_retirement_pending"
ROW_REMAP_FAILURE: Final = "row_remap_failure"
THERMAL_THROTTLE: Final = "thermal_throttle"
POWER_THROTTLE: Final = "power_throttle"
NVLINK_ERRORS: Final = "nvlink_errors"
PCIE_REPLAY: Final = "pcie_replay"
NODE_SILENT: Final = "node_silent"
ZOMBIE_PROCESS: Final = "zombie_process"
HELD_NO_PROCESS: Final = "held_no_process"
IDLE_ALLOCATED: Final = "idle_allocated"
JOB_HANG: Final = "job_hang"
STRAGGLER: Final = "straggler"
NEEDS_RESET: Final = "needs_reset"
NEEDS_REBOOT: Final = "needs_reboot"
NEEDS_DRAIN: Final = "needs_drain"
FABRIC_DEGRADED: Final = "fabric_degraded"
IB_PORT_FLAP: Final = "ib_port_flap"
IB_PORT_DOWN: Final = "ib_port_down"
GPU_MISSING: Final = "gpu_missing"
DRIVER_DRIFT: Final = "driver_drift"
XID_RECOVERY_ACTION_CHANGED: Final = 154
"""Node-side kinds: `needs_reset` / `needs_reboot` / `needs_drain` set NVML's recovery action (GPU reset,
node reboot, drain P2P) and raise XID 154 ("recovery action changed"); `fabric_degraded` sets the NVSwitch
fabric's degraded-bandwidth bit; `ib_port_flap` takes the InfiniBand port paired with the GPU
(`mlx5_<gpu>`, rail-optimised) down for 20 s and then errors it, `ib_port_down` keeps it down (a pulled
cable); `gpu_missing` drops the GPU from the node's enumeration; `driver_drift` (a node kind) makes the
node report another driver version."""

XID_OF: Final[dict[str, int | None]] = {
    FELL_OFF_BUS: 79,
    ECC_DBE: 48,
    PAGE_RETIREMENT_PENDING: 63,
    ROW_REMAP_FAILURE: 64,
    THERMAL_THROTTLE: None,
    POWER_THROTTLE: None,
    NVLINK_ERRORS: 74,
    PCIE_REPLAY: None,
    NODE_SILENT: None,
    ZOMBIE_PROCESS: None,
    HELD_NO_PROCESS: None,
    IDLE_ALLOCATED: None,
    JOB_HANG: None,
    STRAGGLER: None,
    NEEDS_RESET: XID_RECOVERY_ACTION_CHANGED,
    NEEDS_REBOOT: XID_RECOVERY_ACTION_CHANGED,
    NEEDS_DRAIN: XID_RECOVERY_ACTION_CHANGED,
    FABRIC_DEGRADED: None,
    IB_PORT_FLAP: None,
    IB_PORT_DOWN: None,
    GPU_MISSING: None,
    DRIVER_DRIFT: None,
}
"""Every fault kind and the XID it raises at its start (None: no XID)."""

NODE_KINDS: Final = frozenset({NODE_SILENT, DRIVER_DRIFT})
PORT_KINDS: Final = frozenset({IB_PORT_FLAP, IB_PORT_DOWN})
"""Kinds that act on the InfiniBand port paired with their GPU, not on the GPU."""
"""Kinds that affect a whole node: their `gpu` is None."""

FAULT_KINDS: Final = tuple(XID_OF)

BOOKING_KINDS: Final = frozenset({HELD_NO_PROCESS, IDLE_ALLOCATED})
"""Kinds that need the GPU allocated: the scheduler books it for a job around the window."""

FREE_KINDS: Final = frozenset({ZOMBIE_PROCESS})
"""Kinds that need the GPU unallocated: the scheduler keeps jobs off it during the window."""


JOB_KINDS: Final = frozenset({JOB_HANG, STRAGGLER})
"""Kinds that act on the job holding the named GPU at the fault's start: the scheduler books a job over
the window on that GPU's node, as a whole-node job of its own (so two job faults never share a job),
and keeps its processes running. `job_hang`: every GPU of the job spins in a hung collective (fully
utilized, no tensor work, near-idle power) and the job reports no FLOPs, tokens or samples.
`straggler`: the job runs a busy stretch in which the named GPU's SM clock is held low (no throttle
reason) and its tensor activity is 40 % below its peers'."""

BOOKING_PAD_MS: Final = 10 * 60_000
"""A booked job (for held_no_process / idle_allocated) starts this long before the fault and ends
this long after it, so the fault sits inside an ordinary-looking job."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault on GPU `gpu` of node index `node` (gpu is None for the node kinds)."""

    kind: str
    node: int
    gpu: int | None
    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if self.kind not in XID_OF:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of: {', '.join(FAULT_KINDS)}")
        if self.end_ms <= self.start_ms:
            raise ValueError(f"{self.kind} fault ends ({self.end_ms}) before it starts ({self.start_ms})")
        if (self.gpu is None) != (self.kind in NODE_KINDS):
            if self.gpu is None:
                raise ValueError(f"{self.kind} fault needs a gpu index (only {', '.join(sorted(NODE_KINDS))} "
                                 "take gpu=None)")
            raise ValueError(f"{self.kind} affects a whole node: give it gpu=None")

    @property
    def xid(self) -> int | None:
        return XID_OF[self.kind]

    def active(self, t_ms: int) -> bool:
        return self.start_ms <= t_ms < self.end_ms


def validate(faults: Iterable[Fault], nodes: int, gpus_per_node: int) -> list[Fault]:
    """Check that every fault names a GPU of the fleet and that no GPU needs to be both free and booked."""
    out = list(faults)
    for f in out:
        if not 0 <= f.node < nodes:
            raise ValueError(f"{f.kind} fault names node {f.node}, but the fleet has nodes 0..{nodes - 1}")
        if f.gpu is not None and not 0 <= f.gpu < gpus_per_node:
            raise ValueError(f"{f.kind} fault names gpu {f.gpu}, but nodes have gpus 0..{gpus_per_node - 1}")
    job_nodes = [f.node for f in out if f.kind in JOB_KINDS]
    if len(set(job_nodes)) != len(job_nodes):
        raise ValueError(f"job faults ({', '.join(sorted(JOB_KINDS))}) need a node each: two name node "
                         f"{next(n for n in job_nodes if job_nodes.count(n) > 1)}")
    pinned = {f.node for f in out if f.kind in BOOKING_KINDS | FREE_KINDS}
    if pinned & set(job_nodes):
        raise ValueError(f"node {min(pinned & set(job_nodes))} is split into one-GPU slots for "
                         f"{', '.join(sorted(BOOKING_KINDS | FREE_KINDS))}: put the job fault on another node")
    for a in out:
        for b in out:
            if (
                a.kind in FREE_KINDS
                and b.kind in BOOKING_KINDS
                and (a.node, a.gpu) == (b.node, b.gpu)
                and a.start_ms < b.end_ms + BOOKING_PAD_MS
                and b.start_ms - BOOKING_PAD_MS < a.end_ms
            ):
                raise ValueError(
                    f"{a.kind} needs node {a.node} gpu {a.gpu} unallocated, but {b.kind} books it "
                    "for a job at the same time: move one of them"
                )
    return out


DEFAULT_ORDER: Final[Sequence[str]] = (
    FELL_OFF_BUS,
    ECC_DBE,
    THERMAL_THROTTLE,
    ZOMBIE_PROCESS,
    HELD_NO_PROCESS,
    IDLE_ALLOCATED,
    NEEDS_RESET,
    FABRIC_DEGRADED,
    IB_PORT_FLAP,
    GPU_MISSING,
    DRIVER_DRIFT,
    NEEDS_REBOOT,
    NVLINK_ERRORS,
    PAGE_RETIREMENT_PENDING,
    ROW_REMAP_FAILURE,
    POWER_THROTTLE,
    PCIE_REPLAY,
)
_REQUIRED_GPU_FAULTS: Final = 6


def default_faults(start_ms: int, *, nodes: int = 32, gpus_per_node: int = 8) -> list[Fault]:
    """The demo's faults: each kind once, on distinct GPUs, starting 20-60 s after `start_ms`
    and clearing 60-90 s later. `node_silent` takes the last node and `driver_drift` the one before
    it; the kinds that pin a GPU's allocation (zombie_process, held_no_process, idle_allocated) share
    node 0, so only that node is split into one-GPU slots; the others (in `DEFAULT_ORDER`, as many as
    there are GPU slots) spread over the remaining nodes. Then a hung job and a straggler, each on a node
    of its own (the highest below the silent one that no pinned fault split), starting 20 and 25 s after
    `start_ms`, lasting a minute."""
    if nodes < 2:
        raise ValueError("default_faults needs at least 2 nodes (one of them goes silent)")
    slots = (nodes - 1) * gpus_per_node
    if slots < _REQUIRED_GPU_FAULTS:
        raise ValueError(
            f"default_faults needs at least {_REQUIRED_GPU_FAULTS} GPUs outside the silent node, the fleet has {slots}"
        )
    kinds = [*DEFAULT_ORDER[:slots], NODE_SILENT]
    spread = [(n, (k + 3 * n) % gpus_per_node) for k in range(gpus_per_node) for n in [*range(1, nodes - 1), 0]]
    pinned = [(0, g) for g in range(gpus_per_node)] + spread
    used: set[tuple[int, int]] = set()
    n = len(kinds)
    faults = []
    for i, kind in enumerate(kinds):
        start = start_ms + 20_000 + 40_000 * i // (n - 1)
        end = start + 60_000 + 30_000 * ((i * 7) % n) // (n - 1)
        if kind in NODE_KINDS:
            faults.append(Fault(kind, nodes - 1 if kind == NODE_SILENT else max(0, nodes - 2), None, start, end))
            continue
        node, gpu = next(g for g in (pinned if kind in FREE_KINDS | BOOKING_KINDS else spread) if g not in used)
        used.add((node, gpu))
        faults.append(Fault(kind, node, gpu, start, end))
    return faults + _job_faults(start_ms, nodes, gpus_per_node, faults)


def _job_faults(start_ms: int, nodes: int, gpus_per_node: int, placed: list[Fault]) -> list[Fault]:
    """The demo's hung job and straggler, each on a node of its own from the highest down: not the silent
    last node, nor a node split into one-GPU slots for the faults `placed` there."""
    split = {f.node for f in placed if f.kind in BOOKING_KINDS | FREE_KINDS}
    free = [n for n in range(nodes - 2, -1, -1) if n not in split]
    used = {(f.node, f.gpu) for f in placed}
    out = []
    for i, (kind, node) in enumerate(zip((JOB_HANG, STRAGGLER), free, strict=False)):
        gpu = next((g for g in range(gpus_per_node) if (node, g) not in used), 0)
        start = start_ms + 20_000 + 5_000 * i
        out.append(Fault(kind, node, gpu, start, start + 60_000))
    return out
