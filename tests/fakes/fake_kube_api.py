"""A Kubernetes API server for tests, as much as the agent asks of it: `GET /api/v1/namespaces/<ns>/pods/<name>`.

It answers with the pods the test sets (labels and annotations), 404 for others, and 503 while
`down` is set; the official `kubernetes` client talks to it over real HTTP (`api_client()`).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/?]+)")


class FakeKubeApi:
    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
        self.down = False
        self.requests = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests += 1
                m = _POD.match(self.path)
                pod = api.pods.get((m.group(1), m.group(2))) if m else None
                if api.down:
                    self._send(503, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503})
                elif m is None or pod is None:
                    self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                     "reason": "NotFound"})
                else:
                    self._send(200, {"kind": "Pod", "apiVersion": "v1", "metadata": {
                        "name": m.group(2), "namespace": m.group(1), **pod}})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def set_pod(self, namespace: str, name: str, labels: dict[str, str] | None = None,
                annotations: dict[str, str] | None = None) -> None:
        self.pods[(namespace, name)] = {"labels": labels or {}, "annotations": annotations or {}}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def api_client(self) -> Any:
        from kubernetes import client

        conf = client.Configuration(host=self.url)
        return client.ApiClient(conf)

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
