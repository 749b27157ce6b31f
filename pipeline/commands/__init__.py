"""The pipeline's CLI commands (`gpufleet ingest`, `migrate`, `status`, `usage`, `billing`, `tenants`)."""
