"""`train` and `serve` on a host whose GPU CUDA cannot use: refused at once, never run on the CPU.

``MASKRCNN_NVIDIA_PROC`` points the probe at a fake ``/proc/driver/nvidia`` (a driver 535 host, as
SageMaker's p5/g6 run); torch here cannot start CUDA, exactly as the cu130 wheel cannot on driver 535.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from maskrcnn.serve.supervisor import EXIT_REFUSED

REPO = Path(__file__).resolve().parents[2]
PROC_VERSION = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: nothing to refuse"),
]


def driver_535(tmp_path: Path) -> Path:
    proc = tmp_path / "proc-nvidia"
    proc.mkdir()
    (proc / "version").write_text(PROC_VERSION)
    return proc


def env_for(base: Path, proc: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update(
        {
            "SAGEMAKER_BASE_DIR": str(base),
            "MASKRCNN_NVIDIA_PROC": str(proc),
            "PYTHONUNBUFFERED": "1",
            "NVIDIA_VISIBLE_DEVICES": "all",
        }
    )
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
