"""Fault tests: crashes, outages and failing storage, with exact before/after counts (docs/reliability.md)."""
