"""CUDA paths: AMP training, one process per GPU over NCCL, serving on the GPU.

Skipped (with the reason) where torch sees no CUDA device. On a GPU machine:
``.venv/bin/python -m pytest -m gpu -rs``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("need_cuda")]


def run_train(base: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/train")], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.parametrize("arch", ["lite", "resnet50_fpn_v2"])
def test_amp_training_on_every_gpu_writes_the_model(make_job, arch: str) -> None:
    base = make_job(
        {"arch": arch, "max_steps": "6", "amp": "true", "num_workers": "2", "min_size": "256", "max_size": "256"}
    )
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gpus = torch.cuda.device_count()
    if gpus > 1:
        assert f"nccl process group: rank 0 of {gpus}" in result.stdout
    spec = json.loads((base / "model" / "model.json").read_text())
    assert spec["arch"] == arch and spec["training"]["steps"] == 6


def test_model_trained_on_gpu_predicts_on_gpu(make_job) -> None:
    from maskrcnn.model.architectures import load_model

    base = make_job({"max_steps": "2"})
    assert run_train(base).returncode == 0
    model, _ = load_model(base / "model", "cuda")
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 128, 128, device="cuda")])
    assert out["boxes"].device.type == "cuda"
