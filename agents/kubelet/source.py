"""`allocation.source: kubernetes`: which pod holds each GPU, from the kubelet's PodResources API.

`List` every interval (GPU, MIG and replica device ids), `Get` to settle two pods on one device,
`GetAllocatableResources` now and then; a missing or silent kubelet raises `AllocationUnknown`.
Design notes: docs/design-notes.md#agents-kubelet-source-py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from gpufleet.agents.allocation import AllocationUnknown, Answer, Holder, Key, Shared, Unknown
from gpufleet.agents.kubelet.devices import (
    DeviceHolders,
    PodRef,
    allocatable_devices,
    allocatable_summary,
    holders,
)
from gpufleet.agents.kubelet.tenants import TenantResolver

log = logging.getLogger(__name__)

ALLOCATABLE_EVERY_S: Final = 300.0


def _grpc() -> tuple[Any, Any, Any]:
    """grpc and the generated stubs (extra `gpufleet[kubernetes]`)."""
    import grpc

    from gpufleet.agents.kubelet import podresources_pb2, podresources_pb2_grpc

    return grpc, podresources_pb2, podresources_pb2_grpc


class KubeletSource:
    """The `AllocationSource` for Kubernetes nodes (see the module docstring)."""

    def __init__(self, socket_path: str | os.PathLike[str], resolver: TenantResolver, *, timeout_s: float = 0.5,
                 uuid_index: Mapping[str, int] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.socket_path = Path(socket_path)
        self._resolver = resolver
        self._timeout_s = timeout_s
        self._uuids = set(uuid_index or {})
        self._clock = clock
        self._grpc, self._pb, self._pb_grpc = _grpc()
        self._channel: Any = None
        self._stub: Any = None
        self._get_supported = True
        self._allocatable_at: float | None = None
        self._warned: set[str] = set()

    def read(self) -> Mapping[Key, Answer]:
        if not self.socket_path.exists():
            self.close()
            raise AllocationUnknown(f"the kubelet socket {self.socket_path} does not exist (is this a Kubernetes "
                                    "node, and is the pod-resources directory mounted?)")
        stub = self._connect()
        self._maybe_allocatable(stub)
        unknown_ids: list[str] = []
        pods = self._call(stub.List, self._pb.ListPodResourcesRequest(), "List").pod_resources
        by_device = holders(pods, unknown_ids)
        if unknown_ids:
            self._warn_once(f"ids:{sorted(unknown_ids)[:3]}", f"kubelet device ids not understood (ignored): "
                            f"{', '.join(sorted(unknown_ids)[:3])}")
        self._resolver.forget_except({p for h in by_device.values() for p in h.pods})
        return {key: self._answer(stub, key, h) for key, h in by_device.items()}

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def _connect(self) -> Any:
        if self._stub is None:
            self._channel = self._grpc.insecure_channel(f"unix://{self.socket_path}")
            self._stub = self._pb_grpc.PodResourcesListerStub(self._channel)
        return self._stub

    def _call(self, method: Any, request: Any, name: str) -> Any:
        try:
            return method(request, timeout=self._timeout_s)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            self.close()  # a new channel next time: a restarted kubelet is reached at once, not after gRPC's back-off
            raise AllocationUnknown(f"the kubelet did not answer PodResources {name} on {self.socket_path} "
                                    f"({getattr(code, 'name', code)})") from None

    def _answer(self, stub: Any, key: Key, h: DeviceHolders) -> Answer:
        pods = h.pods
        if len(pods) > 1 and not h.replicas:
            pods = self._still_there(stub, pods)
            if len(pods) > 1:
                return Unknown(f"device {key} is listed for {len(pods)} pods without sharing")
        resolved = [self._resolver.resolve(p) for p in pods]
        if any(a is None for a in resolved) or not resolved:
            return Unknown(f"the tenant of a pod on device {key} is not known yet")
        allocations = [a for a in resolved if a is not None]
        if len(allocations) == 1:
            return allocations[0]
        return Shared(tuple(Holder(a.tenant, a.job, 1) for a in allocations))

    def _still_there(self, stub: Any, pods: list[PodRef]) -> list[PodRef]:
        """The pods `Get` still finds (all of them where the kubelet has no `Get`)."""
        if not self._get_supported:
            return pods
        kept = []
        for pod in pods:
            try:
                stub.Get(self._pb.GetPodResourcesRequest(pod_name=pod.name, pod_namespace=pod.namespace),
                         timeout=self._timeout_s)
            except self._grpc.RpcError as exc:
                code = exc.code()
                if code == self._grpc.StatusCode.UNIMPLEMENTED:
                    self._get_supported = False
                    return pods
                if code == self._grpc.StatusCode.NOT_FOUND or "not found" in (exc.details() or "").lower():
                    continue
                return pods  # the kubelet cannot say: keep both, the device is unknown
            kept.append(pod)
        return kept

    def _maybe_allocatable(self, stub: Any) -> None:
        now = self._clock()
        if self._allocatable_at is not None and now - self._allocatable_at < ALLOCATABLE_EVERY_S:
            return
        self._allocatable_at = now
        try:
            devices = stub.GetAllocatableResources(self._pb.AllocatableResourcesRequest(),
                                                   timeout=self._timeout_s).devices
        except self._grpc.RpcError as exc:
            self._warn_once("allocatable", f"the kubelet's GetAllocatableResources failed ({exc.code().name}); "
                            "attributing from List alone")
            return
        summary = allocatable_summary(devices)
        self._warn_once(f"summary:{sorted(summary.items())}",
                        f"the kubelet hands out {summary or 'no GPU resources'}", level=logging.INFO)
        handed = allocatable_devices(devices)
        outside = sorted(u for u in self._uuids if u not in handed)
        if outside and handed:
            self._warn_once(f"outside:{outside}", f"GPUs of this node the kubelet does not hand out (always "
                            f"unallocated here): {', '.join(outside)}")

    def _warn_once(self, tag: str, message: str, level: int = logging.WARNING) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            log.log(level, "%s", message)

