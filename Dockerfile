# syntax=docker/dockerfile:1
# gpufleet server image: `gpufleet migrate`, `ingest`, `alerts run` (and the compose stack's simulated
# agents). Production talks to a ClickHouse server, so the embedded engine (chdb, 550 MB) is not
# installed: extras `pipeline` (ClickHouse client), `grafana` and `kubernetes` (the DaemonSet agent's
# allocation.source: kubernetes) only, pinned by constraints.txt.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/gpufleet
COPY . .
RUN /opt/gpufleet/bin/pip install -c constraints.txt '.[pipeline,grafana,kubernetes]' \
    && /opt/gpufleet/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('chdb') is not None)"

FROM python:3.11-slim
# A fixed non-root uid/gid, so volumes and Kubernetes securityContext can name it.
RUN groupadd --system --gid 10001 gpufleet \
    && useradd --system --uid 10001 --gid gpufleet --home-dir /var/lib/gpufleet \
       --shell /usr/sbin/nologin gpufleet \
    && mkdir -p /var/lib/gpufleet/spool /etc/gpufleet \
    && chown -R gpufleet:gpufleet /var/lib/gpufleet
COPY --from=build /opt/gpufleet /opt/gpufleet
ENV PATH=/opt/gpufleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/gpufleet
ENTRYPOINT ["gpufleet"]
CMD ["--help"]
