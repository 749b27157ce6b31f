"""Hand-built wire messages for tests: every value explicit, nothing from the code under test."""

from __future__ import annotations

import time
from collections.abc import Callable

from gpufleet.wire import SCHEMA_VERSION, GpuSample, NodeReport

T0_MS = 1_795_000_000_000  # 2026-11-18T11:06:40Z, a fixed instant
TEST_RAW_TTL_DAYS = 3650
"""Raw-sample TTL of test databases (`ch_target`). ClickHouse applies the TTL by its own clock, already
when it writes a part, so with the shipped 30 days rows dated near `T0_MS` would vanish a month after
T0; ten years keeps them to 2036 (a TTL reaching past 2106, the end of `DateTime`, expires every row
at once). Ingesters under test keep the shipped window (`clickhouse.raw_ttl_days` in their config)
and read a clock near T0 (`clock_at`)."""
H100 = "NVIDIA H100 80GB HBM3"


def gpu(index: int, node: str = "n1", **fields: object) -> GpuSample:
    base: dict[str, object] = {
        "index": index,
        "uuid": f"GPU-{node}-{index}",
        "model": H100,
        "util_gpu_ratio": 0.5,
        "power_w": 300.0,
        "tensor_active_ratio": 0.25,
        "compute_processes": 1,
    }
    base.update(fields)
    return GpuSample(**base)  # type: ignore[arg-type]


def report(
    node: str = "n1",
    seq: int = 0,
    time_ms: int = T0_MS,
    gpus: list[GpuSample] | None = None,
    n_gpus: int = 2,
    interval_ms: int = 1000,
    cluster: str = "c1",
    boot_id: str = "boot-1",
) -> NodeReport:
    return NodeReport(
        schema_version=SCHEMA_VERSION,
        cluster=cluster,
        node=node,
        boot_id=boot_id,
        seq=seq,
        time_ms=time_ms,
        interval_ms=interval_ms,
        gpus=gpus if gpus is not None else [gpu(i, node) for i in range(n_gpus)],
    )


def clock_at(start_ms: int = T0_MS + 3_600_000) -> Callable[[], float]:
    """An ingester clock reading `start_ms` now and running on (default: an hour after `T0_MS`), so
    messages dated near `T0_MS` are inside the ingester's time window whatever today's date."""
    started = time.monotonic()
    return lambda: start_ms / 1000 + (time.monotonic() - started)
