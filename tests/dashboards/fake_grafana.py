"""A fake of Grafana's HTTP API: just the endpoints `dashboards.deploy` uses, with Grafana's status codes.

A stdlib HTTP server on a free loopback port that keeps folders, datasources, dashboards, alert
rules and rule groups in memory and records every request, so a test can see exactly what a
deploy did. It checks what Grafana checks that matters here: the bearer token (401), unknown
uids (404), creating what exists (409), a dashboard that exists without `overwrite` (412), and a
folder or datasource that a dashboard or rule names but that does not exist (400). Paths and
payloads follow Grafana's HTTP API docs (folder, data source, dashboard and alerting
provisioning APIs). It is a fake: no permissions, versions are counters, nothing persists.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    body: Any
    authorization: str | None


@dataclass
class State:
    token: str
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


Reply = tuple[int, Any]


def _missing(what: str) -> Reply:
    return 404, {"message": f"{what} not found"}


def _route(s: State, method: str, path: str, body: Any) -> Reply:
    if (method, path) == ("GET", "/api/frontend/settings"):
        return 200, {"buildInfo": {"version": "12.4.0"}}
    if m := re.fullmatch(r"/api/folders/([^/]+)", path):
        uid = m.group(1)
        if uid not in s.folders:
            return _missing("folder")
        if method == "PUT":
            s.folders[uid].update(title=body["title"], version=s.folders[uid]["version"] + 1)
        return 200, s.folders[uid]
    if (method, path) == ("POST", "/api/folders"):
        if body["uid"] in s.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        s.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"], "version": 1}
        return 200, s.folders[body["uid"]]
    if m := re.fullmatch(r"/api/datasources/uid/([^/]+)", path):
        uid = m.group(1)
        if uid not in s.datasources:
            return _missing("data source")
        if method == "PUT":
            s.datasources[uid] = {**body, "uid": uid, "id": s.datasources[uid]["id"]}
            return 200, {"datasource": s.datasources[uid], "message": "Datasource updated"}
        return 200, s.datasources[uid]
    if (method, path) == ("POST", "/api/datasources"):
        if body.get("uid") in s.datasources:
            return 409, {"message": "data source with the same uid already exists"}
        s.datasources[body["uid"]] = {**body, "id": len(s.datasources) + 1}
        return 200, {"datasource": s.datasources[body["uid"]], "message": "Datasource added"}
    if m := re.fullmatch(r"/api/dashboards/uid/([^/]+)", path):
        stored = s.dashboards.get(m.group(1))
        return (200, stored) if stored else _missing("dashboard")
    if (method, path) == ("POST", "/api/dashboards/db"):
        board, folder = body["dashboard"], body.get("folderUid")
        if folder and folder not in s.folders:
            return 400, {"message": f"folder {folder} not found"}
        old = s.dashboards.get(board["uid"])
        if old and not body.get("overwrite"):
            return 412, {"status": "version-mismatch", "message": "dashboard has been changed by someone else"}
        version = old["meta"]["version"] + 1 if old else 1
        s.dashboards[board["uid"]] = {"dashboard": board, "meta": {"folderUid": folder, "version": version}}
        return 200, {"status": "success", "uid": board["uid"], "version": version}
    if m := re.fullmatch(r"/api/v1/provisioning/alert-rules/([^/]+)", path):
        uid = m.group(1)
        if uid not in s.rules:
            return _missing("alert rule")
        if method == "PUT":
            return _save_rule(s, body, uid)
        return 200, s.rules[uid]
    if (method, path) == ("POST", "/api/v1/provisioning/alert-rules"):
        if body.get("uid") in s.rules:
            return 409, {"message": "an alert rule with this uid already exists"}
        return _save_rule(s, body, body["uid"], 201)
    if m := re.fullmatch(r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", path):
        key = (m.group(1), m.group(2))
        if key not in s.groups:
            return _missing("rule group")
        if method == "PUT":
            s.groups[key]["interval"] = body["interval"]
        return 200, {**s.groups[key], "rules": [r for r in s.rules.values() if (r["folderUID"], r["ruleGroup"]) == key]}
    return 404, {"message": f"no route {method} {path} in the fake"}


def _save_rule(s: State, body: dict[str, Any], uid: str, status: int = 200) -> Reply:
    if body.get("folderUID") not in s.folders:
        return 400, {"message": f"folder {body.get('folderUID')} not found"}
    for query in body["data"]:
        if query["datasourceUid"] != "__expr__" and query["datasourceUid"] not in s.datasources:
            return 400, {"message": f"data source {query['datasourceUid']} not found"}
    s.rules[uid] = body
    s.groups.setdefault((body["folderUID"], body["ruleGroup"]),
                        {"title": body["ruleGroup"], "folderUid": body["folderUID"], "interval": 60})
    return status, body


class _Handler(BaseHTTPRequestHandler):
    state: State

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        auth = self.headers.get("Authorization")
        with self.state.lock:
            self.state.requests.append(Request(self.command, self.path, body, auth))
            if auth != f"Bearer {self.state.token}":
                status, reply = 401, {"message": "Unauthorized"}
            else:
                status, reply = _route(self.state, self.command, self.path.split("?")[0], body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@contextmanager
def fake_grafana(token: str) -> Iterator[tuple[str, State]]:
    """A running fake on 127.0.0.1 and a free port: yields (base URL, its state)."""
    state = State(token)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
