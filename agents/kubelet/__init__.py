"""`allocation.source: kubernetes`: GPUs to pods through the kubelet's PodResources API (docs/allocation.md)."""
