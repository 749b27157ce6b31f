"""The benchmark suite imports, renders its tables and computes its model (benchmarks themselves never
run under `make test`)."""

from __future__ import annotations

import importlib

import pytest

from bench import model, report


@pytest.mark.parametrize(("name", "entry"), [
    ("run", "main"), ("ingest", "run"), ("agent", "run"), ("storage", "run"), ("queries", "run"),
    ("history", "generate"), ("freshness", "run"), ("scaling", "run"), ("read_path", "run"), ("peer", "compare"),
    ("victoria", "load"), ("answers", "compare_usage"), ("panels", "expanded"), ("plot", "growth_png"),
    ("views", "main"),
])
def test_every_item_imports(name: str, entry: str) -> None:
    assert callable(getattr(importlib.import_module(f"bench.{name}"), entry))


INPUTS = model.Inputs(message_bytes=7000, lz4_message_bytes=1600, ingester_cpu_us_per_message=100.0,
                      clickhouse_cpu_us_per_row=10.0, disk_bytes_per_row=25.0, rollup_disk_share=0.2)


def test_the_model_by_hand() -> None:
    p = model.plan(200_000, 1.0, INPUTS)
    # 200,000 GPUs / 8 per node / 1 s; 100 us per message at 60 % busy; 10 us per row at 60 %
    assert p["messages_per_s"] == 25_000
    assert p["gpu_samples_per_s"] == 200_000
    assert p["json_mb_per_s"] == 175.0
    assert p["kafka_lz4_mb_per_s"] == 40.0
    assert p["ingester_cores"] == pytest.approx(25_000 * 100e-6 / 0.6)
    assert p["ingester_processes"] == 5
    assert p["kafka_partitions"] == 32  # 5 x 4 = 20, rounded up to a power of two
    assert p["clickhouse_insert_cores"] == pytest.approx(200_000 * 10e-6 / 0.6)
    assert p["clickhouse_shards"] == 1  # 3.3 cores < 16 per shard
    assert p["clickhouse_servers"] == 2
    assert p["disk_gb_per_day_per_replica"] == pytest.approx(200_000 * 86_400 * 25 * 1.2 / 1e9)


def test_tables_render_from_results() -> None:
    results = {
        "machine": {"cpu": "x", "cores": 2, "versions": {"chdb": "4.4.0"}},
        "ingest": {"status": "ok", "gpu_samples_per_s": 50_000.0, "ratio_to_raw_consume": 0.25, "messages": 1000,
                   "mean_message_bytes": 7000, "raw_consume": {"gpu_samples_per_s": 200_000.0},
                   "variants": {"optimized": {"messages_per_s": 6250.0, "gpu_samples_per_s": 50_000.0,
                                              "ratio_to_raw_consume": 0.25, "process_cpu_s": 1.0,
                                              "ingest_thread_cpu_s": 0.5},
                                "no_clickhouse": {"messages_per_s": 9000.0, "gpu_samples_per_s": 72_000.0,
                                                  "ratio_to_raw_consume": 0.36, "process_cpu_s": 0.1,
                                                  "ingest_thread_cpu_s": 0.1}},
                   "clickhouse_insert": {"messages_per_insert": 500, "json_staging": {"cpu_us_per_row": 10.0},
                                         "python_columns": {"cpu_us_per_row": 12.0}}},
        "storage": {"status": "ok", "bytes_per_gpu_sample": 25.0,
                    "clickhouse": {"gpu_samples_bytes": 1000, "other_tables_bytes": {"gpu_usage_1m": 200}}},
        "agent": {"status": "failed", "error": "boom"},
    }
    table = report.render(results)
    assert "| 1 | ingest, GPU-samples/s" in table
    assert "| 50,000 |" in table
    assert "**missed** / **missed**" in table
    assert "failed: boom" in table
    assert "| 3 | storage | not run |" in table
    modelled = model.render(results)
    assert "| 200,000 | 1 s | 25,000 | 200,000 |" in modelled
