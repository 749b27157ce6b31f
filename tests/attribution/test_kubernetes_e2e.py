"""Kubernetes end to end: a kubelet (real gRPC on a unix socket) -> the agent -> Kafka -> the ingester ->
ClickHouse -> `gpufleet usage`. Within one hour a pod is deleted and another scheduled on the same GPU,
and the kubelet goes away for five minutes: each tenant is billed exactly what it held, the outage to nobody."""

from __future__ import annotations

from pathlib import Path

from gpufleet.agents.allocation import build_source
from gpufleet.config import AllocationConfig, parse
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.rules import DEFAULT_RULES, packaged_rules
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from gpufleet.wire import GpuSample
from tests.attribution.harness import (
    T_HOUR,
    billed_seconds,
    close_all,
    deliver_and_ingest,
    node_agent,
    tick,
)
from tests.fakes.fake_kubelet import FakeKubelet

G0, G1 = "GPU-0e2e0000-0000-0000-0000-000000000000", "GPU-0e2e1111-1111-1111-1111-111111111111"
MINUTE = 60_000


class TwoGpus:
    """A node's collector: two H100s, busy."""

    gpu_uuids = [G0, G1]

    def collect(self, now_ms: int) -> list[GpuSample]:
        return [GpuSample(index=i, uuid=u, model="NVIDIA H100 80GB HBM3", util_gpu_ratio=0.9, power_w=500.0,
                          compute_processes=1) for i, u in enumerate(self.gpu_uuids)]

    def close(self) -> None:
        return


def test_pod_replaced_mid_hour_and_a_kubelet_outage_bill_exactly(broker, ch_target: Target, ch_client, topic,
                                                                 tmp_path: Path) -> None:
    sock = tmp_path / "kubelet" / "kubelet.sock"
    kubelet = FakeKubelet(sock, {"nvidia.com/gpu": [G0, G1]}).start()
    kubelet.schedule("team-a", "train-a", {"nvidia.com/gpu": [G0]})
    kubelet.schedule("team-c", "svc", {"nvidia.com/gpu": [G1]})
    cfg = AllocationConfig(source="kubernetes", kubelet_socket=str(sock), namespace_tenants={"team-a": "acme"},
                           kubelet_timeout_s=2.0)
    agent = node_agent(tmp_path / "spool", "k8s-node-1", TwoGpus(), build_source(cfg, uuid_index={G0: 0, G1: 1}))
    live = [kubelet]

    def world(t: int) -> None:
        minute = (t - T_HOUR) // MINUTE  # the tick at the end of minute m reads the kubelet as of then
        if minute == 26:  # train-a deleted after 25 minutes, train-b scheduled on the same GPU
            kubelet.delete("team-a", "train-a")
            kubelet.schedule("team-b", "train-b", {"nvidia.com/gpu": [G0]})
        if minute == 41:  # the kubelet restarts: five intervals with no answer
            live.pop().stop()
        if minute == 46:
            again = FakeKubelet(sock, {"nvidia.com/gpu": [G0, G1]}).start()
            again.schedule("team-b", "train-b", {"nvidia.com/gpu": [G0]})
            again.schedule("team-c", "svc", {"nvidia.com/gpu": [G1]})
            live.append(again)

    try:
        sent = tick([agent], range(T_HOUR + MINUTE, T_HOUR + 61 * MINUTE, MINUTE), MINUTE, world)
        deliver_and_ingest(broker, ch_target, topic, [agent], sent)
    finally:
        close_all([agent])
        for k in live:
            k.stop()
    # by hand: acme (team-a) 25 min on G0; team-b 35 min on G0 less the 5-minute outage; team-c 60 - 5 min on G1
    assert billed_seconds(ch_target) == {"acme": 25 * 60, "team-b": 30 * 60, "team-c": 55 * 60}
    unknown = ch_client.query(
        f"SELECT gpu_uuid, count(), countIf(tenant = '') FROM {ch_target.database}.gpu_samples "
        "WHERE allocation_unknown GROUP BY gpu_uuid ORDER BY gpu_uuid").result_rows
    assert unknown == [(G0, 5, 5), (G1, 5, 5)]
    counted = ch_client.query(f"SELECT max(allocation_unknown_total) FROM {ch_target.database}.agent_reports")
    assert counted.result_rows == [(10,)]
    # the shipped AllocationUnknown rule fires for the node (10 GPU-intervals unattributed in its 15-minute window)
    cfg = parse({"clickhouse": {"dsn": ch_target.dsn, "database": ch_target.database}})
    rules = packaged_rules(DEFAULT_RULES)
    evaluator = Evaluator(cfg, Store(ch_client, ch_target.database), rules=rules)
    report = evaluator.evaluate_once(T_HOUR + 47 * MINUTE)
    fired = {(a.alertname, a.labels["node"]): a.value for a in report.fired}
    assert fired[("AllocationUnknown", "k8s-node-1")] == 10
