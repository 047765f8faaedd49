"""The GPU paths of issue 14, as a lent GPU machine would check them (``scripts/gpu-check.sh``).

Skipped (with the reason) where torch sees no CUDA device, or fewer than two for the multi-GPU tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("need_cuda")]


def two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 or more GPUs, {torch.cuda.device_count()} visible")


def run_train(base: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update({"SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1", **extra})
    return subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/train")], env=env, capture_output=True, text=True, timeout=900
    )


def test_pretrained_fine_tune_then_serve_on_cuda(make_job, synthetic_dir: Path, tmp_path: Path) -> None:
    from maskrcnn.serve.predictor import Predictor
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), weights / "coco.pth")
    base = make_job(
        {"arch": "resnet50_fpn_v2", "max_steps": "4", "min_size": "256", "max_size": "256"},
        channels={"training": synthetic_dir, "pretrained": weights},
    )
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mixed precision: torch.bfloat16" in result.stdout or torch.cuda.get_device_capability() < (8, 0)
    spec = json.loads((base / "model" / "model.json").read_text())
    assert spec["backbone_norm"] == "frozen_batch_norm"
    predictor = Predictor.load(base / "model", "cuda:0")
    detections = predictor(
        np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8), score_threshold=0.0
    )
    assert len(detections.scores) == len(detections.boxes)


def test_amp_is_on_inside_the_forward(synthetic_dir: Path) -> None:
    """The dtype a convolution actually computes in, seen by a hook, during a training step."""
    from maskrcnn.model.architectures import build_model
    from maskrcnn.train.data import InstanceDataset, collate, load_index, train_transforms
    from maskrcnn.train.engine import LoopState, Optimization, autocast_dtype, grad_scaler, train_one_epoch

    device = torch.device("cuda", 0)
    index = load_index(synthetic_dir)
    model = build_model("lite", index.num_classes, 128, 128).to(device)
    seen: list[torch.dtype] = []
    # A convolution's own output: autocast runs convolutions in the low dtype, while lite's FPN ends in
    # GroupNorm, which CUDA autocast runs in float32 (its output would read float32 with AMP on).
    model.backbone.body.conv1.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    dtype = autocast_dtype(device)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert dtype == expected
    scaler = grad_scaler(dtype)
    assert (scaler is None) == (dtype == torch.bfloat16)
    loader = torch.utils.data.DataLoader(
        InstanceDataset(index, train_transforms(0.5, False)), batch_size=2, collate_fn=collate
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    train_one_epoch(model, Optimization(optimizer, scheduler, scaler, dtype), loader, device, LoopState(), max_steps=1)
    assert seen and seen[0] == expected


def _worker_device(slot: int, settings_json: str, out: Any) -> None:
    from maskrcnn.serve.settings import ServeSettings
    from maskrcnn.serve.wsgi import build_app

    build_app(ServeSettings.from_json(settings_json), slot)
    out.put((slot, torch.cuda.current_device(), torch.cuda.memory_allocated(slot)))


def test_serving_workers_each_on_their_own_device(tmp_path: Path) -> None:
    two_gpus()
    import torch.multiprocessing as mp
    from maskrcnn.model.architectures import ModelSpec, build_model, save_model
    from maskrcnn.serve.settings import ServeSettings

    save_model(tmp_path / "model", build_model("lite", 4, 128, 256), ModelSpec("lite", ("a", "b", "c")))
    settings = ServeSettings.from_env(
        {"SAGEMAKER_BASE_DIR": str(tmp_path)}, cpu_count=os.cpu_count() or 1, gpu_count=torch.cuda.device_count()
    )
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_worker_device, args=(1, settings.to_json(), queue))]
    for process in processes:
        process.start()
    slot, current, on_own = queue.get(timeout=300)
    for process in processes:
        process.join(60)
    assert (slot, current) == (1, 1)  # the worker's current device is its own, not GPU 0
    assert on_own > 0  # and its model lives there


def test_ddp_over_nccl_on_every_gpu(make_job) -> None:
    two_gpus()
    gpus = torch.cuda.device_count()
    base = make_job({"max_steps": "4", "num_workers": "2"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"joining nccl process group: rank 0 of {gpus}" in result.stdout
    assert json.loads((base / "model" / "model.json").read_text())["training"]["steps"] == 4
