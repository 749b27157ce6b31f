"""Shared core of gpufleet: the wire contract, configuration, GPU facts and the `gpufleet` CLI."""

from gpufleet.version import __version__

__all__ = ["__version__"]
