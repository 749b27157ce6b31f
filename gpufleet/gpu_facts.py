"""Facts about GPUs that several parts share: peak FLOP/s and default power limit per model, NVML's throttle bits.

Peak figures are dense BF16 tensor FLOP/s per GPU (half the datasheet's "with sparsity" figure),
the denominator of MFU. Sources: NVIDIA and AMD datasheets, as tabulated by torchtitan's
`get_peak_flops`. Config `peak_flops` overrides or extends this table; a model found in neither
is *unknown*: flagged, excluded from MFU, never counted as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class PeakFlops:
    flops: float
    """Dense BF16 tensor FLOP/s."""
    source: str
    patterns: tuple[str, ...]
    """Lower-case substrings of NVML's model name that identify the model (first match wins)."""


TERA: Final = 1e12

# Order matters: the more specific names come first (H100 NVL before H100 PCIe before H100).
PEAK_TABLE: Final[dict[str, PeakFlops]] = {
    "GB200": PeakFlops(2500 * TERA, "NVIDIA GB200 NVL72 datasheet, per GPU, dense BF16", ("gb200",)),
    "B200": PeakFlops(2250 * TERA, "NVIDIA B200 datasheet (HGX B200), dense BF16", ("b200",)),
    "H200": PeakFlops(989 * TERA, "NVIDIA H200 SXM datasheet, dense BF16", ("h200",)),
    "H100 NVL": PeakFlops(835 * TERA, "NVIDIA H100 NVL datasheet, dense BF16", ("h100 nvl",)),
    "H100 PCIe": PeakFlops(756 * TERA, "NVIDIA H100 PCIe datasheet, dense BF16", ("h100 pcie",)),
    "H100 SXM": PeakFlops(989 * TERA, "NVIDIA H100 SXM datasheet, dense BF16", ("h100 80gb hbm3", "h100 sxm", "h100")),
    "A100": PeakFlops(312 * TERA, "NVIDIA A100 datasheet (SXM and PCIe), dense BF16", ("a100",)),
    "MI300X": PeakFlops(1307.4 * TERA, "AMD Instinct MI300X datasheet, dense BF16", ("mi300x",)),
}


def canonical_model(name: str, overrides: Mapping[str, float] | None = None) -> str | None:
    """The table key for an NVML model name (e.g. 'NVIDIA H100 80GB HBM3' -> 'H100 SXM'), or None."""
    if overrides and name in overrides:
        return name
    low = name.lower()
    for key, peak in PEAK_TABLE.items():
        if any(p in low for p in peak.patterns):
            return key
    return None


def peak_flops(name: str, overrides: Mapping[str, float] | None = None) -> float | None:
    """Peak dense BF16 FLOP/s for a model name, from config overrides first, else the table; None if unknown."""
    if overrides and name in overrides:
        return float(overrides[name])
    key = canonical_model(name)
    return PEAK_TABLE[key].flops if key else None


@dataclass(frozen=True)
class PowerLimit:
    watts: float
    """The board's default power limit (TDP), W."""
    source: str
    patterns: tuple[str, ...]
    """Lower-case substrings of NVML's model name (first match wins), as in `PEAK_TABLE`."""


# The fallback for a GPU whose enforced power limit is not known (no NVML reading on the sample):
# the model's default board power. Order matters, as in PEAK_TABLE (specific names first).
POWER_LIMIT_TABLE: Final[dict[str, PowerLimit]] = {
    "GB200": PowerLimit(1200, "NVIDIA GB200 NVL72 datasheet, per GPU (configurable up to 1,200 W)", ("gb200",)),
    "B200": PowerLimit(1000, "NVIDIA B200 datasheet (HGX B200), up to 1,000 W", ("b200",)),
    "H200 NVL": PowerLimit(600, "NVIDIA H200 NVL datasheet, up to 600 W", ("h200 nvl",)),
    "H200": PowerLimit(700, "NVIDIA H200 SXM datasheet, up to 700 W", ("h200",)),
    "H100 NVL": PowerLimit(400, "NVIDIA H100 NVL datasheet, 350-400 W", ("h100 nvl",)),
    "H100 PCIe": PowerLimit(350, "NVIDIA H100 PCIe datasheet, 300-350 W", ("h100 pcie",)),
    "H100 SXM": PowerLimit(700, "NVIDIA H100 SXM datasheet, up to 700 W", ("h100",)),
    "A100 PCIe": PowerLimit(300, "NVIDIA A100 PCIe 80GB datasheet, 300 W", ("a100 80gb pcie", "a100-pcie")),
    "A100": PowerLimit(400, "NVIDIA A100 SXM datasheet, 400 W", ("a100",)),
    "MI300X": PowerLimit(750, "AMD Instinct MI300X datasheet, 750 W", ("mi300x",)),
}


def default_power_limit_w(name: str) -> float | None:
    """The model's default power limit (W) for an NVML model name, or None when the table does not know it."""
    low = name.lower()
    return next((p.watts for p in POWER_LIMIT_TABLE.values() if any(s in low for s in p.patterns)), None)


# NVML clocks-event (throttle) reason bits, nvmlClocksEventReason*.
THROTTLE_GPU_IDLE: Final = 0x1
THROTTLE_APP_CLOCKS: Final = 0x2
THROTTLE_SW_POWER_CAP: Final = 0x4
THROTTLE_HW_SLOWDOWN: Final = 0x8
THROTTLE_SYNC_BOOST: Final = 0x10
THROTTLE_SW_THERMAL: Final = 0x20
THROTTLE_HW_THERMAL: Final = 0x40
THROTTLE_HW_POWER_BRAKE: Final = 0x80
THROTTLE_THERMAL_MASK: Final = THROTTLE_SW_THERMAL | THROTTLE_HW_THERMAL
THROTTLE_POWER_MASK: Final = THROTTLE_SW_POWER_CAP | THROTTLE_HW_POWER_BRAKE | THROTTLE_HW_SLOWDOWN
