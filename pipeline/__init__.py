"""Pipeline: Kafka -> ClickHouse ingestion, rollups, MFU, health, billing, alerts and the embedded demo."""
