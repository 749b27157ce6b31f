"""`allocation.source: kubernetes` against a real gRPC server on a unix socket serving the kubelet's
PodResources v1 API (tests/fakes/fake_kubelet.py), and the official client against a fake API server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gpufleet.agents.allocation import (
    Allocation,
    AllocationUnknown,
    Holder,
    Shared,
    Unknown,
    build_source,
)
from gpufleet.agents.kubelet.source import KubeletSource
from gpufleet.agents.kubelet.tenants import PodMetadata, TenantResolver, TenantRules
from gpufleet.config import AllocationConfig, ConfigError
from tests.fakes.fake_kube_api import FakeKubeApi
from tests.fakes.fake_kubelet import FakeKubelet, gpu_devices

G0, G1, G2 = "GPU-aaaa0000-0000-0000-0000-000000000000", "GPU-bbbb", "GPU-cccc"
MIG_A, MIG_B = "MIG-11111111-aaaa", "MIG-22222222-bbbb"
GPU = "nvidia.com/gpu"


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "pod-resources" / "kubelet.sock"


def source(sock: Path, rules: TenantRules | None = None, metadata: PodMetadata | None = None) -> KubeletSource:
    return KubeletSource(sock, TenantResolver(rules or TenantRules(), metadata), timeout_s=2.0,
                         uuid_index={G0: 0, G1: 1, G2: 2})


def test_pods_whole_gpus_mig_instances_and_replicas(sock: Path) -> None:
    allocatable = {GPU: [G0, *gpu_devices([G1], replicas=4)], "nvidia.com/mig-1g.10gb": [MIG_A, MIG_B]}
    with FakeKubelet(sock, allocatable) as kubelet:
        kubelet.schedule("team-a", "train-0", {GPU: [G0]})
        kubelet.schedule("team-b", "infer-1", {GPU: [f"{G1}::0"]})
        kubelet.schedule("team-c", "infer-2", {GPU: [f"{G1}::3"]})
        kubelet.schedule("team-b", "notebook", {"nvidia.com/mig-1g.10gb": [MIG_A]})
        kubelet.schedule("team-a", "cpu-only", {"cpu": ["1"]})
        got = source(sock, TenantRules(namespace_tenants={"team-a": "acme"})).read()
    assert got == {
        G0: Allocation("acme", "team-a/train-0"),
        G1: Shared((Holder("team-b", "team-b/infer-1"), Holder("team-c", "team-c/infer-2"))),
        MIG_A: Allocation("team-b", "team-b/notebook"),
    }
    assert kubelet.calls["GetAllocatableResources"] == 1


def test_one_pod_on_two_replicas_of_a_gpu_holds_it_alone(sock: Path) -> None:
    with FakeKubelet(sock, {GPU: gpu_devices([G0], 2)}) as kubelet:
        kubelet.schedule("ns", "p", {GPU: [f"{G0}::0", f"{G0}::1"]})
        assert source(sock).read() == {G0: Allocation("ns", "ns/p")}


def test_a_replaced_pod_that_get_no_longer_finds_does_not_hold_the_gpu(sock: Path) -> None:
    with FakeKubelet(sock, {GPU: [G0]}) as kubelet:
        kubelet.schedule("ns", "old", {GPU: [G0]})
        kubelet.schedule("ns", "new", {GPU: [G0]})
        kubelet.terminate("ns", "old")
        src = source(sock)
        assert src.read() == {G0: Allocation("ns", "ns/new")}
        kubelet.get_supported = False  # an older kubelet: both listed, no Get to tell: nobody is billed
        assert source(sock).read() == {G0: Unknown("device GPU-aaaa0000-0000-0000-0000-000000000000 is listed "
                                                   "for 2 pods without sharing")}


def test_a_missing_socket_or_a_silent_kubelet_is_unknown_not_unallocated(sock: Path) -> None:
    src = source(sock)
    with pytest.raises(AllocationUnknown, match="does not exist"):
        src.read()
    kubelet = FakeKubelet(sock, {GPU: [G0]}).start()
    kubelet.schedule("ns", "p", {GPU: [G0]})
    assert src.read() == {G0: Allocation("ns", "ns/p")}
    kubelet.stop()
    sock.touch()  # a socket file nobody listens on (a kubelet restarting)
    with pytest.raises(AllocationUnknown, match="did not answer PodResources List"):
        src.read()
    sock.unlink()
    with FakeKubelet(sock, {GPU: [G0]}) as again:
        again.schedule("ns", "q", {GPU: [G0]})
        assert src.read() == {G0: Allocation("ns", "ns/q")}


def test_tenant_and_job_from_pod_labels_through_the_kubernetes_api(sock: Path, caplog) -> None:
    rules = TenantRules(tenant_label="billing/tenant", tenant_annotation="billing/account",
                        job_label="batch.kubernetes.io/job-name")
    with FakeKubeApi() as api, FakeKubelet(sock, {GPU: [G0, G1, G2]}) as kubelet:
        api.set_pod("ml", "a", labels={"billing/tenant": "acme", "batch.kubernetes.io/job-name": "train-7"})
        api.set_pod("ml", "b", annotations={"billing/account": "beta"})
        api.set_pod("ml", "c")
        for pod, gpu in (("a", G0), ("b", G1), ("c", G2)):
            kubelet.schedule("ml", pod, {GPU: [gpu]})
        src = source(sock, rules, PodMetadata(api.api_client()))
        expected = {G0: Allocation("acme", "train-7"), G1: Allocation("beta", "ml/b"), G2: Allocation("ml", "ml/c")}
        assert src.read() == expected
        requests = api.requests
        assert src.read() == expected
        assert api.requests == requests
        api.down = True
        kubelet.schedule("ml", "d", {GPU: [G2]})
        kubelet.delete("ml", "c")
        with caplog.at_level(logging.WARNING):
            got = src.read()
    assert got[G0] == expected[G0]  # known pods keep their labels while the API is away
    assert got[G2] == Unknown(f"the tenant of a pod on device {G2} is not known yet")  # never a guess
    assert "reading pod ml/d failed (HTTP 503)" in caplog.text


def test_the_factory_builds_it_and_refuses_keys_of_other_sources(sock: Path) -> None:
    cfg = AllocationConfig(source="kubernetes", kubelet_socket=str(sock), namespace_tenants={"a": "acme"})
    assert isinstance(build_source(cfg), KubeletSource)
    with pytest.raises(ConfigError, match="tenant_label is only read with source: kubernetes"):
        build_source(AllocationConfig(source="static", static={"0": "a"}, tenant_label="x"))
    with pytest.raises(ConfigError, match="path is set"):
        build_source(AllocationConfig(source="kubernetes", path="/x"))
