"""Board uids and the header links that join the boards (each keeps time range and variables)."""

from __future__ import annotations

from typing import Final

from gpufleet.dashboards.builder import JSON, board_link, data_link, override

FLEET: Final = "gpufleet-fleet"
TENANT: Final = "gpufleet-tenant"
HEALTH: Final = "gpufleet-health"
GPU: Final = "gpufleet-gpu"
BILLING: Final = "gpufleet-billing"
ALERTS: Final = "gpufleet-alerts"
JOBS: Final = "gpufleet-jobs"

_TITLES: Final = {
    FLEET: "Fleet overview",
    TENANT: "Tenants",
    JOBS: "Jobs",
    HEALTH: "GPU health",
    GPU: "GPU detail",
    BILLING: "Billing",
    ALERTS: "Alerts",
}


def nav(current: str) -> tuple[JSON, ...]:
    """Links to every other board, in a fixed order."""
    return tuple(board_link(title, uid) for uid, title in _TITLES.items() if uid != current)


GPU_KEY: Final = "gpu_hex"
"""The column (`hex(gpu_uuid)`, hidden) that a table linking to the GPU board returns for the link."""


def gpu_detail_url(key_field: str = GPU_KEY) -> str:
    """A data link to the per-GPU board for the GPU of the clicked row, same time range.

    The `gpu` variable's values are UUIDs in hex (`fragments.options`), so the link passes the row's
    `key_field` column, never the UUID text (hex needs no URL encoding).
    """
    return f"/d/{GPU}/gpu-detail?var-gpu=${{__data.fields.{key_field}}}&${{__url_time_range}}"


def gpu_detail(column: str = "gpu_uuid") -> tuple[JSON, JSON]:
    """Overrides: `column`'s cells link to the GPU board, and the `gpu_hex` column the link reads is hidden."""
    return data_link(column, "GPU detail", gpu_detail_url()), override(GPU_KEY, custom__hidden=True)
