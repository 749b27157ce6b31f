"""The read side: usage and billing, MFU, health, the capacity waterfall and the status document, from ClickHouse."""
