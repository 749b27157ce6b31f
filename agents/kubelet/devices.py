"""Pure parsing of what the kubelet's PodResources API says: device ids, GPU resources, holders per device.

The NVIDIA device plugin names a GPU by its UUID (`GPU-...`), a MIG instance by its MIG UUID (`MIG-...`,
resources `nvidia.com/mig-<profile>`), each time-slicing or MPS replica of a GPU as `<uuid>::<n>`, and,
with `DEVICE_ID_STRATEGY=index`, a GPU by its index. `holders` turns the List answer into the pods that
hold each device; several pods on replicas of one device share it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
_INDEX = re.compile(r"[0-9]{1,4}")


def is_gpu_resource(name: str) -> bool:
    """`nvidia.com/gpu` (and renamed shared forms such as `nvidia.com/gpu.shared`) or a MIG resource."""
    return name == GPU_RESOURCE or name.startswith((GPU_RESOURCE + ".", MIG_RESOURCE_PREFIX))


@dataclass(frozen=True, slots=True)
class DeviceId:
    """One device id as the kubelet lists it: the device (UUID or index) and whether it is a shared replica."""

    key: int | str
    replica: bool


def parse_device_id(raw: str) -> DeviceId | None:
    """`GPU-x`, `MIG-x`, `GPU-x::3` (a replica), or an index; None for a form gpufleet does not know."""
    base, sep, _ = raw.partition("::")
    if base.startswith(("GPU-", "MIG-")):
        return DeviceId(base, bool(sep))
    if _INDEX.fullmatch(base):
        return DeviceId(int(base), bool(sep))
    return None


@dataclass(frozen=True, slots=True, order=True)
class PodRef:
    """A pod as the kubelet names it."""

    namespace: str
    name: str


@dataclass
class DeviceHolders:
    """The pods that hold one device, and whether they hold it through shared replicas."""

    pods: list[PodRef] = field(default_factory=list)
    replicas: bool = False

    def add(self, pod: PodRef, replica: bool) -> None:
        if pod not in self.pods:
            self.pods.append(pod)
        self.replicas = self.replicas or replica


def holders(pod_resources: Iterable[Any], unknown: list[str] | None = None) -> dict[int | str, DeviceHolders]:
    """Device -> its holders, from `ListPodResourcesResponse.pod_resources` (GPU and MIG resources only).
    Device ids of a form not understood are appended to `unknown`."""
    out: dict[int | str, DeviceHolders] = {}
    for pod in pod_resources:
        ref = PodRef(pod.namespace, pod.name)
        for container in pod.containers:
            for devices in container.devices:
                if not is_gpu_resource(devices.resource_name):
                    continue
                for raw in devices.device_ids:
                    parsed = parse_device_id(raw)
                    if parsed is None:
                        if unknown is not None:
                            unknown.append(raw)
                        continue
                    out.setdefault(parsed.key, DeviceHolders()).add(ref, parsed.replica)
    return out


def allocatable_summary(devices: Iterable[Any]) -> dict[str, int]:
    """Resource name -> device ids the kubelet hands out (`GetAllocatableResources`), GPU resources only."""
    out: dict[str, int] = {}
    for d in devices:
        if is_gpu_resource(d.resource_name):
            out[d.resource_name] = out.get(d.resource_name, 0) + len(d.device_ids)
    return out


def allocatable_devices(devices: Iterable[Any]) -> set[int | str]:
    """The devices (UUIDs or indexes, replicas folded) the kubelet hands out."""
    out: set[int | str] = set()
    for d in devices:
        if is_gpu_resource(d.resource_name):
            out.update(p.key for p in map(parse_device_id, d.device_ids) if p is not None)
    return out
