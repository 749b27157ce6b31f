"""Shared helpers of the NVML collector tests: GPU models as the tests use them, and polling without sleeps
in assertions (a condition awaited with a bound, never a measured duration)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pynvml

from gpufleet.agents.collectors.nvml import NvmlCollector
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, h100, v100

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
UUID0 = "GPU-3f2a9c1e-5b7d-4e10-8a2b-000000000000"
UUID1 = "GPU-3f2a9c1e-5b7d-4e10-8a2b-000000000001"
UUID2 = "GPU-3f2a9c1e-5b7d-4e10-8a2b-000000000002"
PCI0, PCI1, PCI2 = (0, 0x18, 0), (0, 0x3B, 0), (0, 0x86, 0)
SM_UTIL, TENSOR_UTIL, DRAM_UTIL = 2, 5, 10
Make = Callable[..., NvmlCollector]


def hopper(**overrides: Any) -> FakeGpu:
    """GPU 0 of the tests: an H100 SXM (remapped rows, 18 NVLinks, GPM, MIG capable)."""
    return h100(overrides.pop("uuid", UUID0), pci=overrides.pop("pci", PCI0), **overrides)


def volta(**overrides: Any) -> FakeGpu:
    """GPU 1 of the tests: a V100 PCIe (retired pages; no remapped rows, GPM, NVLink, MIG, memory temperature)."""
    return v100(overrides.pop("uuid", UUID1), pci=overrides.pop("pci", PCI1), **overrides)


def tick(fake: FakeNvml, collector: NvmlCollector, seconds: float = 1.0) -> list[Any]:
    """Let `seconds` pass on the fake's clock, then collect one interval."""
    fake.advance(seconds)
    return collector.collect(0)


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def events_settled(collector: NvmlCollector, timeout: float = 10.0) -> bool:
    """Every GPU's XID registration has been tried (none still pending)."""
    return eventually(lambda: "pending" not in collector.xid_watcher.status().values(), timeout)
