"""VictoriaMetrics as the read-path peer: the same samples as dcgm-exporter-style series.

Debian's `victoria-metrics` runs on a loopback port with its data in a temp dir (retention 100
years for the fixed historical dates; rollup result cache off, so queries are computed each time).
ClickHouse writes `gpu_samples` as VictoriaMetrics' JSON line import format, posted to
`/api/v1/import`: `DCGM_FI_DEV_GPU_UTIL` (%), `DCGM_FI_DEV_POWER_USAGE` (W),
`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (mJ) and a health gauge `gpufleet_health_state` (0 ok to 3
unknown), labelled `gpu`, `UUID`, `Hostname`, `modelName`, `tenant` (a new tenant starts a new
series, as pod labels do). Loaded samples are counted back; storage is measured after a flush and
a forced merge.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.peers import VICTORIA_METRICS, require

METRICS: Final = {
    "DCGM_FI_DEV_GPU_UTIL": "round(toFloat64(util_gpu_ratio) * 100, 2)",
    "DCGM_FI_DEV_POWER_USAGE": "round(toFloat64(power_w), 3)",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "round(energy_j * 1000)",
    "gpufleet_health_state": "toUInt8(health)",
}
"""Series name -> its value from a `gpu_samples` row (dcgm-exporter units)."""

_EXPORT = """
SELECT
    mapFilter((k, v) -> v != '', map('__name__', {{name:String}}, 'gpu', toString(gpu_index),
        'UUID', toString(gpu_uuid), 'Hostname', toString(node), 'modelName', toString(model),
        'tenant', toString(tenant))) AS metric,
    arrayMap(p -> p.2, arraySort(groupArray((ts, v)))) AS values,
    arraySort(groupArray(ts)) AS timestamps
FROM (
    SELECT toUnixTimestamp64Milli(time) AS ts, gpu_index, gpu_uuid, node, model, tenant, {expr} AS v
    FROM {db}.gpu_samples
    WHERE cityHash64(gpu_uuid) % {{chunks:UInt64}} = {{chunk:UInt64}} AND v IS NOT NULL
)
GROUP BY gpu_uuid, gpu_index, node, model, tenant"""


class VictoriaError(RuntimeError):
    """VictoriaMetrics did not start, refused data or a query."""


@dataclass
class VictoriaMetrics:
    """A victoria-metrics process on a free loopback port; use as a context manager."""

    data_dir: Path
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VictoriaMetrics:
        from gpufleet.embedded.broker import free_port, wait_for_port

        binary = require(VICTORIA_METRICS)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self._proc = subprocess.Popen(
            [binary, f"-storageDataPath={self.data_dir}", f"-httpListenAddr=127.0.0.1:{self.port}",
             "-retentionPeriod=100y", "-search.disableCache", "-loggerLevel=ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for_port("127.0.0.1", self.port, 20):
            self.__exit__()
            raise VictoriaError(f"victoria-metrics did not listen on 127.0.0.1:{self.port} within 20 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None

    def _get(self, path: str, params: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        import requests

        r = requests.get(self.url + path, params=params, timeout=timeout)
        if r.status_code != 200:
            raise VictoriaError(f"GET {path} {params}: HTTP {r.status_code} {r.text[:300]}")
        return r

    def import_lines(self, body: bytes) -> None:
        import requests

        r = requests.post(self.url + "/api/v1/import", data=body, timeout=300)
        if r.status_code not in (200, 204):
            raise VictoriaError(f"import refused: HTTP {r.status_code} {r.text[:300]}")

    def query(self, promql: str, at_s: float) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", {"query": promql, "time": at_s}).json()
        return list(data["data"]["result"])

    def query_range(self, promql: str, start_s: float, end_s: float, step_s: int) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query_range",
                         {"query": promql, "start": start_s, "end": end_s, "step": f"{step_s}s"}).json()
        return list(data["data"]["result"])

    def settle(self, timeout_s: float = 120) -> None:
        """Make every imported sample searchable and merge the parts (bounded wait for merges to end)."""
        self._get("/internal/force_flush")
        for prefix in self._partitions():
            self._get("/internal/force_merge", {"partition_prefix": prefix})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._active_merges():
            time.sleep(0.5)
        self._get("/internal/force_flush")

    def _partitions(self) -> list[str]:
        small = self.data_dir / "data" / "small"
        return sorted(p.name for p in small.iterdir() if p.is_dir() and p.name[:4].isdigit()) if small.exists() else []

    def _active_merges(self) -> int:
        total = 0
        for line in self._get("/metrics").text.splitlines():
            if line.startswith("vm_active_merges"):
                with contextlib.suppress(ValueError):
                    total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def storage_bytes(self) -> dict[str, int]:
        """Bytes on disk of the data and the index (caches, snapshots and the lock file excluded)."""
        def size(path: Path) -> int:
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "snapshots" not in p.parts)

        return {"data": size(self.data_dir / "data"), "index": size(self.data_dir / "indexdb")}


def load(vm: VictoriaMetrics, client: Any, db: str, chunks: int = 8) -> dict[str, Any]:
    """Export every sample of `db.gpu_samples` as dcgm-exporter series and import them; returns counts and seconds."""
    exported = imported = 0.0
    body_bytes = 0
    for name, expr in METRICS.items():
        sql = _EXPORT.format(expr=expr, db=db)
        for chunk in range(chunks):
            t = time.perf_counter()
            body = client.raw_query(sql, parameters={"name": name, "chunks": chunks, "chunk": chunk},
                                    fmt="JSONEachRow")
            exported += time.perf_counter() - t
            body_bytes += len(body)
            t = time.perf_counter()
            if body:
                vm.import_lines(body)
            imported += time.perf_counter() - t
    expected = client.query(
        f"SELECT {' + '.join(f'countIf(({e}) IS NOT NULL)' for e in METRICS.values())} FROM {db}.gpu_samples"
    ).result_rows[0][0]
    t = time.perf_counter()
    vm.settle()
    return {"samples": int(expected), "series_lines_bytes": body_bytes, "export_seconds": round(exported, 1),
            "import_seconds": round(imported, 1), "settle_seconds": round(time.perf_counter() - t, 1)}


def count_samples(vm: VictoriaMetrics, start_ms: int, end_ms: int) -> int:
    """Samples VictoriaMetrics holds in (start, end], counted by a query one hour after the end."""
    span_s = (end_ms - start_ms) // 1000 + 3600
    at = end_ms / 1000 + 3600
    total = 0
    for name in METRICS:
        result = vm.query(f"sum(count_over_time({name}[{span_s}s]))", at)
        total += int(float(result[0]["value"][1])) if result else 0
    return total
