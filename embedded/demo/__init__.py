"""`gpufleet demo`: the whole pipeline on one machine (tansu, chDB, simulated fleet, ingester, alerts)."""
