"""The gunicorn side of ``serve``: ``python -m maskrcnn.serve.wsgi RUN_DIR`` (started by maskrcnn.serve.supervisor).

Reads the resolved settings from ``RUN_DIR/settings.json`` and runs gunicorn with
:class:`InferenceWorker`, a gevent worker that

* loads and warms the model before it accepts any connection (so traffic only ever reaches a
  ready worker; until one is ready nginx answers /ping with 503);
* runs every invocation's decode, inference and encode in one real OS thread of its own, so its
  event loop keeps answering /ping while the CPU works;
* accepts one connection at a time on the inference socket: a busy worker leaves the next
  request in the kernel's queue, where the first idle worker takes it. gevent workers otherwise
  accept greedily, and two requests can queue behind one worker while another idles.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import gevent
from flask import Flask
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.threadpool import ThreadPool
from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventWorker

from maskrcnn.errors import ServiceUnavailable
from maskrcnn.serve.gunicorn_conf import RunDir, gunicorn_options
from maskrcnn.serve.settings import ServeSettings

if TYPE_CHECKING:
    from maskrcnn.serve.app import RunBlocking
    from maskrcnn.serve.predictor import Predictor

log = logging.getLogger(__name__)

T = TypeVar("T")

INFERENCE_CONCURRENCY = 1  # invocations in flight per worker; the rest wait for any idle worker


def build_app(settings: ServeSettings, device_slot: int, run_dir: RunDir | None = None) -> Flask:
    """One worker's app: its own Predictor on its own device, its own inference thread; with
    ``settings.multi_model``, no model until ``POST /models`` (the registry in ``run_dir``)."""
    from maskrcnn.serve.app import create_app  # the serving modules load in the worker, after the fork

    device = _take_device(settings, device_slot)
    inference_thread = ThreadPool(1)
    run_blocking = _run_blocking_on(inference_thread)
    if settings.multi_model:
        return _multi_model_app(settings, device, run_dir, run_blocking)
    predictor = _load_warm_predictor(settings, device, inference_thread)
    log.info("worker ready on %s with %d torch threads", device, settings.torch_threads)
    if settings.device == "cuda":
        _log_gpu_memory(device)
    return create_app(predictor, settings, run_blocking)


def _take_device(settings: ServeSettings, device_slot: int) -> str:
    """This worker's device (``cuda:<slot % gpus>`` or ``cpu``), made torch's current one; one inter-op thread."""
    import torch  # here, in the worker: the gunicorn master never imports torch before forking

    device = f"cuda:{device_slot % settings.gpu_count}" if settings.device == "cuda" else "cpu"
    if settings.device == "cuda":
        # The current device too, not only the model's: whatever uses it (new tensors, streams, the
        # first CUDA call's context) would otherwise put a context on GPU 0 in every worker.
        torch.cuda.set_device(device)
    # Inter-op parallelism only adds threads competing for the cores (RuntimeError: already set).
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return device


def _run_blocking_on(inference_thread: ThreadPool) -> RunBlocking:
    """A ``RunBlocking`` (serve/app.py) that runs a call in ``inference_thread``, raising 503 past its deadline."""

    def capture(fn: Any) -> tuple[bool, Any]:
        # Return the exception instead of raising it: gevent's threadpool would print the traceback
        # of every bad request to stderr before handing it back.
        try:
            return True, fn()
        except Exception as exc:
            return False, exc

    def run_blocking(fn: Any, timeout: float) -> Any:
        try:
            ok, value = inference_thread.spawn(capture, fn).get(timeout=timeout)
        except gevent.Timeout:
            raise ServiceUnavailable(f"inference took longer than {timeout:g} s") from None
        if not ok:
            raise value
        return value

    return run_blocking


def _load_warm_predictor(settings: ServeSettings, device: str, inference_thread: ThreadPool) -> Predictor:
    """The model in ``settings.model_dir`` on ``device``, warmed up in the thread that will run inference."""
    from maskrcnn.serve.predictor import Predictor  # imports torch: in the worker only

    try:
        predictor = Predictor.load(
            settings.model_dir,
            device,
            threads=settings.torch_threads,
            warm=False,
            inference_dtype=settings.inference_dtype,
        )
    except Exception as exc:
        # gunicorn halts on a worker that fails to boot; this line is what a person needs to read.
        log.error("cannot load the model in %s: %s: %s", settings.model_dir, type(exc).__name__, exc)
        raise
    # Warm up on the thread that will run inference, so its thread-local state is warm too.
    inference_thread.spawn(predictor.warm_up).get()
    return predictor


def _log_gpu_memory(device: str) -> None:
    """What this worker's allocator holds after the warm-up (a full-size forward pass), and the GPU's free memory;
    the CUDA context comes on top (nvidia-smi's per-process figure counts both: scripts/gpu-check.sh prints it)."""
    import torch  # in the worker only

    free, total = torch.cuda.mem_get_info(device)
    log.info(
        "worker on %s: torch holds %.0f MiB (peak %.0f MiB); the GPU has %.0f of %.0f MiB free",
        device,
        torch.cuda.memory_reserved(device) / 2**20,
        torch.cuda.max_memory_reserved(device) / 2**20,
        free / 2**20,
        total / 2**20,
    )


def _multi_model_app(settings: ServeSettings, device: str, run_dir: RunDir | None, run_blocking: Any) -> Flask:
    """A worker of a multi-model endpoint: no model at start; loads share the registry in the run directory."""
    import tempfile

    from maskrcnn.serve.multimodel import SYNC_EVERY_S, ModelPool, ModelRegistry, create_multi_model_app
    from maskrcnn.serve.predictor import Predictor

    def loader(folder: Path) -> Predictor:
        return Predictor.load(
            folder, device, threads=settings.torch_threads, warm=True, inference_dtype=settings.inference_dtype
        )

    shared = run_dir.path if run_dir is not None else Path(tempfile.mkdtemp(prefix="maskrcnn-models-"))
    pool = ModelPool(ModelRegistry(shared / "models"), loader)

    def drop_unloaded_forever() -> None:  # free a model another worker unloaded, without waiting for a request
        while True:
            gevent.sleep(SYNC_EVERY_S)
            pool.drop_unloaded()

    gevent.spawn(drop_unloaded_forever)
    log.info("multi-model worker ready on %s with %d torch threads, no model loaded", device, settings.torch_threads)
    return create_multi_model_app(pool, settings, run_blocking)


class ServingApplication(BaseApplication):
    def __init__(self, settings: ServeSettings, run_dir: RunDir):
        self.settings = settings
        self.run_dir = run_dir
        self.inference_address = str(run_dir.inference_socket) if settings.nginx else None
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings, self.run_dir).items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return build_app(self.settings, 0, self.run_dir)


class InferenceWorker(GeventWorker):
    device_slot = 0  # set by maskrcnn.serve.gunicorn_conf.assign_device_slot before the fork

    def load_wsgi(self) -> None:
        self.wsgi = build_app(self.app.settings, self.device_slot, self.app.run_dir)

    def run(self) -> None:
        inference_address = self.app.inference_address
        servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            gated = inference_address is not None and _address(sock) == inference_address
            pool = Pool(INFERENCE_CONCURRENCY if gated else self.worker_connections)
            server = StreamServer(sock, handle=partial(self.handle, sock), spawn=pool)
            server.max_accept = 1  # take one connection per wake-up; leave the rest to the other workers
            server.start()
            servers.append(server)

        while self.alive:
            self.notify()
            gevent.sleep(1.0)

        # SIGTERM: stop accepting, let in-flight requests finish within graceful_timeout.
        for server in servers:
            server.close()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline and any(s.pool.free_count() != s.pool.size for s in servers):
            self.notify()
            gevent.sleep(0.1)
        for server in servers:
            server.stop(timeout=1)


def _address(sock: Any) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return ""
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv: list[str]) -> int:
    from maskrcnn.contract import setup_logging

    setup_logging()
    if len(argv) != 1:
        log.error("usage: python -m maskrcnn.serve.wsgi RUN_DIR")
        return 2
    run_dir = RunDir(Path(argv[0]))
    settings = ServeSettings.from_json(run_dir.settings_file.read_text())
    ServingApplication(settings, run_dir).run()  # gunicorn's arbiter exits the process itself
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
