"""Stateless randomness for the simulator: every draw is a hash of integer keys, never a global RNG.

`key(seed, node, gpu, time_ms)` gives the same 64-bit value in every process and Python version
(splitmix64 finalizer, integer arithmetic only), so any simulated value is a pure function of its
keys and the same arguments always give byte-identical output.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Final

MASK: Final = (1 << 64) - 1
_UNIT: Final = 1.0 / (1 << 53)
_LANE: Final = 1.0 / (1 << 16)


def mix(x: int) -> int:
    """splitmix64's finalizer: a bijective, well-spread 64-bit hash of `x`."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def key(*parts: int) -> int:
    """One 64-bit hash of several integer keys (order matters)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = mix(h ^ (p & MASK))
    return h


def unit(*parts: int) -> float:
    """A uniform float in [0, 1) drawn from the keys."""
    return (key(*parts) >> 11) * _UNIT


def lanes(h: int) -> tuple[float, float, float, float]:
    """Four uniform floats in [0, 1) (16-bit resolution) from one 64-bit hash: cheap noise."""
    return (
        (h & 0xFFFF) * _LANE,
        ((h >> 16) & 0xFFFF) * _LANE,
        ((h >> 32) & 0xFFFF) * _LANE,
        ((h >> 48) & 0xFFFF) * _LANE,
    )


def text_key(text: str) -> int:
    """A stable 64-bit key for a string (Python's own `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def gpu_uuid(seed: int, cluster: str, node: int, gpu: int) -> str:
    """An NVML-style GPU UUID (`GPU-xxxxxxxx-...`), unique per (seed, cluster, node, gpu)."""
    digest = hashlib.blake2b(f"{seed}/{cluster}/{node}/{gpu}".encode(), digest_size=16).digest()
    return f"GPU-{uuid.UUID(bytes=digest)}"
