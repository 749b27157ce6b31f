"""gpufleet's benchmark suite: `python -m bench.run` (what `make bench` runs) writes `bench/results.json`.

One module per item of the performance issue, each measuring its figure beside its reference in the
same run (these machines are shared and noisy, so ratios are what compare): `ingest` (throughput vs
raw kafka-python consume), `agent` (CPU and RSS per interval), `storage` (bytes per sample vs
Prometheus), `queries` (dashboard and billing latency vs raw samples), `freshness` (sample to
queryable row), `scaling` (several ingester processes vs the model in docs/scaling.md).
Benchmarks never run under `make test`.
"""
