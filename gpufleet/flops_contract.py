"""The metric contract between a job and the node agent: which OTLP metrics count, and how they name GPUs.

A job reports the model FLOPs it executed as a monotonic counter (an OTel `Counter`, exported as
a monotonic OTLP `Sum`, cumulative or delta temporality) named `gpufleet.job.flops`, unit
`{flop}`. `gpufleet.job.tokens` (`{token}`) and `gpufleet.job.samples` (`{sample}`) follow the
same rules and are optional. Every other metric the job's SDK sends is ignored (counted, never
an error), so a job may point its whole OpenTelemetry pipeline at the agent.

The GPUs a point belongs to come from its attributes, else its resource's, first match wins:
`gpu.uuid` (one UUID), `gpu.uuids` (a list, or a comma-separated string), `cuda.visible_devices`
(the job's `CUDA_VISIBLE_DEVICES`: indices and/or UUIDs, resolved by the agent through the
node's index -> UUID map). `job.id` or `gpufleet.job.id` names the job (diagnostics only: the
tenant and job of a GPU sample come from the allocation source). docs/measured-mfu.md is the
user-facing version of this contract.
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
