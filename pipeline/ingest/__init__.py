"""Ingest: the Kafka consumer loop, validation, the batch writer and the rows it derives for ClickHouse."""
