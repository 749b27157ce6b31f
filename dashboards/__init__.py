"""Grafana dashboards, datasource and alert-rule provisioning for gpufleet, generated from code.

`dashboards.build` turns the board definitions (`dashboards.definitions`) into the committed JSON
under `dashboards/boards/` and the alert rules under `dashboards/provisioning/alerting/`;
`dashboards.validate` checks them, `dashboards.macros` expands queries exactly as Grafana and the
ClickHouse plugin would, `dashboards.preview` renders them offline and `dashboards.deploy` pushes
them to a running Grafana. See docs/dashboards.md.
"""
