"""NVML and sysfs codes the agent carries as numbers and the pipeline names: recovery actions, NVSwitch
fabric state and health, InfiniBand port states.

The agent puts NVML's and the kernel's numbers on the wire unchanged; the health rules, alert queries
and dashboards name them from the tables here (one place, so they cannot drift). Sources: nvml.h
(`nvmlDeviceGpuRecoveryAction_t`, `nvmlGpuFabricState_t`, `NVML_GPU_FABRIC_HEALTH_MASK_*`, as
exported by nvidia-ml-py 13.x; a test checks the values against the installed pynvml) and the Linux
InfiniBand sysfs ABI (`Documentation/ABI/stable/sysfs-class-infiniband`: `state`, `phys_state`).
"""

from __future__ import annotations

from typing import Final

# -- GPU recovery action (field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, 230) ----------------------

RECOVERY_NONE: Final = 0
RECOVERY_GPU_RESET: Final = 1
RECOVERY_NODE_REBOOT: Final = 2
RECOVERY_DRAIN_P2P: Final = 3
RECOVERY_DRAIN_AND_RESET: Final = 4
RECOVERY_RECOVER_IMEX_DOMAIN: Final = 5
RECOVERY_BUS_RESET: Final = 6
RECOVERY_SYSTEM_REBOOT: Final = 7

RECOVERY_ACTIONS: Final[dict[int, str]] = {
    RECOVERY_NONE: "none",
    RECOVERY_GPU_RESET: "gpu_reset",
    RECOVERY_NODE_REBOOT: "node_reboot",
    RECOVERY_DRAIN_P2P: "drain_p2p",
    RECOVERY_DRAIN_AND_RESET: "drain_and_reset",
    RECOVERY_RECOVER_IMEX_DOMAIN: "recover_imex_domain",
    RECOVERY_BUS_RESET: "bus_reset",
    RECOVERY_SYSTEM_REBOOT: "system_reboot",
}
"""NVML_GPU_RECOVERY_ACTION_* value -> the name used in health reasons (`recovery_<name>`) and alert labels."""

RECOVERY_FAILING: Final = frozenset({RECOVERY_GPU_RESET, RECOVERY_NODE_REBOOT, RECOVERY_BUS_RESET,
                                     RECOVERY_SYSTEM_REBOOT})
"""Actions whose GPU cannot run work until the remedy: the sample is failing."""
RESET_ACTIONS: Final = frozenset({RECOVERY_GPU_RESET, RECOVERY_DRAIN_AND_RESET, RECOVERY_BUS_RESET})
"""Actions `GpuNeedsReset` reports (the remedy is a GPU or bus reset)."""
REBOOT_ACTIONS: Final = frozenset({RECOVERY_NODE_REBOOT, RECOVERY_SYSTEM_REBOOT})
"""Actions `NodeNeedsReboot` reports (the remedy is a reboot: a GPU reset is not enough)."""


def recovery_name(action: int) -> str:
    """`gpu_reset` for 1 ...; `action_<n>` for a value newer than this table."""
    return RECOVERY_ACTIONS.get(action, f"action_{action}")


# -- NVSwitch fabric (nvmlDeviceGetGpuFabricInfoV) ---------------------------------------------

FABRIC_NOT_SUPPORTED: Final = 0
FABRIC_NOT_STARTED: Final = 1
FABRIC_IN_PROGRESS: Final = 2
FABRIC_COMPLETED: Final = 3

FABRIC_MASK_TRUE: Final = 1
"""Value of a two-bit health-mask field that says the condition holds (0: not supported, 2: false)."""
FABRIC_MASK_FIELDS: Final[tuple[tuple[str, int], ...]] = (
    ("degraded_bw", 0),
    ("route_recovery", 2),
    ("route_unhealthy", 4),
    ("access_timeout_recovery", 6),
)
"""(name, shift) of the two-bit yes/no fields of the fabric health mask (NVML_GPU_FABRIC_HEALTH_MASK_*)."""
FABRIC_MASK_TRUE_BITS: Final = sum(FABRIC_MASK_TRUE << shift for _, shift in FABRIC_MASK_FIELDS)
"""The bits that are set when any yes/no field says "true" (0x55): one AND finds a sick mask."""
FABRIC_CONFIG_SHIFT: Final = 8
FABRIC_CONFIG_WIDTH: Final = 0xF
FABRIC_CONFIG_OK: Final = frozenset({0, 1})
"""Incorrect-configuration field values that are fine: not supported (0), none (1); 2..8 name a fault."""


def fabric_mask_faults(mask: int) -> list[str]:
    """The fault names a fabric health mask reports, in field order (empty for a healthy mask)."""
    out = [name for name, shift in FABRIC_MASK_FIELDS if (mask >> shift) & 0x3 == FABRIC_MASK_TRUE]
    if (mask >> FABRIC_CONFIG_SHIFT) & FABRIC_CONFIG_WIDTH not in FABRIC_CONFIG_OK:
        out.append("incorrect_configuration")
    return out


# -- InfiniBand / RoCE ports (sysfs) -------------------------------------------------------------

IB_STATES: Final[dict[int, str]] = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
"""`/sys/class/infiniband/<dev>/ports/<n>/state` ("4: ACTIVE"): the logical port state."""
IB_PHYS_STATES: Final[dict[int, str]] = {
    1: "Sleep", 2: "Polling", 3: "Disabled", 4: "PortConfigurationTraining", 5: "LinkUp",
    6: "LinkErrorRecovery", 7: "PhyTest",
}
"""`.../phys_state` ("5: LinkUp"): the physical link state."""
IB_STATE_ACTIVE: Final = 4
IB_PHYS_LINK_UP: Final = 5

PORT_ERROR_COUNTERS: Final = ("link_downed", "link_error_recovery", "symbol_error", "port_rcv_errors",
                              "port_xmit_discards")
"""The `counters/` files the agent reads (cumulative; saturating at their width per the IB spec)."""
