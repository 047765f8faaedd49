"""A multi-model endpoint on this machine: the platform's part in front of ``serve`` with ``SAGEMAKER_MULTI_MODEL``.

    python -m local serve --multi-model DIR [--port 8080] [--env MASKRCNN_MAX_MODELS=2 ...]
    python -m local invoke http://127.0.0.1:8080 image.png --target-model site-a.tar.gz

``DIR`` is the endpoint's S3 prefix: a folder of ``*.tar.gz`` model archives (sub-folders too; a
``TargetModel`` is the archive's path relative to ``DIR``). SageMaker's front end, as this module plays it
(AWS's "How multi-model endpoints work"): an ``InvokeEndpoint`` with ``TargetModel`` arrives; a model not
loaded yet is copied from S3 and unpacked into ``/opt/ml/models/<folder>/model`` and loaded with ``POST
/models``; when the container answers 507 (no room), the least recently used model is unloaded (``DELETE
/models/<name>``, its folder removed) and the load is tried again; then the request goes to ``POST
/models/<name>/invoke`` with ``X-Amzn-SageMaker-Target-Model`` set. The front listens on ``--port`` and
answers ``/ping`` and ``/invocations`` (``X-Amzn-SageMaker-Target-Model`` required: 400 without it, 404
for an archive ``DIR`` does not hold); the server itself runs on a private port.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from local import client
from local.artifacts import extract_archive
from local.endpoint import Endpoint
from local.errors import EndpointError, HarnessError
from local.runtime import Runtime, free_port, port_is_free

log = logging.getLogger(__name__)

TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"
PASSED_HEADERS = ("Content-Type", "Accept", client.ATTRIBUTES_HEADER, TARGET_MODEL_HEADER)
LOAD_TIMEOUT_S = 600.0


def archives(models: Path) -> list[str]:
    """Every ``*.tar.gz`` under ``models``, as TargetModel names (paths relative to it), sorted."""
    return sorted(p.relative_to(models).as_posix() for p in models.rglob("*.tar.gz") if p.is_file())


def model_name(target: str) -> str:
    """The container's ``model_name`` for a TargetModel: readable where it can be, unique always (a URL
    path segment, so no ``/``)."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", target.removesuffix(".tar.gz"))[:64] or "model"
    return f"{readable}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"


class Reply(Exception):
    """An answer the front gives itself (no server involved): status and a JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class MultiModelEndpoint:
    """``serve`` in multi-model mode behind a front that loads, evicts and routes as SageMaker does."""

    def __init__(
        self,
        runtime: Runtime,
        models: Path,
        port: int = 8080,
        env: Mapping[str, str] | None = None,
        log_sink: Callable[[str], None] | None = None,
    ):
        self.models = Path(models)
        if not self.models.is_dir():
            raise HarnessError(f"--multi-model {models} is not a folder")
        if not archives(self.models):
            raise HarnessError(f"--multi-model {models} holds no *.tar.gz model archives")
        self.port = port or free_port()
        self.server = Endpoint(runtime, self.models, free_port(), env, log_sink, multi_model=True)
        self.loaded: OrderedDict[str, str] = OrderedDict()  # TargetModel -> model_name, least recently used first
        self.lock = threading.Lock()  # one load or eviction at a time, as the platform serialises them
        self.evictions = 0
        self._http: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MultiModelEndpoint:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if not port_is_free(self.port):
            raise HarnessError(f"port {self.port} is in use; choose another with --port")
        self.server.start()
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/ping":
                    ok = client.ping(front.server.url, timeout=2.0)
                    self._send(200 if ok else 503, b"" if ok else b'{"error": "the server is not healthy"}\n')
                else:
                    self._error(404, f"{self.path}: a multi-model endpoint answers /ping and /invocations")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path != "/invocations":
                    self._error(404, f"{self.path}: a multi-model endpoint answers /ping and /invocations")
                    return
                headers = {name: self.headers[name] for name in PASSED_HEADERS if self.headers.get(name)}
                try:
                    reply = front.invoke(headers.get(TARGET_MODEL_HEADER, ""), body, headers)
                except Reply as exc:
                    self._error(exc.status, str(exc))
                except EndpointError as exc:
                    self._error(502, str(exc))
                else:
                    self._send(reply.status, reply.body, reply.content_type)

            def _error(self, status: int, message: str) -> None:
                self._send(status, (json.dumps({"error": message}) + "\n").encode())

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type or "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("front: " + format, *args)

        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        log.info("multi-model endpoint for %s at %s (server on port %d)", self.models, self.url, self.server.port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self.server.stop()

    def alive(self) -> bool:
        return self.server.alive()

    # ---- the platform's part ------------------------------------------------------------------------------

    def invoke(self, target: str, body: bytes, headers: Mapping[str, str]) -> client.Reply:
        """Load ``target`` if needed (evicting on 507), then ``POST /models/<name>/invoke``."""
        if not target:
            raise Reply(400, f"a multi-model endpoint needs {TARGET_MODEL_HEADER} (invoke --target-model NAME)")
        name = self.ensure_loaded(target)
        path = f"/models/{urllib.parse.quote(name, safe='')}/invoke"
        reply = client.request("POST", self.server.url + path, body, dict(headers), timeout=LOAD_TIMEOUT_S)
        if reply.status == 404:  # unloaded behind our back (a restart): load again, once
            with self.lock:
                self.loaded.pop(target, None)
            name = self.ensure_loaded(target)
            reply = client.request("POST", self.server.url + path, body, dict(headers), timeout=LOAD_TIMEOUT_S)
        return reply

    def ensure_loaded(self, target: str) -> str:
        with self.lock:
            if target in self.loaded:
                self.loaded.move_to_end(target)
                return self.loaded[target]
            archive = (self.models / target).resolve()
            if not archive.is_relative_to(self.models.resolve()) or not archive.is_file():
                raise Reply(404, f"TargetModel {target!r}: no such archive in {self.models}")
            name = model_name(target)
            folder = self.server.models_dir / name
            if not folder.is_dir():
                extract_archive(archive, folder / "model")  # as SageMaker copies it from S3 and unpacks it
            request = {"model_name": name, "url": self.server.model_url(name)}
            while True:
                reply = client.request(
                    "POST",
                    self.server.url + "/models",
                    json.dumps(request).encode(),
                    {"Content-Type": "application/json"},
                    timeout=LOAD_TIMEOUT_S,
                )
                if reply.ok or reply.status == 409:
                    break
                if reply.status == 507 and self.loaded:
                    self._evict()
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                raise Reply(reply.status, f"TargetModel {target!r}: {reply.message()}")
            self.loaded[target] = name
            log.info("loaded %s as %s (%d loaded)", target, name, len(self.loaded))
            return name

    def _evict(self) -> None:
        """The least recently used model: unloaded from the server, its folder removed."""
        target, name = self.loaded.popitem(last=False)
        reply = client.request("DELETE", f"{self.server.url}/models/{urllib.parse.quote(name, safe='')}")
        shutil.rmtree(self.server.models_dir / name, ignore_errors=True)
        self.evictions += 1
        log.info("507 from the server: evicted %s (HTTP %d), %d loaded", target, reply.status, len(self.loaded))
