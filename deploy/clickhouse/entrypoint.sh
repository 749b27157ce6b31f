#!/usr/bin/env bash
# Entrypoint wrapper of the compose `clickhouse` service: the image takes passwords only from its
# environment, so each CLICKHOUSE_*_PASSWORD_FILE (a compose secret under /run/secrets) is read into
# the variable users.d/gpufleet.xml names (`from_env`), in this process only, then the image's own
# entrypoint runs. Nothing is written to disk and no password is in the compose file.
set -euo pipefail

for var in CLICKHOUSE_ADMIN_PASSWORD CLICKHOUSE_INGEST_PASSWORD CLICKHOUSE_ALERTS_PASSWORD CLICKHOUSE_GRAFANA_PASSWORD; do
    file_var="${var}_FILE"
    file="${!file_var:-}"
    [ -n "$file" ] || { echo "entrypoint.sh: $file_var is not set" >&2; exit 1; }
    [ -s "$file" ] || { echo "entrypoint.sh: $file ($file_var) is missing or empty" >&2; exit 1; }
    value="$(tr -d '\r\n' < "$file")"
    export "$var=$value"
    unset "$file_var"
done
exec "$@"
