#!/usr/bin/env bash
# Install (or upgrade) the gpufleet agent on this GPU node as a hardened systemd service, offline.
# The one command, as root, from a copy of deploy/systemd and dist/ (docs/deploy.md, section 2):
#
#   sudo deploy/systemd/install.sh --artifact dist/gpufleet-agent-<version>-linux-<arch> \
#        --kafka kafka.internal:9094 --cluster prod-a \
#        --kafka-ca ./kafka-ca.pem --kafka-password-file ./kafka_agent_password
#
# Only in a full checkout may --artifact be left out: it then defaults to the artifact in dist/ named
# with the version in the checkout's gpufleet/version.py, which a copy of deploy/systemd and dist/
# lacks. To install from wheels instead, copy dist/wheelhouse/ and pass --wheelhouse DIR.
#
# It installs the agent from the self-contained artifact built by `make agent-artifact` (one file
# with its own Python: no interpreter, no index, no network needed on the node), checked against
# its SHA-256 and the glibc it needs; or, with --wheelhouse, from wheels with hashes into a
# virtualenv (Python 3.11+). It never installs anything from a public index by name. Then it writes
# /etc/gpufleet/agent.yaml once (never overwritten), the Kafka CA and SCRAM password, validates the
# config with the agent itself (`gpufleet agent --dry-run`), installs gpufleet-agent.service, and
# enables and (re)starts it. Re-running it upgrades the agent and the unit; config and spool stay.
#
# DESTDIR=DIR stages every file under DIR and touches nothing else (no root, no systemctl).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/../.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX=/opt/gpufleet
BIN="$PREFIX/bin/gpufleet"
VENV="$PREFIX/venv"
CONF_DIR=/etc/gpufleet
CONF="$CONF_DIR/agent.yaml"
CA_FILE="$CONF_DIR/kafka-ca.pem"
PASSWORD_FILE="$CONF_DIR/kafka-password"
UNIT_NAME=gpufleet-agent.service
UNIT_DIR=/etc/systemd/system
DROPIN_DIR="$UNIT_DIR/$UNIT_NAME.d"

ARTIFACT=""
WHEELHOUSE=""
PYTHON=""
KAFKA=""
CLUSTER=""
KAFKA_CA=""
KAFKA_PASSWORD_FILE=""
ALLOCATION=""
START=1

usage() {
    cat <<EOF
Usage: sudo $0 [options]

Install the gpufleet agent as the systemd service $UNIT_NAME, from local files only.

Options:
  --artifact FILE          the self-contained agent (default: the one \`make agent-artifact\` left in
                           dist/ for this machine's architecture); FILE.sha256 and FILE.json beside it
  --wheelhouse DIR         install from wheels instead (\`make agent-wheelhouse\`): every requirement
                           in DIR/requirements.txt pinned by hash; needs Python 3.11+
  --python PATH            interpreter for --wheelhouse (default: python3.11, else python3)
  --kafka HOST:PORT[,...]  Kafka bootstrap servers (the brokers' SASL_SSL listener), for a new $CONF
  --cluster NAME           cluster name of this node, for a new $CONF
  --kafka-ca FILE          CA certificate of the brokers' TLS listener, copied to $CA_FILE
  --kafka-password-file FILE
                           SCRAM password of the agents' Kafka user, copied to $PASSWORD_FILE (0600)
  --allocation SOURCE      which tenant holds each GPU, for a new $CONF: slurm (GPU processes -> Slurm
                           jobs, no prolog; installs the root drop-in $DROPIN_DIR/slurm.conf),
                           dcgm_job_dir (dcgm-exporter's job mapping) or none (docs/allocation.md)
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
            --artifact) [ $# -ge 2 ] || die "--artifact needs a file"; ARTIFACT="$2"; shift 2 ;;
            --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse needs a directory"; WHEELHOUSE="$2"; shift 2 ;;
            --python) [ $# -ge 2 ] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
            --kafka) [ $# -ge 2 ] || die "--kafka needs a value (HOST:PORT)"; KAFKA="$2"; shift 2 ;;
            --cluster) [ $# -ge 2 ] || die "--cluster needs a value"; CLUSTER="$2"; shift 2 ;;
            --kafka-ca) [ $# -ge 2 ] || die "--kafka-ca needs a file"; KAFKA_CA="$2"; shift 2 ;;
            --kafka-password-file) [ $# -ge 2 ] || die "--kafka-password-file needs a file"
                KAFKA_PASSWORD_FILE="$2"; shift 2 ;;
            --allocation) [ $# -ge 2 ] || die "--allocation needs slurm, dcgm_job_dir or none"; ALLOCATION="$2"
                shift 2 ;;
            --no-start) START=0; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; echo >&2; die "unknown option '$1'" ;;
        esac
    done
    [ -z "$ARTIFACT" ] || [ -z "$WHEELHOUSE" ] || die "--artifact and --wheelhouse exclude each other"
    case "$ALLOCATION" in
        ""|slurm|dcgm_job_dir|none) ;;
        *) die "--allocation $ALLOCATION: use slurm, dcgm_job_dir or none (Kubernetes nodes: deploy/k8s/)" ;;
    esac
}

preflight() {
    if [ -z "$DESTDIR" ]; then
        [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...): it writes $PREFIX, $CONF_DIR and $UNIT_DIR"
        command -v systemctl >/dev/null || die "systemctl not found: this installer is for systemd hosts (Kubernetes: deploy/k8s/)"
        [ -e /dev/nvidiactl ] || log "warning: /dev/nvidiactl not found; the agent will report NVML errors until the NVIDIA driver is loaded"
    fi
    [ -f "$HERE/$UNIT_NAME" ] || die "$HERE/$UNIT_NAME is missing: run this script from a gpufleet checkout"
    [ -f "$HERE/agent.yaml" ] || die "$HERE/agent.yaml is missing: run this script from a gpufleet checkout"
}

# "2.35" >= "2.34"? (version strings, dot-separated numbers)
version_at_least() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

install_artifact() {
    if [ -z "$ARTIFACT" ]; then
        local version arch
        version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$CHECKOUT/gpufleet/version.py" 2>/dev/null || true)"
        arch="$(uname -m)"
        ARTIFACT="$CHECKOUT/dist/gpufleet-agent-${version}-linux-${arch}"
        [ -f "$ARTIFACT" ] || die "no agent artifact at $ARTIFACT: build it with \`make agent-artifact\` on a machine \
of this architecture ($arch), copy dist/ here, or pass --artifact FILE or --wheelhouse DIR"
    fi
    [ -f "$ARTIFACT" ] || die "--artifact $ARTIFACT does not exist"
    [ -f "$ARTIFACT.sha256" ] || die "$ARTIFACT.sha256 is missing: the artifact cannot be checked"
    local want got
    want="$(cut -d' ' -f1 "$ARTIFACT.sha256")"
    got="$(sha256sum "$ARTIFACT" | cut -d' ' -f1)"
    [ "$want" = "$got" ] || die "$ARTIFACT does not match its SHA-256 ($got, expected $want): rebuild or copy it again"
    if [ -f "$ARTIFACT.json" ]; then
        local need have
        need="$(sed -n 's/.*"glibc_min": "\([0-9.]*\)".*/\1/p' "$ARTIFACT.json")"
        have="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
        if [ -n "$need" ] && [ -n "$have" ] && ! version_at_least "$have" "$need"; then
            die "$ARTIFACT needs glibc $need, this node has $have: build the artifact on the oldest OS you run \
(\`make agent-artifact\` there) or use --wheelhouse with Python 3.11 (docs/deploy.md)"
        fi
    fi
    log "installing $(basename "$ARTIFACT") (SHA-256 checked) as $BIN"
    install -d -m 0755 "$DESTDIR$PREFIX/bin"
    install -m 0755 "$ARTIFACT" "$DESTDIR$BIN.new"
    mv -f "$DESTDIR$BIN.new" "$DESTDIR$BIN"
}

install_wheelhouse() {
    local reqs="$WHEELHOUSE/requirements.txt"
    [ -f "$reqs" ] || die "$reqs is missing: build the wheelhouse with \`make agent-wheelhouse\`"
    if grep -v '^\s*\(#\|$\)' "$reqs" | grep -vq -- '--hash=sha256:'; then
        die "$reqs has a requirement without --hash=sha256: every wheel must be pinned by its hash"
    fi
    if [ -z "$PYTHON" ]; then
        PYTHON="$(command -v python3.11 || command -v python3 || true)"
    fi
    if [ -z "$PYTHON" ] || ! command -v "$PYTHON" >/dev/null; then
        die "no Python found: pass --python PATH (3.11+), or use --artifact"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); the wheelhouse needs Python 3.11+ (RHEL 9: dnf install python3.11), or use --artifact"
    if [ ! -x "$DESTDIR$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        install -d -m 0755 "$DESTDIR$PREFIX"
        "$PYTHON" -m venv "$DESTDIR$VENV"
    fi
    log "installing the agent from $WHEELHOUSE (no index, hashes required)"
    "$DESTDIR$VENV/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$WHEELHOUSE" \
        --require-hashes --only-binary :all: -r "$reqs"
    # The agent install must stay light: no ClickHouse client, no embedded engine.
    "$DESTDIR$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ("chdb", "clickhouse_connect")))' \
        || die "the wheelhouse holds pipeline packages; build it with \`make agent-wheelhouse\`"
    install -d -m 0755 "$DESTDIR$PREFIX/bin"
    ln -sfn "$VENV/bin/gpufleet" "$DESTDIR$BIN"
}

# A YAML double-quoted scalar: backslash and quote escaped, so odd characters cannot break the file.
yaml_quote() {
    local v="${1//\\/\\\\}"
    printf '"%s"' "${v//\"/\\\"}"
}

write_config() {
    local text key value
    text="$(cat "$HERE/agent.yaml")"
    for key in bootstrap_servers cluster; do
        if [ "$key" = bootstrap_servers ]; then value="$KAFKA"; else value="$CLUSTER"; fi
        [ -n "$value" ] || continue
        [[ "$value" != *$'\n'* ]] || die "--${key/bootstrap_servers/kafka} must be one line"
        grep -q "^  $key:" <<<"$text" || die "cannot set $key in $HERE/agent.yaml"
        text="$(GF_KEY="  $key:" GF_VAL="$(yaml_quote "$value")" awk \
            'index($0, ENVIRON["GF_KEY"]) == 1 && !done { print ENVIRON["GF_KEY"] " " ENVIRON["GF_VAL"]; done = 1; next }
             { print }' <<<"$text")"
    done
    text="$(allocation_section "$text")"
    printf '%s\n' "$text" > "$DESTDIR$CONF.new"
    chmod 0644 "$DESTDIR$CONF.new"
    mv "$DESTDIR$CONF.new" "$DESTDIR$CONF"
}

# The `allocation:` block of agent.yaml with --allocation's source (the shipped `source: none` otherwise).
allocation_section() {
    local text="$1" block
    case "$ALLOCATION" in
        slurm) block=$'    source: slurm\n    slurm_tenant: account' ;;
        dcgm_job_dir) block=$'    source: dcgm_job_dir\n    path: /var/lib/dcgm-exporter/job-mapping' ;;
        *) printf '%s' "$text"; return ;;
    esac
    grep -q '^    source: none$' <<<"$text" || die "cannot set the allocation source in $HERE/agent.yaml"
    GF_BLOCK="$block" awk '$0 == "    source: none" && !done { print ENVIRON["GF_BLOCK"]; done = 1; next } { print }' \
        <<<"$text"
}

install_config() {
    install -d -m 0755 "$DESTDIR$CONF_DIR"
    if [ -f "$DESTDIR$CONF" ]; then
        log "keeping existing $CONF"
        [ -z "$KAFKA$CLUSTER$ALLOCATION" ] \
            || log "warning: --kafka/--cluster/--allocation ignored because $CONF exists; edit it instead"
    else
        log "writing $CONF"
        write_config
    fi
    if [ -n "$KAFKA_CA" ]; then
        [ -f "$KAFKA_CA" ] || die "--kafka-ca $KAFKA_CA does not exist"
        install -m 0644 "$KAFKA_CA" "$DESTDIR$CA_FILE"
    fi
    if [ -n "$KAFKA_PASSWORD_FILE" ]; then
        [ -s "$KAFKA_PASSWORD_FILE" ] || die "--kafka-password-file $KAFKA_PASSWORD_FILE is missing or empty"
        install -m 0600 "$KAFKA_PASSWORD_FILE" "$DESTDIR$PASSWORD_FILE"
    elif [ ! -f "$DESTDIR$PASSWORD_FILE" ]; then
        # The unit loads it as a credential (LoadCredential=), which needs the file to exist.
        install -m 0600 /dev/null "$DESTDIR$PASSWORD_FILE"
    fi
}

# The agent reads the password as the credential systemd hands it; check with the installed copy.
validate_config() {
    local check="$DESTDIR$CONF_DIR/.agent-check.yaml" rc=0 err
    sed "s#/run/credentials/$UNIT_NAME/kafka-password#$DESTDIR$PASSWORD_FILE#; s#$CA_FILE#$DESTDIR$CA_FILE#" \
        "$DESTDIR$CONF" > "$check"
    err="$("$DESTDIR$BIN" agent --config "$check" --dry-run --intervals 1 --spool-dir /nonexistent 2>&1 >/dev/null)" \
        || rc=$?
    rm -f "$check"
    # Exit 2 covers both a wrong config and an environment the agent cannot use yet (no driver): the
    # config's own errors are the lines labelled "configuration error" (docs/errors.md).
    case "$rc:$err" in
        0:*) log "the agent read this node's GPUs with $CONF (dry run)" ;;
        2:*"configuration error"*|2:*"Error: "*) echo "$err" >&2; die "$CONF is not valid (see above); fix it and re-run" ;;
        *) log "warning: the agent could not collect yet (the config is valid): ${err##*$'\n'}" ;;
    esac
}

install_unit() {
    log "installing $UNIT_DIR/$UNIT_NAME"
    install -d -m 0755 "$DESTDIR$UNIT_DIR"
    install -m 0644 "$HERE/$UNIT_NAME" "$DESTDIR$UNIT_DIR/$UNIT_NAME"
    if grep -q '^    source: slurm' "$DESTDIR$CONF" 2>/dev/null; then
        log "allocation.source is slurm: installing $DROPIN_DIR/slurm.conf (root, CAP_SYS_PTRACE only)"
        install -d -m 0755 "$DESTDIR$DROPIN_DIR"
        install -m 0644 "$HERE/gpufleet-agent-slurm.conf" "$DESTDIR$DROPIN_DIR/slurm.conf"
    elif [ -f "$DESTDIR$DROPIN_DIR/slurm.conf" ]; then
        log "allocation.source is not slurm: removing $DROPIN_DIR/slurm.conf"
        rm -f "$DESTDIR$DROPIN_DIR/slurm.conf"
    fi
    if [ -n "$DESTDIR" ]; then
        log "staged under $DESTDIR; nothing enabled"
        return
    fi
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
    if [ -n "$WHEELHOUSE" ]; then install_wheelhouse; else install_artifact; fi
    log "installed $("$DESTDIR$BIN" --version)"
    install_config
    validate_config
    install_unit
}

main "$@"
