"""Board uids and the header links that join the boards (each keeps time range and variables)."""

from __future__ import annotations

from typing import Final

from dashboards.builder import JSON, board_link

FLEET: Final = "gpufleet-fleet"
TENANT: Final = "gpufleet-tenant"
HEALTH: Final = "gpufleet-health"
GPU: Final = "gpufleet-gpu"
BILLING: Final = "gpufleet-billing"
ALERTS: Final = "gpufleet-alerts"

_TITLES: Final = {
    FLEET: "Fleet overview",
    TENANT: "Tenants",
    HEALTH: "GPU health",
    GPU: "GPU detail",
    BILLING: "Billing",
    ALERTS: "Alerts",
}


def nav(current: str) -> tuple[JSON, ...]:
    """Links to every other board, in a fixed order."""
    return tuple(board_link(title, uid) for uid, title in _TITLES.items() if uid != current)


def gpu_detail_url(uuid_expr: str = "${__value.raw}") -> str:
    """A data link to the per-GPU board for the GPU in the clicked cell, same time range."""
    return f"/d/{GPU}/gpu-detail?var-gpu={uuid_expr}&${{__url_time_range}}"
