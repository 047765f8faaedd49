"""SageMaker's multi-model container API: ``serve`` with ``SAGEMAKER_MULTI_MODEL=true``.

A multi-model endpoint starts the container with no ``/opt/ml/model``; SageMaker copies each model it is asked
for from S3 to ``/opt/ml/models/<name>/model`` and tells the container to load it. The API (shared/CONTRACT.md,
AWS's "Custom Containers Contract for Multi-Model Endpoints"):

====================================  =====================================================================
``GET /ping``                         200 with no model loaded
``POST /models``                      ``{"model_name": ..., "url": ...}``: load; 200, 409 already loaded, 507 it would
                                      not fit in memory (SageMaker then unloads a model and retries), 404 no such
                                      folder, 400 not a model this image loads (the reason in ``error``)
``GET /models``                       ``{"models": [{"modelName", "modelUrl"}], "nextPageToken"}``, ``PAGE_SIZE``
                                      a page; ``?next_page_token=`` the next page
``GET /models/<name>``                ``{"modelName", "modelUrl"}``; 404 unknown
``DELETE /models/<name>``             unload; 404 unknown
``POST /models/<name>/invoke``        what ``/invocations`` is for one model (same formats, options, errors)
====================================  =====================================================================

Loaded models share the workers: the worker that takes ``POST /models`` loads and warms the model in its
inference thread and records it in the run directory's registry (:class:`ModelRegistry`: a file a model,
created exclusively, so two loads of one name race to one 200 and one 409); another worker loads it on its
first invocation of it, and every worker drops a model within a second of its unload. So each loaded model
costs its weights once per worker: :func:`fits` refuses (507) a load whose weights, ``LOAD_FACTOR`` times over
in each worker, exceed the memory left (the container's cgroup limit less its use, else ``MemAvailable``), and
``MASKRCNN_MAX_MODELS`` caps the count (507 beyond it; 0 = memory only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from maskrcnn.errors import ModelError, RequestError
from maskrcnn.model.format import WEIGHTS_FILE, check_saved_model
from maskrcnn.serve import codec
from maskrcnn.serve.app import ATTRIBUTES_HEADER, RunBlocking, answer, call_now, register_error_handlers
from maskrcnn.serve.codec import RequestOptions
from maskrcnn.serve.settings import ServeSettings

log = logging.getLogger(__name__)

PAGE_SIZE = 100  # models a GET /models page lists
LOAD_FACTOR = 2.0  # a loaded model's memory in a worker, as a multiple of its weights file (measured: docs/serving.md)
TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"
SYNC_EVERY_S = 1.0  # how soon a worker drops a model another worker unloaded

Loader = Callable[[Path], Any]  # a model folder -> a warm predictor (in the inference thread)


class ModelRegistry:
    """The endpoint's loaded models, shared by the workers: ``<dir>/<hex of the name>.json`` per model."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def _file(self, name: str) -> Path:
        return self.path / f"{name.encode().hex()}.json"

    def add(self, name: str, url: str) -> bool:
        """Record ``name``; False when it is already there (the caller answers 409)."""
        try:
            fd = os.open(self._file(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            json.dump({"modelName": name, "modelUrl": url}, out)
        return True

    def remove(self, name: str) -> bool:
        try:
            self._file(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def get(self, name: str) -> dict[str, str] | None:
        try:
            entry: dict[str, str] = json.loads(self._file(name).read_text())
        except (FileNotFoundError, ValueError):  # unknown, or being written this instant
            return None
        return entry

    def entries(self) -> list[dict[str, str]]:
        found = (self.get(bytes.fromhex(p.stem).decode()) for p in self.path.glob("*.json"))
        return sorted((e for e in found if e is not None), key=lambda e: e["modelName"])


def memory_available_bytes(cgroup: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")) -> int:
    """Memory a new model may take: the cgroup v2 limit less its current use, else the host's MemAvailable."""
    with contextlib.suppress(OSError, ValueError):
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            return max(0, int(limit) - int((cgroup / "memory.current").read_text()))
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return 0


def fits(weights_bytes: int, workers: int, available_bytes: int) -> bool:
    """Whether a model with ``weights_bytes`` of weights fits when every worker holds it (0 available: unknown)."""
    return available_bytes <= 0 or weights_bytes * LOAD_FACTOR * workers <= available_bytes


def _rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


class ModelPool:
    """One worker's loaded predictors, kept in step with the shared registry."""

    def __init__(self, registry: ModelRegistry, loader: Loader):
        self.registry = registry
        self.loader = loader
        self.loaded: dict[str, tuple[str, Any]] = {}  # name -> (url, predictor)

    def load(self, name: str, url: str) -> Any:
        before = _rss_bytes()
        started = time.perf_counter()
        predictor = self.loader(Path(url))
        self.loaded[name] = (url, predictor)
        log.info(
            "model %r loaded from %s in %.2f s: +%.0f MiB in this worker (%d loaded here)",
            name,
            url,
            time.perf_counter() - started,
            (_rss_bytes() - before) / 2**20,
            len(self.loaded),
        )
        return predictor

    def drop_unloaded(self) -> None:
        """Forget models another worker unloaded, so their memory is freed here too."""
        for name in list(self.loaded):
            entry = self.registry.get(name)
            if entry is None or entry["modelUrl"] != self.loaded[name][0]:
                del self.loaded[name]
                log.info("model %r unloaded (%d loaded here)", name, len(self.loaded))


def create_multi_model_app(pool: ModelPool, settings: ServeSettings, run_blocking: RunBlocking | None = None) -> Flask:
    """The multi-model routes; ``run_blocking`` runs loads and invocations off the event loop, as in app.py."""
    app = Flask("maskrcnn-multi-model")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_payload_bytes
    routes = MultiModelRoutes(pool, settings, run_blocking or call_now)
    app.get("/ping")(routes.ping)
    app.post("/models")(routes.load_model)
    app.get("/models")(routes.list_models)
    app.get("/models/<name>")(routes.get_model)
    app.delete("/models/<name>")(routes.unload_model)
    app.post("/models/<name>/invoke")(routes.invoke)
    app.post("/invocations")(routes.invocations)
    register_error_handlers(app)
    return app


class MultiModelRoutes:
    """One worker's handlers for the routes in this module's docstring, over its pool and the shared registry."""

    def __init__(self, pool: ModelPool, settings: ServeSettings, run: RunBlocking):
        self.pool = pool
        self.registry = pool.registry
        self.settings = settings
        self.run = run
        self.models_root = (settings.base_dir / "models").resolve()

    def ping(self) -> Response:
        return Response(status=200)  # healthy with no model loaded

    def load_model(self) -> tuple[Response, int]:
        """Check the request, the folder and the room left, record the model, then load and warm it here."""
        name, url = _load_request(request.get_json(silent=True))
        folder = self._loadable_folder(name, url)
        self._check_room(name, folder)
        if not self.registry.add(name, url):
            raise RequestError(f"model {name!r} is already loaded", status=409)
        try:
            self.run(lambda: self.pool.load(name, url), self.settings.timeout_s)
        except Exception as exc:
            self.registry.remove(name)
            if isinstance(exc, RequestError):
                raise
            raise RequestError(f"model {name!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
        return jsonify(modelName=name, modelUrl=url), 200

    def _loadable_folder(self, name: str, url: str) -> Path:
        """The model's folder: under the models root, present, not loaded yet, a saved model this image loads."""
        folder = Path(url).resolve()
        if not folder.is_relative_to(self.models_root):
            raise RequestError(
                f"url {url} is not under {self.models_root}, where SageMaker puts a multi-model endpoint's models"
            )
        if not folder.is_dir():
            raise RequestError(f"url {url}: no such folder", status=404)
        if self.registry.get(name) is not None:
            raise RequestError(f"model {name!r} is already loaded", status=409)
        try:
            check_saved_model(folder)
        except ModelError as exc:
            raise RequestError(f"model {name!r}: {exc}") from None
        return folder

    def _check_room(self, name: str, folder: Path) -> None:
        """507 beyond ``MASKRCNN_MAX_MODELS`` or when every worker's copy would not fit in the memory left."""
        settings = self.settings
        loaded = self.registry.entries()
        if settings.max_models and len(loaded) >= settings.max_models:
            raise RequestError(
                f"{len(loaded)} models are loaded, MASKRCNN_MAX_MODELS={settings.max_models}", status=507
            )
        weights = (folder / WEIGHTS_FILE).stat().st_size
        available = memory_available_bytes()
        if not fits(weights, settings.workers, available):
            raise RequestError(
                f"model {name!r} needs ~{weights * LOAD_FACTOR * settings.workers / 2**20:.0f} MiB "
                f"({settings.workers} worker(s)); {available / 2**20:.0f} MiB are free",
                status=507,
            )

    def list_models(self) -> Response:
        self.pool.drop_unloaded()
        token = request.args.get("next_page_token", "0")
        if not token.isdigit():
            raise RequestError(f"next_page_token {token!r} is not one this server gave")
        start = int(token)
        entries = self.registry.entries()
        page: dict[str, Any] = {"models": entries[start : start + PAGE_SIZE]}
        if start + PAGE_SIZE < len(entries):
            page["nextPageToken"] = str(start + PAGE_SIZE)
        return jsonify(page)

    def get_model(self, name: str) -> Response:
        entry = self.registry.get(name)
        if entry is None:
            raise RequestError(f"model {name!r} is not loaded", status=404)
        return jsonify(entry)

    def unload_model(self, name: str) -> Response:
        if not self.registry.remove(name):
            raise RequestError(f"model {name!r} is not loaded", status=404)
        self.pool.drop_unloaded()
        return jsonify(modelName=name)

    def invoke(self, name: str) -> Response:
        """What ``/invocations`` does, with model ``name`` (loaded in this worker first if another loaded it)."""
        pool, settings = self.pool, self.settings
        pool.drop_unloaded()
        entry = self.registry.get(name)
        if entry is None:
            raise RequestError(f"model {name!r} is not loaded", status=404)
        response_type = codec.negotiate(request.headers.get("Accept"))
        content_type = request.mimetype
        codec.check_content_type(content_type)
        body = request.get_data(cache=False)

        def predict() -> tuple[bytes, str, str]:
            loaded = pool.loaded.get(name)
            predictor = loaded[1] if loaded and loaded[0] == entry["modelUrl"] else pool.load(name, entry["modelUrl"])
            spec = predictor.spec
            defaults = RequestOptions(spec.score_threshold, spec.max_detections, "rle")
            options = codec.parse_attributes(request_attributes, defaults, spec.max_detections)
            return answer(predictor, body, content_type, response_type, options, settings)

        request_attributes = request.headers.get(ATTRIBUTES_HEADER)
        payload, mimetype, timing = self.run(predict, settings.timeout_s)
        return Response(payload, status=200, mimetype=mimetype, headers={"Server-Timing": timing})

    def invocations(self) -> Response:
        raise RequestError(
            f"a multi-model endpoint: POST /models/<name>/invoke (SageMaker passes {TARGET_MODEL_HEADER} there)"
        )


def _load_request(body: Any) -> tuple[str, str]:
    """(model name, url) from a ``POST /models`` body; 400 unless both are non-empty strings."""
    if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body[k] for k in ("model_name", "url")):
        raise RequestError('expected a JSON object {"model_name": "...", "url": "/opt/ml/models/<name>/model"}')
    return body["model_name"], body["url"]
