"""A kubelet's PodResources service for tests: a real gRPC server on a unix socket, serving the v1 API.

`FakeKubelet(socket_path)` serves `List`, `Get` and `GetAllocatableResources` from what the test sets:
`allocatable` (resource -> device ids, as the NVIDIA device plugin registers them) and `pods`
(namespace/name -> {container: {resource: [device ids]}}). Tests change the pods while an agent runs
(a pod deleted, another scheduled on the same GPU). `get_supported=False` answers `Get` UNIMPLEMENTED,
as kubelets before the `KubeletPodResourcesGet` feature do; `stop()` takes the socket away.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from concurrent import futures
from pathlib import Path

import grpc

from gpufleet.agents.kubelet import podresources_pb2 as pb
from gpufleet.agents.kubelet import podresources_pb2_grpc as pb_grpc

Containers = Mapping[str, Mapping[str, list[str]]]


def gpu_devices(uuids: Iterable[str], replicas: int = 0) -> list[str]:
    """Device ids of `nvidia.com/gpu` for these GPUs: the UUIDs, or `<uuid>::<n>` with time-slicing replicas."""
    return [f"{u}::{n}" for u in uuids for n in range(replicas)] if replicas else list(uuids)


class FakeKubelet(pb_grpc.PodResourcesListerServicer):
    """The kubelet's PodResourcesLister on `socket_path` (started by `start()`, stopped by `stop()`)."""

    def __init__(self, socket_path: str | os.PathLike[str], allocatable: Mapping[str, list[str]] | None = None,
                 *, get_supported: bool = True) -> None:
        self.socket_path = Path(socket_path)
        self.allocatable = dict(allocatable or {})
        self.get_supported = get_supported
        self._pods: dict[tuple[str, str], Containers] = {}
        self._terminated: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.calls: dict[str, int] = {"List": 0, "Get": 0, "GetAllocatableResources": 0}

    # -- what the test controls ----------------------------------------------------------------

    def schedule(self, namespace: str, name: str, devices: Mapping[str, list[str]], container: str = "main") -> None:
        """A pod starts holding `devices` (resource -> device ids) in one container."""
        with self._lock:
            self._pods[(namespace, name)] = {container: dict(devices)}

    def delete(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pods.pop((namespace, name), None)
            self._terminated.discard((namespace, name))

    def terminate(self, namespace: str, name: str) -> None:
        """The pod ended but `List` still shows its devices (not yet released); `Get` no longer finds it."""
        with self._lock:
            self._terminated.add((namespace, name))

    def start(self) -> FakeKubelet:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_PodResourcesListerServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the service ---------------------------------------------------------------------------

    def _pod(self, namespace: str, name: str, containers: Containers) -> pb.PodResources:
        return pb.PodResources(name=name, namespace=namespace, containers=[
            pb.ContainerResources(name=c, devices=[pb.ContainerDevices(resource_name=r, device_ids=ids)
                                                   for r, ids in devs.items()])
            for c, devs in containers.items()])

    def List(self, request: pb.ListPodResourcesRequest, context: grpc.ServicerContext) -> pb.ListPodResourcesResponse:
        with self._lock:
            self.calls["List"] += 1
            pods = [self._pod(ns, name, c) for (ns, name), c in self._pods.items()]
        return pb.ListPodResourcesResponse(pod_resources=pods)

    def Get(self, request: pb.GetPodResourcesRequest, context: grpc.ServicerContext) -> pb.GetPodResourcesResponse:
        with self._lock:
            self.calls["Get"] += 1
            key = (request.pod_namespace, request.pod_name)
            containers = None if key in self._terminated else self._pods.get(key)
        if not self.get_supported:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "method Get not implemented")
        if containers is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"pod {request.pod_name} not found in {request.pod_namespace}")
        return pb.GetPodResourcesResponse(pod_resources=self._pod(request.pod_namespace, request.pod_name,
                                                                  containers))

    def GetAllocatableResources(self, request: pb.AllocatableResourcesRequest,
                                context: grpc.ServicerContext) -> pb.AllocatableResourcesResponse:
        with self._lock:
            self.calls["GetAllocatableResources"] += 1
        return pb.AllocatableResourcesResponse(devices=[
            pb.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in self.allocatable.items()])
