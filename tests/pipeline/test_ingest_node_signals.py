"""The node-side fields through the real ingester (tansu -> batch writer -> chDB): every GPU signal lands in
its `gpu_samples` column on the JSON staging path, the node's enumeration in `agent_reports`, its ports in
`network_ports`, and a message delivered twice is stored once in each."""

from __future__ import annotations

from gpufleet.wire import NetworkPort
from tests.builders import T0_MS, gpu, report
from tests.pipeline.test_ingest import _cfg, _create, _enc, _ingester, _produce, _run_until

SIGNALS = {"recovery_action": 1, "temp_slowdown_c": 89.0, "temp_shutdown_c": 92.0, "temp_mem_max_c": 95.0,
           "power_limit_w": 650.0, "power_limit_default_w": 700.0, "fabric_state": 3, "fabric_status": 0,
           "fabric_clique_id": 4, "fabric_cluster_uuid": "00010203-0405-0607-0809-0a0b0c0d0e0f",
           "fabric_health_mask": 0b0001_1010_1001, "serial": "1321021034567", "vbios_version": "96.00.74.00.0C",
           "driver_version": "570.172.08", "persistence_mode": False, "ecc_mode": True}


def test_node_signals_are_stored_once_in_their_tables(broker, ch_target, ch_client, topic) -> None:
    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    ports = [NetworkPort(device="mlx5_0", port=1, link_layer="InfiniBand", state=1, phys_state=2, rate_gbps=400.0,
                         link_downed=3, link_error_recovery=1, symbol_error=65535, port_rcv_errors=7,
                         port_xmit_discards=0),
             NetworkPort(device="mlx5_1", port=1)]
    first = report(node="n1", seq=0, time_ms=T0_MS, gpus=[gpu(0, "n1", **SIGNALS), gpu(1, "n1")])
    first.gpus_expected, first.gpus_missing, first.network = 3, ["GPU-n1-2"], ports
    second = report(node="n1", seq=1, time_ms=T0_MS + 1000)  # an older agent: no node sections
    _produce(broker, topic, [_enc(first), _enc(second), _enc(first)])  # the first one redelivered
    ing = _ingester(cfg)
    _run_until(ing, lambda: ing.stats.messages + ing.stats.duplicates == 3)
    db = ch_target.database
    columns = ", ".join(SIGNALS)
    rows = ch_client.query(f"SELECT {columns}, health, health_reasons FROM {db}.gpu_samples "
                           "WHERE gpu_index = 0 ORDER BY seq").result_rows
    assert rows == [(*SIGNALS.values(), "failing", ["recovery_gpu_reset", "fabric_degraded_bw"]),
                    (*[None] * len(SIGNALS), "ok", [])]
    assert ch_client.query(f"SELECT seq, gpus, gpus_enumerated, gpus_expected, gpus_missing FROM {db}.agent_reports "
                           "FINAL ORDER BY seq").result_rows == [(0, 2, 2, 3, ["GPU-n1-2"]), (1, 2, 2, None, [])]
    assert ch_client.query(
        f"SELECT device, port, link_layer, state, phys_state, rate_gbps, link_downed, link_error_recovery, "
        f"symbol_error, port_rcv_errors, port_xmit_discards, seq FROM {db}.network_ports ORDER BY device"
    ).result_rows == [("mlx5_0", 1, "InfiniBand", 1, 2, 400.0, 3, 1, 65535, 7, 0, 0),
                      ("mlx5_1", 1, "", None, None, None, None, None, None, None, None, 0)]
