"""Resolve the GPU attributes of an OTLP point to this node's GPU UUIDs (pure).

The node's roster (GPU index -> UUID, as the collector reads them) is the only truth: a point
naming a GPU the node does not have is rejected with a message that says which one and why.
`cuda.visible_devices` entries are NVML indices (set `CUDA_DEVICE_ORDER=PCI_BUS_ID` in the job
so CUDA numbers GPUs the same way) or UUIDs, a unique prefix of a `GPU-` UUID included, as CUDA
accepts them. MIG devices are not attributed (the agent reads whole GPUs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from gpufleet.flops_contract import CUDA_VISIBLE_DEVICES, GPU_KEYS, GPU_UUID, GPU_UUIDS, JOB_KEYS

AttrValue = str | bool | int | float | bytes | tuple[object, ...] | None
Attrs = Mapping[str, AttrValue]


class GpuError(ValueError):
    """The point's GPU attributes do not name GPUs of this node; the text says which and how to fix it."""


class GpuRoster:
    """This node's GPUs: NVML index -> UUID, immutable (replaced whole when the node changes)."""

    __slots__ = ("by_index", "uuids")

    def __init__(self, by_index: Mapping[int, str] | None = None) -> None:
        self.by_index: Mapping[int, str] = MappingProxyType(dict(by_index or {}))
        self.uuids: frozenset[str] = frozenset(self.by_index.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GpuRoster) and dict(self.by_index) == dict(other.by_index)

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return bool(self.by_index)

    def describe(self) -> str:
        """The roster for error messages: `0=GPU-a, 1=GPU-b` (short enough for one line)."""
        items = [f"{i}={u}" for i, u in sorted(self.by_index.items())]
        return ", ".join(items[:16]) + (f", ... ({len(items)} GPUs)" if len(items) > 16 else "")


def resolve_gpus(point: Attrs, resource: Attrs, roster: GpuRoster) -> tuple[str, ...]:
    """The UUIDs a point is tied to: point attributes first, then resource, first key present wins."""
    for attrs in (point, resource):
        for key in GPU_KEYS:
            if key in attrs:
                return _resolve_key(key, attrs[key], roster)
    raise GpuError(
        f"no GPU attribute: set {GPU_UUID!r}, {GPU_UUIDS!r} or {CUDA_VISIBLE_DEVICES!r} on the resource or the point"
    )


def job_id(point: Attrs, resource: Attrs) -> str | None:
    """The job id from `job.id` / `gpufleet.job.id` (point first), or None."""
    for attrs in (point, resource):
        for key in JOB_KEYS:
            value = attrs.get(key)
            if value is not None:
                return str(value)
    return None


def _resolve_key(key: str, value: AttrValue, roster: GpuRoster) -> tuple[str, ...]:
    if key == GPU_UUID:
        if not isinstance(value, str):
            raise GpuError(f"{GPU_UUID} must be a string, got {type(value).__name__}")
        return (_known_uuid(value, roster, key),)
    entries = _entries(key, value)
    if key == GPU_UUIDS:
        uuids = [_known_uuid(e, roster, key) for e in entries]
    else:
        uuids = [_visible_device(e, roster) for e in entries]
    unique = tuple(dict.fromkeys(uuids))
    if not unique:
        raise GpuError(f"{key} is empty: name at least one GPU")
    return unique


def _entries(key: str, value: AttrValue) -> list[str]:
    if isinstance(value, bool):
        raise GpuError(f"{key} must be a string or a list, got bool")
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, str):
        return [e.strip() for e in value.split(",") if e.strip()]
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        out: list[str] = []
        for e in value:
            if isinstance(e, bool) or not isinstance(e, str | int):
                raise GpuError(f"{key} entries must be strings or integers, got {type(e).__name__}")
            out.append(str(e).strip())
        return [e for e in out if e]
    raise GpuError(f"{key} must be a string or a list, got {type(value).__name__}")


def _known_uuid(uuid: str, roster: GpuRoster, key: str) -> str:
    if uuid in roster.uuids:
        return uuid
    raise GpuError(f"{key} {uuid!r} is not a GPU of this node (this node has {roster.describe()})")


def _visible_device(entry: str, roster: GpuRoster) -> str:
    if entry.lstrip("-").isdigit():
        index = int(entry)
        if index in roster.by_index:
            return roster.by_index[index]
        raise GpuError(
            f"{CUDA_VISIBLE_DEVICES} index {index} is not a GPU of this node (this node has {roster.describe()})"
        )
    if entry.startswith("MIG-"):
        raise GpuError(f"{CUDA_VISIBLE_DEVICES} entry {entry!r} is a MIG device; report whole GPUs ({GPU_UUID})")
    if entry in roster.uuids:
        return entry
    if entry.startswith("GPU-"):
        matches = [u for u in roster.uuids if u.startswith(entry)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise GpuError(f"{CUDA_VISIBLE_DEVICES} entry {entry!r} matches {len(matches)} GPUs; give more of the UUID")
    raise GpuError(
        f"{CUDA_VISIBLE_DEVICES} entry {entry!r} is not a GPU of this node (this node has {roster.describe()})"
    )
