#!/usr/bin/env bash
# Generate what the compose stack needs before its first start (docs/deploy.md, step 1): random
# passwords, the Grafana secret key, a CA and the Kafka brokers' TLS keystore for the GPU nodes'
# SASL_SSL listener, and .env with a fresh Kafka cluster id and the fleet listener's address.
# Existing files are kept (re-running is safe). Every file under ./secrets/ is mode 0600 but the
# CA certificate kafka-ca.pem, which is public (GPU nodes trust it): 0644. Its key, kafka-ca.key,
# is 0600: it signs broker certificates, so keep it offline once the keystore exists.
#
#   deploy/make-secrets.sh --kafka-host kafka.example.internal --kafka-bind 10.0.0.5 [--dir .]
#
# Then copy secrets/kafka-ca.pem and secrets/kafka_agent_password to the GPU nodes (install.sh
# --kafka-ca / --kafka-password-file, or the Kubernetes Secret), and write the three
# secrets/alertmanager_* files (PagerDuty routing key, Slack webhook URL, incident webhook URL).
set -euo pipefail

DIR=.
HOST=""
BIND=""

die() { echo "make-secrets.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --kafka-host) [ $# -ge 2 ] || die "--kafka-host needs a name"; HOST="$2"; shift 2 ;;
        --kafka-bind) [ $# -ge 2 ] || die "--kafka-bind needs an address"; BIND="$2"; shift 2 ;;
        --dir) [ $# -ge 2 ] || die "--dir needs a directory"; DIR="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        *) die "unknown option '$1'" ;;
    esac
done
[ -n "$HOST" ] || die "--kafka-host NAME is required: the name GPU nodes reach the brokers by (in the certificate)"
[ -n "$BIND" ] || die "--kafka-bind ADDRESS is required: the host's private address for the fleet listener"
command -v openssl >/dev/null || die "openssl not found"

umask 077
S="$DIR/secrets"
mkdir -p "$S"

secret() {  # name, generator
    if [ ! -s "$S/$1" ]; then "${@:2}" > "$S/$1"; echo "wrote $S/$1"; fi
}
hex() { openssl rand -hex "$1"; }

for name in clickhouse_admin_password clickhouse_ingest_password clickhouse_alerts_password \
            clickhouse_grafana_password grafana_admin_password kafka_agent_password kafka_keystore_password; do
    secret "$name" hex 24
done
secret grafana_secret_key hex 32

if [ ! -s "$S/kafka.keystore.p12" ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=gpufleet Kafka CA" \
        -keyout "$S/kafka-ca.key" -out "$S/kafka-ca.pem" 2>/dev/null
    openssl req -newkey rsa:3072 -nodes -subj "/CN=$HOST" -keyout "$S/kafka-broker.key" \
        -out "$S/kafka-broker.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\n' "$HOST" > "$S/kafka-broker.ext"
    openssl x509 -req -in "$S/kafka-broker.csr" -CA "$S/kafka-ca.pem" -CAkey "$S/kafka-ca.key" \
        -CAcreateserial -days 825 -extfile "$S/kafka-broker.ext" -out "$S/kafka-broker.pem" 2>/dev/null
    openssl pkcs12 -export -in "$S/kafka-broker.pem" -inkey "$S/kafka-broker.key" -certfile "$S/kafka-ca.pem" \
        -name kafka -passout "file:$S/kafka_keystore_password" -out "$S/kafka.keystore.p12"
    rm -f "$S/kafka-broker.csr" "$S/kafka-broker.ext" "$S/kafka-broker.key" "$S/kafka-ca.srl"
    chmod 0644 "$S/kafka-ca.pem"
    echo "wrote $S/kafka.keystore.p12 (CN and SAN $HOST) and its CA $S/kafka-ca.pem"
fi

ENV_FILE="$DIR/.env"
touch "$ENV_FILE"
if ! grep -q '^KAFKA_CLUSTER_ID=' "$ENV_FILE"; then
    # 16 random bytes, URL-safe base64 without padding: the form kafka-storage.sh random-uuid prints.
    echo "KAFKA_CLUSTER_ID=$(openssl rand -base64 16 | tr '+/' '-_' | tr -d '=\n')" >> "$ENV_FILE"
fi
grep -q '^KAFKA_FLEET_HOST=' "$ENV_FILE" || echo "KAFKA_FLEET_HOST=$HOST" >> "$ENV_FILE"
grep -q '^KAFKA_FLEET_BIND=' "$ENV_FILE" || echo "KAFKA_FLEET_BIND=$BIND" >> "$ENV_FILE"
for name in alertmanager_pagerduty_routing_key alertmanager_slack_webhook_url alertmanager_webhook_url; do
    [ -s "$S/$name" ] || echo "still to write: $S/$name (docs/deploy.md, Alertmanager receivers)"
done
