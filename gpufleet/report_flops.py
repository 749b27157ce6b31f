"""A job's side of measured MFU: report model FLOPs to the node agent through the OpenTelemetry SDK.

Design notes: docs/design-notes.md#gpufleet-report-flops-py.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from gpufleet.flops_contract import CUDA_VISIBLE_DEVICES, FLOPS, GPU_UUIDS, SAMPLES, TOKENS
from gpufleet.version import __version__

__all__ = ["Reporter", "gpu_attributes", "init", "report_flops", "report_samples", "report_tokens", "shutdown"]

DEFAULT_EXPORT_INTERVAL_MS = 10_000
"""How often the counters are sent unless `OTEL_METRIC_EXPORT_INTERVAL` says otherwise; the agent
spreads each report over the time since the previous one, so this is also the MFU's lag."""

JOB_ID = "gpufleet.job.id"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"


class Reporter:
    """One job process's FLOPs/tokens/samples counters and their exporter."""

    def __init__(
        self,
        job_id: str | None = None,
        *,
        service_name: str | None = None,
        gpus: Sequence[str | int] | None = None,
        device: int | None = None,
        endpoint: str | None = None,
        export_interval_ms: int | None = None,
        exporter: MetricExporter | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`gpus`: the GPUs this process uses (UUIDs or indices), default `CUDA_VISIBLE_DEVICES`;
        `device`: position in that list of the one GPU this process drives (e.g. `LOCAL_RANK`);
        `endpoint`: the agent's base URL, default from the OTEL_* variables."""
        env = os.environ if environ is None else environ
        attributes: dict[str, str | Sequence[str]] = {
            "service.name": service_name or env.get("OTEL_SERVICE_NAME") or job_id or "gpufleet-job",
            "service.instance.id": uuid.uuid4().hex,
            **gpu_attributes(gpus, device, env),
        }
        if job_id:
            attributes[JOB_ID] = job_id
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(endpoint=f"{endpoint.rstrip('/')}/v1/metrics" if endpoint else None)
        if export_interval_ms is None and "OTEL_METRIC_EXPORT_INTERVAL" not in env:
            export_interval_ms = DEFAULT_EXPORT_INTERVAL_MS
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=export_interval_ms)
        self._provider = MeterProvider(metric_readers=[reader], resource=Resource.create(attributes))
        meter = self._provider.get_meter("gpufleet.report_flops", __version__)
        self._flops = meter.create_counter(FLOPS.name, unit=FLOPS.unit, description="Model FLOPs executed")
        self._tokens = meter.create_counter(TOKENS.name, unit=TOKENS.unit, description="Tokens processed")
        self._samples = meter.create_counter(SAMPLES.name, unit=SAMPLES.unit, description="Samples processed")

    def report_flops(self, n: float) -> None:
        """Add `n` model FLOPs executed (e.g. 6 x parameters x tokens for a training step)."""
        self._flops.add(_amount(n, "FLOPs"))

    def report_tokens(self, n: float) -> None:
        self._tokens.add(_amount(n, "tokens"))

    def report_samples(self, n: float) -> None:
        self._samples.add(_amount(n, "samples"))

    def flush(self, timeout_ms: int = 10_000) -> bool:
        """Export now; True when the export succeeded."""
        return self._provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Export what is left and stop (idempotent)."""
        self._provider.shutdown()


def gpu_attributes(
    gpus: Sequence[str | int] | None, device: int | None, environ: Mapping[str, str]
) -> dict[str, str | Sequence[str]]:
    """Resource attributes naming this process's GPUs; `ValueError` when they cannot be told."""
    if gpus is not None:
        entries = [str(g).strip() for g in gpus]
    elif CUDA_ENV in environ:
        entries = [e.strip() for e in environ[CUDA_ENV].split(",") if e.strip()]
    elif device is not None:
        entries = [str(i) for i in range(device + 1)]
    else:
        raise ValueError("cannot tell which GPUs this job uses: set CUDA_VISIBLE_DEVICES, or pass gpus=[...] "
                         "(UUIDs or indices) or device=LOCAL_RANK")
    if device is not None:
        if not 0 <= device < len(entries):
            raise ValueError(f"device={device} but the job sees {len(entries)} GPUs ({','.join(entries) or 'none'})")
        entries = [entries[device]]
    if not entries:
        raise ValueError("the job sees no GPUs (CUDA_VISIBLE_DEVICES is empty); nothing to report FLOPs for")
    if all(e.startswith("GPU-") for e in entries):
        return {GPU_UUIDS: tuple(entries)}
    return {CUDA_VISIBLE_DEVICES: ",".join(entries)}


def _amount(n: float, what: str) -> float:
    value = float(n)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {n!r}")
    return value


_default: Reporter | None = None


def init(job_id: str | None = None, **options: object) -> Reporter:
    """Start reporting for this process (replacing an earlier `init`); options as for `Reporter`."""
    global _default  # noqa: PLW0603 (one reporter per process, like logging.basicConfig)
    if _default is not None:
        _default.shutdown()
    _default = Reporter(job_id, **options)  # type: ignore[arg-type]
    return _default


def report_flops(n: float) -> None:
    """Add `n` model FLOPs executed by this process since the last call."""
    _reporter().report_flops(n)


def report_tokens(n: float) -> None:
    _reporter().report_tokens(n)


def report_samples(n: float) -> None:
    _reporter().report_samples(n)


def shutdown() -> None:
    """Flush and stop the reporter started by `init` (also happens at exit)."""
    global _default  # noqa: PLW0603
    if _default is not None:
        _default.shutdown()
        _default = None


def _reporter() -> Reporter:
    if _default is None:
        raise RuntimeError("call gpufleet.report_flops.init(job_id=...) before reporting")
    return _default
