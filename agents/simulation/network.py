"""A simulated node's InfiniBand ports: one 400G NDR port per GPU (`mlx5_<gpu>` port 1, a rail-optimised
HGX node), and what an `ib_port_flap` fault does to the port of its GPU.

A flap (`ib_port_flap`) takes the port down (state DOWN, physical state Polling) for `FLAP_DOWN_MS` from
the fault's start, counting one `link_downed` and one `link_error_recovery`; back up, the link stays
noisy until the fault ends: `SYMBOL_ERRORS_PER_S` symbol errors and `RCV_ERRORS_PER_S` receive errors a
second. `ib_port_down` keeps the port down for its whole window (one `link_downed`). Counters are
cumulative, so they keep their value after the fault. Everything is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gpufleet.agents.simulation import faults as fk
from gpufleet.agents.simulation.faults import Fault
from gpufleet.agents.simulation.rng import unit
from gpufleet.node_facts import IB_PHYS_LINK_UP, IB_STATE_ACTIVE
from gpufleet.wire import NetworkPort

RATE_GBPS: Final = 400.0
FLAP_DOWN_MS: Final = 20_000
SYMBOL_ERRORS_PER_S: Final = 50
RCV_ERRORS_PER_S: Final = 2
IB_DOWN: Final = 1
PHYS_POLLING: Final = 2
_BASE_SYMBOL = 7
"""Salt of the port's pre-existing symbol errors (a few, from cabling at install: not a fault)."""


def port_device(gpu: int) -> str:
    """The RDMA device paired with GPU `gpu`."""
    return f"mlx5_{gpu}"


def node_ports(seed: int, node: int, gpus: int, t_ms: int, flaps: Mapping[int, Fault]) -> list[NetworkPort]:
    """The node's ports at `t_ms`; `flaps` maps a GPU index to the port fault (flap or down) on its port."""
    return [_port(seed, node, g, t_ms, flaps.get(g)) for g in range(gpus)]


def _port(seed: int, node: int, gpu: int, t_ms: int, fault: Fault | None) -> NetworkPort:
    symbol = int(5 * unit(seed, node, gpu, _BASE_SYMBOL))
    downed = recovery = rcv = 0
    state, phys = IB_STATE_ACTIVE, IB_PHYS_LINK_UP
    if fault is not None and t_ms >= fault.start_ms:
        flap = fault.kind == fk.IB_PORT_FLAP
        downed, recovery = 1, int(flap)
        down_until = min(fault.start_ms + FLAP_DOWN_MS if flap else fault.end_ms, fault.end_ms)
        if flap:
            noisy_ms = max(0, min(t_ms, fault.end_ms) - down_until)
            symbol += noisy_ms * SYMBOL_ERRORS_PER_S // 1000
            rcv += noisy_ms * RCV_ERRORS_PER_S // 1000
        if t_ms < down_until:
            state, phys = IB_DOWN, PHYS_POLLING
    return NetworkPort(device=port_device(gpu), port=1, link_layer="InfiniBand", state=state, phys_state=phys,
                       rate_gbps=RATE_GBPS, link_downed=downed, link_error_recovery=recovery, symbol_error=symbol,
                       port_rcv_errors=rcv, port_xmit_discards=0)
