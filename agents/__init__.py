"""Node agent: reads GPU counters (NVML or simulated), builds them on OpenTelemetry, streams to Kafka."""
