"""Resolve the GPU attributes of an OTLP point to this node's GPU UUIDs, and check the job holds them (pure).

The node's roster (GPU index -> UUID, as the collector reads them) is the only truth: a point
naming a GPU the node does not have is rejected with a message that says which one and why.
The roster also carries what the allocation source says about jobs (GPU uuid -> job id, for the
GPUs whose job it knows) and each GPU's FLOP/s ceiling. `check_job` applies the rule of
docs/measured-mfu.md ("Whose GPUs"): a GPU whose job is known takes points of that job only, and a
job the allocation knows lands on its own GPUs only; when the source knows no job, any GPU of the
node is allowed.
`cuda.visible_devices` entries are NVML indices (set `CUDA_DEVICE_ORDER=PCI_BUS_ID` in the job
so CUDA numbers GPUs the same way) or UUIDs, a unique prefix of a `GPU-` UUID included, as CUDA
accepts them. MIG devices are not attributed (the agent reads whole GPUs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from gpufleet.flops_contract import CUDA_VISIBLE_DEVICES, GPU_KEYS, GPU_UUID, GPU_UUIDS, JOB_KEYS
from gpufleet.wire import MAX_FLOP_RATE

AttrValue = str | bool | int | float | bytes | tuple[object, ...] | None
Attrs = Mapping[str, AttrValue]


class GpuError(ValueError):
    """The point's GPU attributes do not name GPUs of this node; the text says which and how to fix it."""


class GpuRoster:
    """This node's GPUs: NVML index -> UUID, their known jobs and FLOP/s ceilings; immutable (replaced whole)."""

    __slots__ = ("by_index", "ceilings", "jobs", "known_jobs", "uuids")

    def __init__(
        self,
        by_index: Mapping[int, str] | None = None,
        jobs: Mapping[str, str] | None = None,
        ceilings: Mapping[str, float] | None = None,
    ) -> None:
        """`jobs`: GPU uuid -> the job the allocation source says holds it (only GPUs whose job it knows);
        `ceilings`: GPU uuid -> FLOP/s at most (`MAX_FLOP_RATE` for a GPU not listed)."""
        self.by_index: Mapping[int, str] = MappingProxyType(dict(by_index or {}))
        self.uuids: frozenset[str] = frozenset(self.by_index.values())
        self.jobs: Mapping[str, str] = MappingProxyType({u: j for u, j in (jobs or {}).items() if u in self.uuids})
        self.known_jobs: frozenset[str] = frozenset(self.jobs.values())
        given = ceilings or {}
        self.ceilings: Mapping[str, float] = MappingProxyType(
            {u: min(float(given.get(u, MAX_FLOP_RATE)), float(MAX_FLOP_RATE)) for u in self.uuids})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GpuRoster) and (dict(self.by_index), dict(self.jobs), dict(self.ceilings)) == (
            dict(other.by_index), dict(other.jobs), dict(other.ceilings))

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


def check_job(gpus: tuple[str, ...], job: str | None, roster: GpuRoster) -> None:
    """Raise `GpuError` unless `job` may report for all of `gpus` (docs/measured-mfu.md, "Whose GPUs")."""
    if not roster.jobs:
        return  # the allocation source knows no job on this node: any GPU of the node
    for gpu in gpus:
        holder = roster.jobs.get(gpu)
        if holder is not None and holder != job:
            who = f"job {job!r}" if job is not None else "a point without job.id"
            raise GpuError(f"GPU {gpu} is allocated to another job, not to {who}: report only the job's own GPUs "
                           f"and set {JOB_KEYS[0]!r} to the scheduler's job id")
        if holder is None and job in roster.known_jobs:
            raise GpuError(f"GPU {gpu} is not allocated to job {job!r}: report only the job's own GPUs")


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
