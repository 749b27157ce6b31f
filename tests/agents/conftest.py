"""Fixtures of the agent tests: NVML collectors on the pynvml fake, closed after each test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gpufleet.agents.collectors.nvml import NvmlCollector
from tests.agents.nvml_helpers import Make
from tests.fakes.fake_pynvml import FakeNvml


@pytest.fixture
def make_collector() -> Iterator[Make]:
    """Collectors on a fake, on the fake's clock, with a short event wait; each is closed after the test."""
    made: list[NvmlCollector] = []

    def make(fake: FakeNvml, **kwargs: Any) -> NvmlCollector:
        kwargs.setdefault("event_wait_ms", 20)
        kwargs.setdefault("clock", lambda: fake.now_us / 1e6)
        collector = NvmlCollector(nvml=fake, **kwargs)
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.close()


