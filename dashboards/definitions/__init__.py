"""The board definitions, one module per board; `BOARDS` lists them in the order they are built."""

from __future__ import annotations

from gpufleet.dashboards.builder import Board
from gpufleet.dashboards.definitions import alerts, billing, fleet, gpu, health, jobs, tenant

BOARDS: tuple[Board, ...] = (
    fleet.BOARD, tenant.BOARD, jobs.BOARD, health.BOARD, gpu.BOARD, billing.BOARD, alerts.BOARD,
)
