"""`train` and `serve` on faked GPU hosts: the CUDA route each takes, and the refusal where none reaches.

``MASKRCNN_NVIDIA_PROC`` points the probe at a fake ``/proc/driver/nvidia`` (a driver 535 host, as SageMaker's
p5/g6 run, or 470, the g4dn/g5/p4d endpoints' default) and ``MASKRCNN_CUDA_COMPAT_DIR`` at a fake compat
folder (absent here by default, as in an image built on a base without cuda-compat). What can honestly be
asserted without a GPU: the route chosen and logged, the compat library loaded and the path handed on; CUDA
itself still cannot start on this machine, so a forward-compat host ends in the refusal that names the route.
"""

from __future__ import annotations

import _ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from maskrcnn.serve.supervisor import EXIT_REFUSED
from support import REPO

PROC_VERSION = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: nothing to refuse"),
]


def driver_535(tmp_path: Path, version: str = PROC_VERSION) -> Path:
    proc = tmp_path / "proc-nvidia"
    proc.mkdir()
    (proc / "version").write_text(version)
    return proc


def compat_folder(tmp_path: Path) -> Path:
    """A compat folder as cuda-compat-13-0 lays it out, its libcuda a real shared object that loads (a copy of
    CPython's _ctypes module: loading it runs nothing), so the preload itself is exercised."""
    compat = tmp_path / "compat"
    compat.mkdir()
    shutil.copy(_ctypes.__file__, compat / "libcuda.so.580.95.05")
    (compat / "libcuda.so.1").symlink_to("libcuda.so.580.95.05")
    return compat


def env_for(base: Path, proc: Path, compat: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update(
        {
            "SAGEMAKER_BASE_DIR": str(base),
            "MASKRCNN_NVIDIA_PROC": str(proc),
            "PYTHONUNBUFFERED": "1",
            "NVIDIA_VISIBLE_DEVICES": "all",
        }
    )
    if compat is not None:
        env["MASKRCNN_CUDA_COMPAT_DIR"] = str(compat)
    return env


def test_train_refuses_a_gpu_it_cannot_use(make_job, tmp_path: Path) -> None:
    base = make_job({"max_steps": "2"})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/train")],
        env=env_for(base, driver_535(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 30  # before any data is read or a step runs
    reason = (base / "output" / "failure").read_text().splitlines()[0]
    assert "driver 535.104.05" in reason and f"CUDA {torch.version.cuda}" in reason
    assert "not falling back to the CPU" in reason
    assert not (base / "model" / "model.safetensors").exists()
    assert "plan:" not in result.stdout


def test_serve_refuses_a_gpu_it_cannot_use(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/serve")],
        env=env_for(tmp_path / "ml", driver_535(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_REFUSED, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "driver 535.104.05" in output and f"CUDA {torch.version.cuda}" in output
    assert "starting gunicorn" not in output


def test_train_takes_the_forward_compat_route_on_driver_535(make_job, tmp_path: Path) -> None:
    base = make_job({"max_steps": "2"})
    compat = compat_folder(tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/train")],
        env=env_for(base, driver_535(tmp_path), compat),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert f"route forward-compat (libcuda 580.95.05 from {compat} on R535)" in output, output
    assert "device: NVIDIA driver 535.104.05" in output and f"(CUDA {torch.version.cuda} runtime)" in output
    # No GPU here, so CUDA still does not start behind the compat library: refused, naming the route it took.
    assert result.returncode == 1
    reason = (base / "output" / "failure").read_text().splitlines()[0]
    assert "CUDA cannot start (route forward-compat: libcuda 580.95.05" in reason
    assert "not falling back to the CPU" in reason
    assert "plan:" not in result.stdout


def test_serve_takes_the_forward_compat_route_on_driver_535(tmp_path: Path) -> None:
    compat = compat_folder(tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/serve")],
        env=env_for(tmp_path / "ml", driver_535(tmp_path), compat),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert f"route forward-compat (libcuda 580.95.05 from {compat} on R535)" in output, output
    assert result.returncode == EXIT_REFUSED and "CUDA cannot start (route forward-compat" in output
    assert "starting gunicorn" not in output


def test_train_on_driver_470_is_refused_before_torch_naming_what_to_choose(make_job, tmp_path: Path) -> None:
    base = make_job({"max_steps": "2"})
    proc = driver_535(tmp_path, PROC_VERSION.replace("535.104.05", "470.256.02"))
    result = subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/train")],
        env=env_for(base, proc, compat_folder(tmp_path)),  # compat libraries present: R470 is still unreachable
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    reason = (base / "output" / "failure").read_text().splitlines()[0]
    assert "driver 470.256.02 (branch R470)" in reason and f"CUDA {torch.version.cuda}" in reason
    assert "InferenceAmiVersion al2023-ami-sagemaker-inference-gpu-4-1" in reason
    assert "TransformAmiVersion al2-ami-sagemaker-batch-gpu-535" in reason
    assert "route refused" in result.stdout and "route forward-compat" not in result.stdout


def test_serve_on_a_cpu_host_logs_the_cpu_route(tmp_path: Path) -> None:
    """No GPU: the line still says what the host is, and serve goes on (here to refuse the missing model)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/serve")],
        env=env_for(tmp_path / "ml", tmp_path / "no-proc"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert f"(CUDA {torch.version.cuda} runtime), no GPU, route cpu" in output, output
    assert result.returncode == EXIT_REFUSED and "model" in output
