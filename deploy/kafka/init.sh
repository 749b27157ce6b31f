#!/usr/bin/env bash
# One-shot set-up of the gpufleet topics, the agents' SCRAM user and its ACLs, run by the compose
# service kafka-init against the brokers' internal listener (idempotent: safe on every `up`).
#
#   topics   gpufleet.samples (PARTITIONS partitions) and gpufleet.dlq (1), with the cluster's default
#            replication factor (never a fixed one) and retention by time and bytes
#   user     gpufleet-agent, SCRAM-SHA-512, password from $AGENT_PASSWORD_FILE (a compose secret)
#   ACLs     gpufleet-agent may write and describe gpufleet.samples; nothing else
#
# Settings come from the environment (docker-compose.yml): BOOTSTRAP, PARTITIONS, RETENTION_MS,
# RETENTION_BYTES, AGENT_PASSWORD_FILE; KAFKA_BIN (default /opt/kafka/bin) for the tools.
set -euo pipefail

BIN="${KAFKA_BIN:-/opt/kafka/bin}"
: "${BOOTSTRAP:?}" "${PARTITIONS:?}" "${RETENTION_MS:?}" "${RETENTION_BYTES:?}" "${AGENT_PASSWORD_FILE:?}"
AGENT=gpufleet-agent
SAMPLES=gpufleet.samples
DLQ=gpufleet.dlq

password="$(tr -d '\r\n' < "$AGENT_PASSWORD_FILE")"
[ -n "$password" ] || { echo "init.sh: $AGENT_PASSWORD_FILE is empty" >&2; exit 1; }
# kafka-configs.sh parses SCRAM-SHA-512=[password=...]: commas, brackets and '=' would break it.
[[ "$password" =~ ^[A-Za-z0-9._~-]+$ ]] || {
    echo "init.sh: the agent password may hold only letters, digits and . _ ~ - (openssl rand -hex 32)" >&2; exit 1; }

"$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$SAMPLES" \
    --partitions "$PARTITIONS" --config "retention.ms=$RETENTION_MS" --config "retention.bytes=$RETENTION_BYTES"
"$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$DLQ" \
    --partitions 1 --config retention.ms=2592000000 --config retention.bytes=1073741824
"$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --alter --entity-type users --entity-name "$AGENT" \
    --add-config "SCRAM-SHA-512=[password=$password]"
"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --add --allow-principal "User:$AGENT" \
    --operation Write --operation Describe --topic "$SAMPLES"
"$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --describe --topic "$SAMPLES,$DLQ"
