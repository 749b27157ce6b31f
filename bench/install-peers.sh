#!/usr/bin/env bash
# Install the peers `make bench` compares gpufleet against (Debian packages), the way .ci/run installs
# what the tests need: Prometheus (promtool, item 3) and VictoriaMetrics (read_path). Nothing to do when present.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing benchmark peers: ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "not root: run as root, or install them yourself: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
