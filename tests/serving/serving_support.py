"""Helpers shared by the serving tests and their fixtures: the tiny model, real `serve` processes."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import REPO, free_port

SERVE = REPO / "images" / "maskrcnn" / "serve"

CLASS_NAMES = ("circle", "rectangle", "triangle")
# Random weights score every box about 1/num_classes: threshold 0 makes them return detections.
DETECT = "score_threshold=0.0,max_detections=5"


def build_tiny_model(model_dir: Path) -> Path:
    import torch
    from maskrcnn.model.architectures import ModelSpec, build_model, save_model

    torch.manual_seed(0)
    model = build_model("lite", len(CLASS_NAMES) + 1, 128, 256)
    save_model(model_dir, model, ModelSpec("lite", CLASS_NAMES, min_size=128, max_size=256))
    return model_dir


def encode(array: np.ndarray, fmt: str = "JPEG", **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def require_or_skip(layer: str, reason: str) -> None:
    """Skip for a missing prerequisite, unless MASKRCNN_REQUIRE_LAYERS demands the layer (as CI does)."""
    required = {x.strip() for x in os.environ.get("MASKRCNN_REQUIRE_LAYERS", "").split(",") if x.strip()}
    if layer in required:
        pytest.fail(f"layer {layer!r} is required here (MASKRCNN_REQUIRE_LAYERS) but {reason}")
    pytest.skip(reason)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def ping(self, timeout: float = 2.0) -> int:
        return self.request("GET", "/ping", timeout=timeout)[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def gunicorn_master(self) -> int:
        return children(self.process.pid, "maskrcnn.serve.wsgi")[0]

    def worker_pids(self) -> list[int]:
        return children(self.gunicorn_master())

    def run_dir(self) -> Path:
        """The supervisor's private directory (settings, sockets, nginx files), from its log."""
        match = re.search(r"-m maskrcnn\.serve\.wsgi (\S+)", self.log())
        assert match, "serve has not started gunicorn"
        return Path(match.group(1))


def children(pid: int, cmd_contains: str = "") -> list[int]:
    """Direct children of ``pid`` (from /proc), optionally only those whose command line contains a string."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, ppid_text = stat.rsplit(")", 1)[1].split()[:2]
            if (
                state != "Z"
                and int(ppid_text) == pid
                and cmd_contains in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            ):
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def group_processes(pgid: int) -> list[int]:
    """Live processes of a process group: `serve` is started in a session of its own, so this is it and
    everything it started (nginx, gunicorn and their workers), even those that outlived it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if state != "Z" and int(pgrp) == pgid:
                found.append(int(entry.name))
    return sorted(found)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def serve_env(base: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update(
        {
            "SAGEMAKER_BASE_DIR": str(base),
            "SAGEMAKER_BIND_TO_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
            "MASKRCNN_TORCH_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def start_serve(base: Path, log_path: Path, **extra: str) -> Server:
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(SERVE)],
            env=serve_env(base, port, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(process, port, log_path)


def wait_until_ready(server: Server, timeout: float = 90.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process.poll() is not None:
            raise AssertionError(f"serve exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            if server.ping() == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/ping not 200 within {timeout} s:\n{server.log()[-3000:]}")


def stop_serve(server: Server, timeout: float = 35.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    # Anything the session left behind (a child that outlived serve) goes with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    return server.process.returncode
