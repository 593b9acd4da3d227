"""The worker's own small HTTP server, up before the engine loads: ``/metrics`` for Prometheus, ``/health`` and
``/ready`` for Kubernetes probes.

``/metrics`` always answers in Prometheus's classic text format (0.0.4). prometheus-client would answer Prometheus
2's default ``Accept`` with OpenMetrics and rewrite vLLM's ``vllm:num_requests_running`` to
``vllm_num_requests_running`` (its "underscores" escaping), and every ``vllm:`` query would miss; the text format
keeps the names for Prometheus 2 and 3 alike.

``/health`` is the liveness probe: 200 while the engine loads or serves, 503 once it died (the worker exits soon
after; a restart is what helps). ``/ready`` is 200 only while serving.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

#: the worker's state, as the registry names it: loading, serving, draining, failed
State = Callable[[], str]


def serve(host: str, port: int, state: State) -> ThreadingHTTPServer:
    """Start the server in a daemon thread; ``port`` 0 picks a free one (``server.server_port``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4)
            elif path in ("/health", "/ready"):
                current = state()
                ok = current != "failed" if path == "/health" else current == "serving"
                self._send(200 if ok else 503, json.dumps({"state": current}).encode(), "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: not worth a line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    return server
