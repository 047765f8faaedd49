"""A running ``serve``: the model put where SageMaker puts it, the server started, ``/ping`` awaited.

    with Endpoint(runtime, Path("job/model.tar.gz"), port=8080) as endpoint:
        client.invoke(endpoint.url, ...)

The model (``model.tar.gz``, extracted safely, or an unpacked folder) becomes ``<base>/model`` of a
temporary base directory: ``SAGEMAKER_BASE_DIR`` in process mode, mounted at /opt/ml/model in docker
mode. The server gets ``SAGEMAKER_BIND_TO_PORT`` (process) or ``-p PORT:8080`` (docker). Stopping
is SageMaker's: SIGTERM, SIGKILL after 30 s. The server's log goes to ``log_sink`` (and its last
lines into the error when it fails to start). ``ready_s`` is the cold start: seconds from starting the server
(``docker run`` included) to the first 200 on /ping, what SageMaker bills a serverless endpoint as
``ModelSetupTime``. ``serverless_memory_mb`` runs it as Serverless Inference does (docker mode:
``--read-only --tmpfs /tmp --memory MB``).
"""

from __future__ import annotations

import collections
import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from local import client
from local.artifacts import extract_archive
from local.errors import EndpointError, HarnessError
from local.runtime import Runtime, free_port, port_is_free, start_streaming

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 240.0  # SageMaker's older health-check deadline: 4 minutes
STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL 30 s later
_endpoint_count = 0


class Endpoint:
    """One model server on this machine; a context manager that always stops it."""

    def __init__(
        self,
        runtime: Runtime,
        model: Path,
        port: int = 8080,
        env: Mapping[str, str] | None = None,
        log_sink: Callable[[str], None] | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        serverless_memory_mb: int | None = None,
        multi_model: bool = False,
    ):
        global _endpoint_count
        _endpoint_count += 1
        self.runtime = runtime
        self.model = Path(model)
        self.port = port or free_port()
        self.env = dict(env or {})
        self.log_sink = log_sink or (lambda line: log.debug("serve | %s", line))
        self.startup_timeout_s = startup_timeout_s
        self.serverless_memory_mb = serverless_memory_mb
        self.multi_model = multi_model  # SAGEMAKER_MULTI_MODEL=true; models go into models_dir (local/multimodel.py)
        if multi_model:
            self.env["SAGEMAKER_MULTI_MODEL"] = "true"
        self.ready_s: float | None = None  # the cold start, once /ping answered 200
        self.container = f"local-endpoint-{int(time.time())}-{_endpoint_count}"
        self.recent: collections.deque[str] = collections.deque(maxlen=40)
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Endpoint:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def models_dir(self) -> Path:
        """A multi-model endpoint's models, on this machine (the server's /opt/ml/models in docker mode)."""
        assert self._workdir is not None, "the endpoint is not started"
        return self._workdir / "ml" / "models"

    def model_url(self, folder: str) -> str:
        """The ``url`` of ``POST /models`` for ``models_dir/<folder>/model``, as the server sees it."""
        if self.runtime.mode == "docker":
            return f"/opt/ml/models/{folder}/model"
        return str(self.models_dir / folder / "model")

    def _place_model(self, base: Path) -> None:
        if self.multi_model:
            (base / "models").mkdir()
            return
        target = base / "model"
        if self.model.is_dir():
            if self.runtime.mode == "process":
                target.symlink_to(self.model.resolve(), target_is_directory=True)
            else:
                shutil.copytree(self.model, target)  # a mount must not follow a link out of the tree
        elif self.model.is_file():
            extract_archive(self.model, target)
        else:
            raise HarnessError(f"--model {self.model} is neither a model.tar.gz nor a folder")

    def start(self) -> None:
        if not port_is_free(self.port):
            raise HarnessError(f"port {self.port} is in use; choose another with --port")
        self._workdir = Path(tempfile.mkdtemp(prefix="local-endpoint-"))
        try:
            base = self._workdir / "ml"
            base.mkdir()
            self._place_model(base)
            argv, env = self.runtime.serve_command(
                base, self.port, self.env, self.container, self.serverless_memory_mb, self.multi_model
            )
            log.info("starting serve (%s mode) for %s on port %d", self.runtime.mode, self.model, self.port)
            started = time.monotonic()
            self.process = start_streaming(argv, env)
            threading.Thread(target=self._pump, daemon=True).start()
            self.wait_ready()
            self.ready_s = time.monotonic() - started
        except BaseException:
            self.stop()
            raise

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.recent.append(line)
            self.log_sink(line)

    def wait_ready(self) -> None:
        started = time.monotonic()
        while time.monotonic() - started < self.startup_timeout_s:
            if self.process is not None and self.process.poll() is not None:
                time.sleep(0.2)  # let the pump catch the last lines
                raise EndpointError(
                    f"serve exited with code {self.process.returncode} before answering /ping; last lines:\n"
                    + "\n".join(self.recent)
                )
            if client.ping(self.url, timeout=2.0):
                log.info("endpoint ready at %s after %.1fs", self.url, time.monotonic() - started)
                return
            time.sleep(0.25)
        raise EndpointError(
            f"serve did not answer /ping within {self.startup_timeout_s:.0f}s; last lines:\n" + "\n".join(self.recent)
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self.runtime.mode == "docker":
                self.runtime.remove_container(self.container)
            log.info("serve stopped (exit code %s)", process.returncode)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def wait_until_stopped(endpoint: Endpoint, stop: threading.Event) -> None:
    """Block until ``stop`` is set (then return, so the caller stops the endpoint) or the server dies."""
    while not stop.wait(0.5):
        if not endpoint.alive():
            raise EndpointError("serve exited on its own; last lines:\n" + "\n".join(endpoint.recent))
