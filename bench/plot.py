"""The read path's growth curve as a small PNG (BENCHMARKS.md shows it): p95 against fleet size.

Lines: the worst fleet/tenant question at each size, the median fleet/tenant panel, `gpufleet usage`,
the alert cycle and the worst one-GPU panel; dashed, cost proportional to the GPU count from the
smallest size (what "grows with the fleet" looks like), and the 200 ms target.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def curves(growth: dict[str, Any]) -> dict[str, list[float]]:
    """Label -> p95 per size, from the growth table of bench/read_path.py."""
    sizes = [str(g) for g in growth["sizes"]]
    table = growth["table"]

    def per_size(rows: list[dict[str, Any]], pick: Any) -> list[float]:
        return [pick([r["p95_ms"][g] for r in rows if r["p95_ms"].get(g) is not None] or [0.0]) for g in sizes]

    fleet_panels = [r for r in table if r["scope"] == "fleet" and "/" in r["question"]]
    one_gpu = [r for r in table if r["scope"] == "one_gpu"]
    named = {r["question"]: r for r in table}
    return {
        "worst fleet/tenant panel": per_size(fleet_panels, max),
        "median fleet/tenant panel": per_size(fleet_panels, statistics.median),
        "gpufleet usage": per_size([named["gpufleet usage"]], max),
        "alert cycle": per_size([named["alert cycle"]], max),
        "worst one-GPU panel": per_size(one_gpu, max),
    }


def growth_png(growth: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    sizes = list(growth["sizes"])
    lines = curves(growth)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for label, values in lines.items():
        ax.plot(sizes, values, marker="o", label=label)
    worst = lines["worst fleet/tenant panel"]
    ax.plot(sizes, [worst[0] * g / sizes[0] for g in sizes], linestyle="--", color="grey",
            label="proportional to GPUs")
    ax.axhline(200, color="red", linestyle=":", label="target 200 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(sizes, [f"{g:,}" for g in sizes])
    ax.set_xlabel(f"GPUs ({growth['days']:g} day of history at 10 s)")
    ax.set_ylabel("p95, ms")
    ax.set_title("Read path: p95 against fleet size")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
