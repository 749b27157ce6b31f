"""The metric contract between a job and the node agent: which OTLP metrics count, and how they name GPUs.

Design notes: docs/design-notes.md#gpufleet-flops-contract-py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class MetricContract:
    """One metric a job may report: its name and the units accepted for it."""

    name: str
    unit: str
    """The unit to declare (UCUM annotation); "" and "1" are accepted as well."""


FLOPS: Final = MetricContract("gpufleet.job.flops", "{flop}")
TOKENS: Final = MetricContract("gpufleet.job.tokens", "{token}")
SAMPLES: Final = MetricContract("gpufleet.job.samples", "{sample}")

CONTRACT: Final[dict[str, MetricContract]] = {m.name: m for m in (FLOPS, TOKENS, SAMPLES)}
"""The metrics the receiver validates and accepts, by name."""

UNITLESS: Final = frozenset({"", "1"})

GPU_UUID: Final = "gpu.uuid"
GPU_UUIDS: Final = "gpu.uuids"
CUDA_VISIBLE_DEVICES: Final = "cuda.visible_devices"
GPU_KEYS: Final = (GPU_UUID, GPU_UUIDS, CUDA_VISIBLE_DEVICES)
"""Attribute keys that tie a point to GPUs, most specific first."""

JOB_KEYS: Final = ("job.id", "gpufleet.job.id")
"""Attribute keys naming the job, first match wins."""

METRICS_PATH: Final = "/v1/metrics"
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
