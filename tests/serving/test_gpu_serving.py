"""GPU serving (issue 29): autocast in the forward pass, masks pasted and encoded on the GPU, the worker count.

Skipped (with the reason) where torch sees no CUDA device; ``scripts/gpu-check.sh`` runs them on a lent GPU.
The pasting and encoding arithmetic itself is checked on the CPU in test_codec.py (same functions, CPU tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from maskrcnn.model.architectures import ModelSpec, build_model, save_model
from maskrcnn.serve import codec
from maskrcnn.serve.predictor import Detections, Predictor
from maskrcnn.serve.settings import ServeSettings
from pycocotools import mask as mask_utils

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("need_cuda")]
CLASSES = ("circle", "rectangle", "triangle")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lite model with random weights at 256/512 px: with score_threshold=0 it returns boxes everywhere."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    save_model(out, build_model("lite", 4, 256, 512), ModelSpec("lite", CLASSES, 256, 512))
    return out


def image(height: int = 300, width: int = 400) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_autocast_dtype_inside_the_forward(model_dir: Path) -> None:
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    seen: list[torch.dtype] = []
    for choice, dtype in (("auto", expected), ("float32", torch.float32), ("float16", torch.float16)):
        predictor = Predictor.load(model_dir, "cuda:0", inference_dtype=choice)
        conv = next(m for m in predictor.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        seen.clear()
        handle = conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        detections = predictor(image(), score_threshold=0.0, max_detections=10)
        handle.remove()
        assert seen and seen[0] == dtype, choice
        assert detections.boxes.dtype == np.float32 and detections.mask_probs.dtype == torch.float32


def test_gpu_masks_equal_the_cpu_path(model_dir: Path) -> None:
    """The same detections pasted on the GPU (all at once) and on the CPU (box by box): the same masks, to
    float rounding at the threshold, and the GPU's RLE is pycocotools' encoding of the GPU's masks."""
    predictor = Predictor.load(model_dir, "cuda:0")
    found = predictor(image(), score_threshold=0.0, max_detections=50)
    assert len(found) > 0 and found.mask_probs.is_cuda
    on_cpu = Detections(found.boxes, found.scores, found.labels, found.mask_probs.cpu(), found.image_size)
    gpu_chunks = np.concatenate(list(found.mask_chunks()), axis=2)
    cpu_chunks = np.concatenate(list(on_cpu.mask_chunks()), axis=2)
    assert gpu_chunks.shape == cpu_chunks.shape and gpu_chunks.flags.f_contiguous
    differing = int((gpu_chunks != cpu_chunks).sum())
    assert differing <= max(10, cpu_chunks.size // 100_000), f"{differing} of {cpu_chunks.size} pixels differ"
    assert found.rle_masks() == mask_utils.encode(np.asfortranarray(gpu_chunks))
    body = json.loads(codec.encode_json([found], CLASSES, "rle"))
    assert len(body["predictions"][0]["instances"]) == len(found)
    assert found.mask(0).shape == found.image_size  # the PNG renderer's per-mask path


def test_empty_answer_on_the_gpu(model_dir: Path) -> None:
    predictor = Predictor.load(model_dir, "cuda:0")
    found = predictor(image(), score_threshold=1.0)
    assert len(found) == 0 and found.rle_masks() == []
    assert json.loads(codec.encode_json([found], CLASSES, "rle"))["predictions"][0]["instances"] == []


def test_workers_per_gpu_from_this_gpu() -> None:
    gpus = torch.cuda.device_count()
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))
    settings = ServeSettings.from_env({}, cpu_count=16 * gpus, gpu_count=gpus, gpu_memory_bytes=memory)
    assert settings.workers_per_gpu == (2 if memory >= 7 * 2**30 else 1)
