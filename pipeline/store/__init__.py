"""The ClickHouse side: the client adapter, the `Store` every query goes through, migrations, tenant users."""

from gpufleet.pipeline.store.store import Store

__all__ = ["Store"]
