#!/usr/bin/env bash
# Install (or upgrade) the gpufleet agent on this GPU node as a hardened systemd service.
# The one command, as root, from a checkout of the repository:
#
#   sudo deploy/systemd/install.sh --kafka kafka-1.internal:9092 --cluster prod-a
#
# It creates a virtualenv under /opt/gpufleet, installs the agent-only package (no pipeline
# dependencies, no chdb), writes /etc/gpufleet/agent.yaml once (never overwritten afterwards),
# validates it, installs gpufleet-agent.service, and enables and (re)starts it. Re-running it
# upgrades the package and the unit in place; the spool in /var/lib/gpufleet is kept.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX=/opt/gpufleet
VENV="$PREFIX/venv"
CONF_DIR=/etc/gpufleet
CONF="$CONF_DIR/agent.yaml"
ENV_FILE="$CONF_DIR/agent.env"
UNIT_NAME=gpufleet-agent.service
UNIT_DIR=/etc/systemd/system

SOURCE="gpufleet==0.1.0"
PYTHON="python3"
KAFKA=""
CLUSTER=""
START=1

usage() {
    cat <<EOF
Usage: sudo $0 [options]

Install the gpufleet agent as the systemd service $UNIT_NAME.

Options:
  --kafka HOST:PORT[,...]  Kafka bootstrap servers, written into a new $CONF
  --cluster NAME           cluster name of this node, written into a new $CONF
  --source SPEC            what pip installs (default: $SOURCE); a version pin, a wheel path,
                           or a checkout directory, e.g. --source /srv/gpufleet-0.1.0-py3-none-any.whl
  --python PATH            Python 3.11+ interpreter for the virtualenv (default: $PYTHON)
  --no-start               install and enable, but do not (re)start the service now
  -h, --help               show this help
EOF
}

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

log() {
    echo "install.sh: $*"
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --kafka) [ $# -ge 2 ] || die "--kafka needs a value (HOST:PORT)"; KAFKA="$2"; shift 2 ;;
            --cluster) [ $# -ge 2 ] || die "--cluster needs a value"; CLUSTER="$2"; shift 2 ;;
            --source) [ $# -ge 2 ] || die "--source needs a value"; SOURCE="$2"; shift 2 ;;
            --python) [ $# -ge 2 ] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
            --no-start) START=0; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; echo >&2; die "unknown option '$1'" ;;
        esac
    done
}

preflight() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...): it writes $PREFIX, $CONF_DIR and $UNIT_DIR"
    command -v systemctl >/dev/null || die "systemctl not found: this installer is for systemd hosts (Kubernetes: deploy/k8s/)"
    [ -f "$HERE/$UNIT_NAME" ] || die "$HERE/$UNIT_NAME is missing: run this script from a gpufleet checkout"
    [ -f "$HERE/agent.yaml" ] || die "$HERE/agent.yaml is missing: run this script from a gpufleet checkout"
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.11+ or pass --python PATH"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); gpufleet needs Python 3.11+ (pass --python PATH)"
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
        || die "$PYTHON lacks venv/ensurepip (Debian/Ubuntu: apt-get install python3-venv)"
    if [ ! -e /dev/nvidiactl ]; then
        log "warning: /dev/nvidiactl not found; the agent will report NVML errors until the NVIDIA driver is loaded"
    fi
}

install_package() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        install -d -m 0755 "$PREFIX"
        "$PYTHON" -m venv "$VENV"
    fi
    # Pin the dependencies to the versions the project tests with, when run from a checkout.
    local constraints=()
    if [ -f "$HERE/../../constraints.txt" ]; then
        constraints=(-c "$HERE/../../constraints.txt")
    fi
    log "installing $SOURCE (agent only: no extras)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "${constraints[@]}" "$SOURCE"
    # The agent install must stay light: no ClickHouse client, no embedded engine.
    "$VENV/bin/python" - <<'PY' || die "the agent virtualenv holds pipeline packages; install without extras"
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) for m in ("chdb", "clickhouse_connect")))
PY
    log "installed $("$VENV/bin/gpufleet" --version)"
}

install_config() {
    install -d -m 0755 "$CONF_DIR"
    if [ -f "$CONF" ]; then
        log "keeping existing $CONF"
        if [ -n "$KAFKA$CLUSTER" ]; then
            log "warning: --kafka/--cluster ignored because $CONF exists; edit it instead"
        fi
    else
        log "writing $CONF"
        # Only the two values change; the template's comments stay. Values are written as quoted
        # YAML scalars, so odd characters cannot break the file.
        GF_KAFKA="$KAFKA" GF_CLUSTER="$CLUSTER" "$VENV/bin/python" - "$HERE/agent.yaml" "$CONF.new" <<'PY'
import json, os, re, sys
import yaml
src, dst = sys.argv[1], sys.argv[2]
text = open(src).read()
for section, key, var in (("kafka", "bootstrap_servers", "GF_KAFKA"), ("agent", "cluster", "GF_CLUSTER")):
    value = os.environ[var]
    if not value:
        continue
    text, n = re.subn(rf"^(  {key}:).*$", lambda m, v=value: f"{m.group(1)} {json.dumps(v)}", text,
                      count=1, flags=re.MULTILINE)
    if n != 1 or yaml.safe_load(text)[section][key] != value:
        sys.exit(f"cannot set {section}.{key} in {src}")
open(dst, "w").write(text)
PY
        chmod 0644 "$CONF.new"
        mv "$CONF.new" "$CONF"
    fi
    if [ ! -f "$ENV_FILE" ]; then
        log "writing $ENV_FILE (root-only; put secrets such as GPUFLEET_KAFKA_PASSWORD here)"
        install -m 0600 /dev/null "$ENV_FILE"
        echo "# Secrets for gpufleet-agent.service, one VAR=value per line (e.g. GPUFLEET_KAFKA_PASSWORD=...)." > "$ENV_FILE"
    fi
    # Refuse to enable a service that would fail on its config: validate it as the agent will.
    GPUFLEET_CONFIG="$CONF" "$VENV/bin/python" -c '
import sys
from gpufleet.config import ConfigError, load
try:
    load()
except ConfigError as exc:
    sys.exit(f"install.sh: {exc}")
' || die "$CONF is not a valid gpufleet config (see the message above); fix it and re-run"
}

install_unit() {
    log "installing $UNIT_DIR/$UNIT_NAME"
    install -m 0644 "$HERE/$UNIT_NAME" "$UNIT_DIR/$UNIT_NAME"
    systemctl daemon-reload
    systemctl enable "$UNIT_NAME" >/dev/null
    if [ "$START" -eq 1 ]; then
        systemctl restart "$UNIT_NAME"
        log "started; follow it with: journalctl -u $UNIT_NAME -f"
    else
        log "enabled, not started (--no-start); start it with: systemctl start $UNIT_NAME"
    fi
}

main() {
    parse_args "$@"
    preflight
    install_package
    install_config
    install_unit
}

main "$@"
