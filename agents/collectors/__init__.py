"""Collector backends behind one interface (`Collector`): NVML for real GPUs, simulated for no GPU."""

from gpufleet.agents.collectors.base import Collector, GpuReading

__all__ = ["Collector", "GpuReading"]
