"""An endpoint's URL on this machine: a reverse proxy in front of the model servers that serve it.

    router = Router(port)          # the endpoint URL: http://127.0.0.1:<port>
    router.route({old.url: 1.0})   # each request goes to one of these servers, by weight
    router.route({new.url: 1.0})   # the shift: later requests go to the new one

SageMaker keeps an endpoint's URL while a blue/green update starts a new fleet beside the old one and shifts
traffic between them; the local harness does the same with one router per endpoint and one ``serve`` per
model. Weights change between requests, never under one, so a request in flight finishes where it started.
A server that cannot be reached answers 502 here.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FORWARDED_HEADERS = ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes")
TIMEOUT_S = 120.0


class Router:
    """A threaded HTTP proxy on ``port`` that forwards each request to one of the servers of :meth:`route`."""

    def __init__(self, port: int):
        self.port = port
        self._weights: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def route(self, weights: Mapping[str, float]) -> None:
        """Send each later request to one of these server URLs, chosen by weight."""
        with self._lock:
            self._weights = {url: w for url, w in weights.items() if w > 0}

    def pick(self) -> str:
        with self._lock:
            urls, weights = list(self._weights), list(self._weights.values())
        return random.choices(urls, weights)[0]


def _handler(router: Router) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # the servers log requests themselves
            pass

        def do_GET(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            target = router.pick()
            headers = {k: v for k in FORWARDED_HEADERS if (v := self.headers.get(k)) is not None}
            parts = urlsplit(target)
            try:
                connection = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=TIMEOUT_S)
                connection.request(self.command, self.path, body=body or None, headers=headers)
                reply = connection.getresponse()
                status, payload, content_type = reply.status, reply.read(), reply.getheader("Content-Type")
                connection.close()
            except OSError as error:
                status, payload, content_type = 502, f"model server {target}: {error}".encode(), "text/plain"
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Forward
