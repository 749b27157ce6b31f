"""Measured FLOPs from jobs: the node agent's OTLP/HTTP receiver and per-GPU attribution.

Jobs on the node export `gpufleet.job.flops` (an OTel Counter) to the agent's OTLP endpoint
(127.0.0.1:4318 by default); the agent ties each point to GPUs by its attributes, spreads it
over time and GPUs (only GPUs of the reporting job where the allocation source knows it; never
more than their peak), and the runner stamps the result into `GpuSample.flops_measured`.

Modules: `contract` (metric names, attribute keys), `gpus` (attribute -> GPU uuid resolution),
`points` (OTLP request -> validated points), `codec` (HTTP bodies in and out), `attribution`
(counter semantics, proration, splitting, bounds), `metrics` (the receiver's own counters), `receiver`
(the HTTP server, its limits and `flops_source`). docs/measured-mfu.md is the user guide.
"""

from gpufleet.agents.otlp.attribution import Attribution, AttributionSettings
from gpufleet.agents.otlp.metrics import OtlpStats
from gpufleet.agents.otlp.receiver import MetricSource, OtlpReceiver, ReceiverError, ReceiverSettings
from gpufleet.flops_contract import FLOPS, SAMPLES, TOKENS

__all__ = [
    "FLOPS",
    "SAMPLES",
    "TOKENS",
    "Attribution",
    "AttributionSettings",
    "MetricSource",
    "OtlpReceiver",
    "OtlpStats",
    "ReceiverError",
    "ReceiverSettings",
]
