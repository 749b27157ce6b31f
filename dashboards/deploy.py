"""Push the boards, the ClickHouse datasource and the alert rules to a running Grafana over its HTTP API.

Design notes: docs/design-notes.md#dashboards-deploy-py.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.dashboards import alerting, build
from gpufleet.dashboards.builder import DS_UID
from gpufleet.dashboards.definitions import BOARDS
from gpufleet.errors import ServiceError

if TYPE_CHECKING:
    from grafana_client import GrafanaApi

log = logging.getLogger(__name__)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class DeployError(ServiceError):
    """Grafana could not be updated; the message says what and how to fix it (never the token)."""


@dataclass
class DeployReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def expand_env(value: Any, env: Mapping[str, str]) -> Any:
    """`${VAR}` in every string of `value`, from `env` (or the file `VAR__FILE` names), as Grafana does."""
    if isinstance(value, str):
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in env:
                return env[name]
            if path := env.get(f"{name}__FILE"):
                try:
                    return Path(path).read_text().strip()
                except OSError as exc:
                    raise DeployError(f"cannot read {name}__FILE ({path}): {exc.strerror}") from None
            raise DeployError(f"the datasource needs ${{{name}}}: set {name} (or {name}__FILE) in the environment")

        return _ENV.sub(one, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env) for v in value]
    return value


def datasource_payload(env: Mapping[str, str]) -> dict[str, Any]:
    """The provisioned datasource with its settings filled from `env` (a secret from a `__FILE` if named)."""
    source = dict(build.datasource_provisioning()["datasources"][0])
    source.pop("orgId", None)
    return expand_env(source, env)


def rule_payload(rule: Mapping[str, Any]) -> dict[str, Any]:
    """A provisioned rule as the provisioning API takes it (folder and group named on the rule)."""
    return {**rule, "folderUID": alerting.FOLDER_UID, "ruleGroup": alerting.GROUP, "orgID": alerting.ORG_ID}


def _exists(get: Any, *args: Any) -> bool:
    from grafana_client.client import GrafanaClientError

    try:
        get(*args)
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return False
        raise
    return True


def _seconds(duration: str) -> int:
    from gpufleet.dashboards.macros import go_duration_seconds

    return int(go_duration_seconds(duration))


def deploy(api: GrafanaApi, env: Mapping[str, str], runbook_base: str | None = None) -> DeployReport:
    """Create or update the folder, datasource, boards and alert rules (runbook links under `runbook_base`,
    `alerts.runbook_base_url`); returns what it did."""
    report = DeployReport()

    def note(created: bool, what: str) -> None:
        (report.created if created else report.updated).append(what)
        log.info("%s %s", "created" if created else "updated", what)

    api.health.check()
    folder = f"folder {alerting.FOLDER_UID}"
    if _exists(api.folder.get_folder, alerting.FOLDER_UID):
        api.folder.update_folder(alerting.FOLDER_UID, title=alerting.FOLDER_TITLE, overwrite=True)
        note(False, folder)
    else:
        api.folder.create_folder(alerting.FOLDER_TITLE, uid=alerting.FOLDER_UID)
        note(True, folder)

    payload = datasource_payload(env)
    if _exists(api.datasource.get_datasource_by_uid, DS_UID):
        api.datasource.update_datasource_by_uid(DS_UID, payload)
        note(False, f"datasource {DS_UID}")
    else:
        api.datasource.create_datasource(payload)
        note(True, f"datasource {DS_UID}")

    for board in BOARDS:
        existed = _exists(api.dashboard.get_dashboard, board.uid)
        api.dashboard.update_dashboard({
            "dashboard": board.to_json(), "folderUid": alerting.FOLDER_UID, "overwrite": True,
            "message": "gpufleet dashboards deploy",
        })
        note(not existed, f"dashboard {board.uid}")

    group = alerting.provisioning(runbook_base)["groups"][0]
    for rule in group["rules"]:
        body = rule_payload(rule)
        if _exists(api.alertingprovisioning.get_alertrule, rule["uid"]):
            api.alertingprovisioning.update_alertrule(rule["uid"], body)
            note(False, f"alert rule {rule['uid']}")
        else:
            api.alertingprovisioning.create_alertrule(body)
            note(True, f"alert rule {rule['uid']}")
    current = api.alertingprovisioning.get_rule_group(alerting.FOLDER_UID, alerting.GROUP)
    interval = _seconds(group["interval"])
    if current.get("interval") != interval:
        api.alertingprovisioning.update_rule_group(alerting.FOLDER_UID, alerting.GROUP,
                                                   {**current, "interval": interval})
    return report


def read_token(token: str | None, token_file: str | None) -> str:
    """The API token from `--token`, `--token-file` or `$GRAFANA_TOKEN`; a clear error when none."""
    if token:
        return token
    if token_file:
        return Path(token_file).read_text().strip()
    if env := os.environ.get("GRAFANA_TOKEN"):
        return env
    raise DeployError("no Grafana token: pass --token-file PATH or set GRAFANA_TOKEN (a service-account token)")


def connect(url: str, token: str) -> GrafanaApi:
    from grafana_client import GrafanaApi

    return GrafanaApi.from_url(url, credential=token)


def run(url: str, token: str, env: Mapping[str, str] | None = None,
        runbook_base: str | None = None) -> DeployReport:
    """Deploy to the Grafana at `url`; errors become `DeployError` without the token in them."""
    from grafana_client.client import GrafanaException

    try:
        return deploy(connect(url, token), os.environ if env is None else env, runbook_base)
    except GrafanaException as exc:
        message = str(exc.message).replace(token, "***")
        hint = " (is the token a service-account token with Admin or Editor role?)" if exc.status_code in (401, 403) \
            else ""
        raise DeployError(f"Grafana at {url} refused the deploy: {message}{hint}") from None
    except OSError as exc:
        raise DeployError(f"cannot reach Grafana at {url}: {exc}") from None
