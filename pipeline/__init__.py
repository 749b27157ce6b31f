"""The pipeline: Kafka -> ClickHouse ingestion (`ingest`), the read side (`queries`), alerts, and the store."""
