"""A simulated GPU fleet for demos, tests and benchmarks: jobs, faults and the ground truth to check against.

Modules: `rng` (stateless hashing), `faults` (what can break), `jobs` (the seeded schedule),
`timeline` (one GPU's activity and energy over time), `sample` (activity -> `GpuSample`),
`fleet` (fleet, node collectors, allocation source), `truth` (ground-truth JSON), `reports`
(complete wire messages without Kafka). The public surface is re-exported by
`agents.collectors.simulated`.
"""
