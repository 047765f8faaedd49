"""``serve``: start nginx and gunicorn, supervise both, stop them gracefully.

    docker run -p 8080:8080 -v $PWD/model:/opt/ml/model IMAGE serve
    SAGEMAKER_BASE_DIR=/tmp/job images/maskrcnn/serve          # on a laptop

Reads :class:`~maskrcnn.serve.settings.ServeSettings` once from the environment, checks the saved model
without torch (:func:`~maskrcnn.model.format.check_saved_model`: both files, model.json's format
version and arch, the safetensors header; a bad setting or model exits ``EXIT_REFUSED`` (2) in well
under a second, one line naming the path and the fix, nothing started) -- and before those, that a
GPU the host has is one CUDA can use (:func:`~maskrcnn.device.require_usable_gpu`: refused the same
way, never served on CPU) --, writes a run directory (settings for the gunicorn child, nginx.conf,
sockets, nginx temp files), then starts

* gunicorn (``python -m maskrcnn.serve.wsgi RUN_DIR``) with gevent workers on two unix sockets, and
* nginx on the public port (8080 or ``SAGEMAKER_BIND_TO_PORT``), ``daemon off``, error log to
  stderr, access log to stdout.

Where nginx is not installed (``MASKRCNN_NGINX=off`` forces it), gunicorn listens on the port
itself and a warning says so: fine on a laptop, but nothing buffers slow clients.

If either child exits, ``serve`` stops the other and exits non-zero. On SIGTERM, SIGINT or SIGQUIT
(SageMaker sends SIGKILL 30 s after SIGTERM) nginx stops listening and drains its in-flight
requests, then gunicorn drains its workers; everything is gone within ``graceful_timeout_s`` + a few
seconds, the run directory too, and ``serve`` exits 0. SIGHUP reloads: nginx and gunicorn each get
it once they handle it themselves, and each replaces its workers gracefully (old ones finish their
requests). SIGUSR1/2 are ignored: their default action would kill ``serve`` and orphan its children.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import FrameType

from maskrcnn.device import prepare_device, probe
from maskrcnn.errors import ConfigError, ModelError
from maskrcnn.model.format import check_saved_model
from maskrcnn.serve.gunicorn_conf import RunDir
from maskrcnn.serve.settings import ServeSettings

log = logging.getLogger(__name__)

POLL_S = 0.2
KILL_AFTER_S = 28  # SageMaker's SIGKILL comes 30 s after SIGTERM
EXIT_REFUSED = 2  # a bad setting or an unusable model: refused before anything started
MAX_NGINX_WORKERS = 2  # proxying is cheap; more processes would only take CPU from the model
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)  # SIGHUP reloads (Supervisor._on_reload)
# Their default action would kill serve and orphan its children; nothing here has a use for them.
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="serve", description="Serve the Mask R-CNN model in SAGEMAKER_BASE_DIR/model (default /opt/ml)."
    )
    parser.parse_args(argv)
    try:
        if os.environ.get("MASKRCNN_DEVICE", "auto").lower() != "cpu":  # MASKRCNN_DEVICE=cpu: the CPU on purpose
            gpus = prepare_device(os.environ).count  # the CUDA route before torch loads; a GPU none reaches: refused
        else:
            gpus = gpu_count(os.environ)
        settings = ServeSettings.from_env(
            os.environ,
            cpu_count=cpu_count(),
            gpu_count=gpus,
            gpu_memory_bytes=gpu_memory_bytes(gpus),
            memory_bytes=memory_limit_bytes(),
            nginx=shutil.which("nginx"),
        )
        if settings.multi_model:  # a multi-model endpoint has no /opt/ml/model: models come through POST /models
            log.info("multi-model endpoint: models under %s are loaded on POST /models", settings.base_dir / "models")
            return Supervisor(settings).run()
        spec = check_saved_model(settings.model_dir)
    except (ConfigError, ModelError) as exc:
        log.error("serve cannot start: %s", exc)
        return EXIT_REFUSED
    log.info(
        "model %s: %s, %d classes, format %d",
        settings.model_dir,
        spec.arch,
        len(spec.class_names),
        spec.format_version,
    )
    return Supervisor(settings).run()


def cpu_count() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota when one is set."""
    count = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    return count


def memory_limit_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The container's memory cap (``docker run --memory``, a serverless endpoint's size): cgroup v2's
    ``memory.max``, else v1's ``memory.limit_in_bytes``; 0 when there is none (v1 writes a huge number)."""
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = (cgroup / name).read_text().strip()
            limit = 0 if text == "max" else int(text)
            return limit if 0 < limit < 2**60 else 0
    return 0


def gpu_count(environ: Mapping[str, str] = os.environ) -> int:
    """Visible CUDA devices, as :func:`maskrcnn.device.probe` finds them: torch is imported only where
    :func:`maskrcnn.device.gpus_present` says a GPU is (its ``MASKRCNN_NVIDIA_PROC`` seam included)."""
    return probe(environ).count


def gpu_memory_bytes(count: int) -> int:
    """The smallest visible GPU's total memory (0 with no GPU), from the device properties, as
    :func:`maskrcnn.device.probe` reads the capabilities: no allocation, so no CUDA context is expected in
    ``serve`` itself (scripts/gpu-check.sh lists each process's GPU memory to show it)."""
    if count < 1:
        return 0
    import torch

    return min(int(torch.cuda.get_device_properties(i).total_memory) for i in range(count))


def render_nginx_conf(settings: ServeSettings, run_dir: RunDir, cpus: int) -> str:
    template = resources.files("maskrcnn.serve").joinpath("nginx.conf.tmpl").read_text()
    values = {
        "RUN_DIR": str(run_dir.path),
        "NGINX_PID": str(run_dir.nginx_pid),
        "PORT": str(settings.port),
        "NGINX_WORKERS": str(max(1, min(cpus, MAX_NGINX_WORKERS))),
        "MAX_BODY": str(settings.max_payload_bytes),
        "BODY_BUFFER": str(min(settings.max_payload_bytes, 16 * 1024 * 1024)),
        "NGINX_TIMEOUT": str(settings.nginx_timeout_s),
        "CONTROL_SOCKET": str(run_dir.control_socket),
        "INFERENCE_SOCKET": str(run_dir.inference_socket),
    }
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", value)
    if "@@" in template:
        raise ConfigError("nginx.conf.tmpl has a placeholder render_nginx_conf does not fill")
    return template


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if serve itself is killed, instead of living on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Owns the two child processes and the run directory; turns signals into stop or reload."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.stop_requested = False
        self.reload_requested = False
        self.reload_pending: set[str] = set()  # children a SIGHUP has not reached yet
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s: draining and stopping", signal.Signals(signum).name)
        self.stop_requested = True

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _on_ignored(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: ignored (HUP reloads; TERM, INT or QUIT stop)", signal.Signals(signum).name)

    def run(self) -> int:
        # Before anything exists to leak: a signal whose default action kills serve would orphan the
        # children (gunicorn drains for seconds on its own) and leave the run directory behind.
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        for signum in IGNORED_SIGNALS:
            signal.signal(signum, self._on_ignored)
        run_dir = RunDir(Path(tempfile.mkdtemp(prefix="maskrcnn-serve-")))
        # nginx's workers drop to an unprivileged user when started as root: let them reach the sockets.
        run_dir.path.chmod(0o711)
        try:
            return self._run(run_dir)
        finally:
            self._kill_all()
            shutil.rmtree(run_dir.path, ignore_errors=True)

    def _run(self, run_dir: RunDir) -> int:
        settings = self.settings
        run_dir.settings_file.write_text(settings.to_json())
        log.info(
            "serving %s on port %d: %d worker(s) x %d torch thread(s) on %s, timeout %d s, payload %d MiB, "
            "memory cap %s",
            settings.model_dir,
            settings.port,
            settings.workers,
            settings.torch_threads,
            settings.device,
            settings.timeout_s,
            settings.max_payload_mb,
            f"{settings.memory_bytes / 2**30:.1f} GiB" if settings.memory_bytes else "none",
        )
        if settings.device == "cuda":
            log.info(
                "%d GPU(s) of %.1f GiB: %d worker(s) per GPU, each with one request in flight; autocast %s",
                settings.gpu_count,
                settings.gpu_memory_bytes / 2**30,
                settings.workers_per_gpu,
                settings.inference_dtype,
            )
        self._start("gunicorn", [sys.executable, "-m", "maskrcnn.serve.wsgi", str(run_dir.path)])
        if settings.nginx:
            run_dir.nginx_conf.write_text(render_nginx_conf(settings, run_dir, cpu_count()))
            self._start(
                "nginx",
                [settings.nginx, "-e", "stderr", "-p", str(run_dir.path), "-c", str(run_dir.nginx_conf)],
            )
        else:
            log.warning(
                "nginx is not installed: gunicorn listens on port %d itself (process mode: no front-end "
                "buffering of slow clients; fine on a laptop, not for an endpoint)",
                settings.port,
            )

        while not self.stop_requested:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    why = " (a worker failed to boot; its error is above)" if (name, code) == ("gunicorn", 3) else ""
                    log.error("%s exited with code %s%s; stopping the server", name, code, why)
                    self._stop_gracefully(time.monotonic() + 5)
                    return code if code > 0 else 1
            self._forward_reload(run_dir)
            time.sleep(POLL_S)
        self._stop_gracefully(time.monotonic() + KILL_AFTER_S)
        return 0

    def _forward_reload(self, run_dir: RunDir) -> None:
        """SIGHUP to each child once it has its own HUP handler: before that, HUP would kill it.
        nginx has one when it has written its pid file; gunicorn when its when_ready hook has run."""
        if self.reload_requested:
            self.reload_requested = False
            try:  # new workers load the model from disk again: one that cannot would halt gunicorn
                if not self.settings.multi_model:
                    check_saved_model(self.settings.model_dir)
            except ModelError as exc:
                log.error("received SIGHUP: not reloading, the running workers keep serving: %s", exc)
                return
            log.info("received SIGHUP: reloading nginx and the gunicorn workers (in-flight requests finish)")
            self.reload_pending = set(self.children)
        ready = {"nginx": run_dir.nginx_pid, "gunicorn": run_dir.gunicorn_ready}
        for name in sorted(self.reload_pending):
            if ready[name].exists():
                self.children[name].send_signal(signal.SIGHUP)
                self.reload_pending.discard(name)

    def _start(self, name: str, command: list[str]) -> None:
        log.info("starting %s: %s", name, " ".join(command))
        self.children[name] = subprocess.Popen(command, preexec_fn=_die_with_parent)

    def _stop_gracefully(self, deadline: float) -> None:
        # nginx first: it stops listening at once and waits for answers gunicorn is still producing.
        self._signal_and_wait("nginx", signal.SIGQUIT, deadline)
        self._signal_and_wait("gunicorn", signal.SIGTERM, deadline)

    def _signal_and_wait(self, name: str, signum: int, deadline: float) -> None:
        child = self.children.get(name)
        if child is None or child.poll() is not None:
            return
        child.send_signal(signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        if child.poll() is None:
            log.warning("%s did not stop in time; killing it", name)
            child.kill()
            child.wait()
        else:
            log.info("%s stopped (code %s)", name, child.returncode)

    def _kill_all(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
