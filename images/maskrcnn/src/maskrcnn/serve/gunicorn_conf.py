"""gunicorn's configuration, derived from :class:`~maskrcnn.serve.settings.ServeSettings`.

Not a gunicorn ``-c`` file: :mod:`maskrcnn.serve.wsgi` passes :func:`gunicorn_options` to gunicorn's
config object directly, so the values come from the one resolved settings object and can be unit
tested. Behind nginx, gunicorn binds two unix sockets in the run directory (control: /ping and
friends; inference: /invocations); without nginx it binds the public port itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from maskrcnn.serve.settings import ServeSettings

WORKER_CLASS = "maskrcnn.serve.wsgi.InferenceWorker"
WORKER_CONNECTIONS = 1000  # control-socket greenlets per worker: pings are cheap, never turn one away


@dataclass(frozen=True)
class RunDir:
    """The supervisor's temporary directory: settings for the gunicorn child, sockets, nginx files."""

    path: Path

    @property
    def settings_file(self) -> Path:
        return self.path / "settings.json"

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def inference_socket(self) -> Path:
        return self.path / "inference.sock"

    @property
    def nginx_conf(self) -> Path:
        return self.path / "nginx.conf"

    @property
    def nginx_pid(self) -> Path:
        return self.path / "nginx.pid"

    @property
    def gunicorn_ready(self) -> Path:
        """Touched by gunicorn's when_ready hook: from then on its master handles SIGHUP (a reload)."""
        return self.path / "gunicorn.ready"


def gunicorn_options(settings: ServeSettings, run_dir: RunDir) -> dict[str, Any]:
    behind_nginx = settings.nginx is not None
    if behind_nginx:
        bind = [f"unix:{run_dir.control_socket}", f"unix:{run_dir.inference_socket}"]
    else:
        bind = [f"0.0.0.0:{settings.port}"]
    return {
        "bind": bind,
        "workers": settings.workers,
        "worker_class": WORKER_CLASS,
        "worker_connections": WORKER_CONNECTIONS,
        # gunicorn kills a worker whose heartbeat stops this long; the model's deadline comes first.
        "timeout": settings.gunicorn_timeout_s,
        "graceful_timeout": settings.graceful_timeout_s,
        "keepalive": 5,
        "backlog": 2048,
        "accesslog": None if behind_nginx else "-",  # nginx writes the access log when it is there
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "maskrcnn-serve",
        # The heartbeat file on tmpfs: a slow disk must not make a healthy worker look hung.
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        "pre_fork": assign_device_slot,
        "when_ready": partial(mark_ready, run_dir.gunicorn_ready),
        "control_socket_disable": True,  # gunicorn's admin socket would land in $HOME; we never use it
    }


def mark_ready(path: Path, arbiter: Any) -> None:
    path.touch()


def assign_device_slot(arbiter: Any, worker: Any) -> None:
    """Give a new worker the lowest slot no live worker holds; a GPU worker uses cuda:<slot>.

    Runs in the gunicorn master before the fork, so a worker restarted after a crash takes over
    the device its predecessor left free.
    """
    taken = {getattr(w, "device_slot", None) for w in arbiter.WORKERS.values()}
    slot = 0
    while slot in taken:
        slot += 1
    worker.device_slot = slot
