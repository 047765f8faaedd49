"""The Predictor: a saved model loaded once, called per image.

    predictor = Predictor.load(Path("/opt/ml/model"), device="cpu", threads=2)
    detections = predictor(image)            # image: H x W x 3 uint8 RGB numpy array
    detections.boxes, detections.scores, detections.labels, detections.mask(0)

Used by the server (one Predictor per gunicorn worker, called from that worker's single inference
thread) and by the benchmarks in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from maskrcnn.model.architectures import ModelSpec, load_model
from maskrcnn.serve.allocator import keep_freed_memory

log = logging.getLogger(__name__)

PASTE_PIXEL_BUDGET = 32_000_000  # masks pasted at once: bounds a chunk to ~160 MB
WARMUP_SIZE = 64  # any size works: the model resizes it to min_size, which is what gets warmed


@dataclass(frozen=True)
class Detections:
    """What the model found in one image, in that image's pixel coordinates.

    Masks stay as the mask head's small per-box probability maps until asked for: pasting 100 of
    them at full resolution up front would cost 100 x H x W floats per request.
    """

    boxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2 in original pixels
    scores: np.ndarray  # (N,) float32, descending
    labels: np.ndarray  # (N,) int64, 1..num_classes-1 (0 is background)
    mask_probs: torch.Tensor  # (N, 1, M, M) float32 on the CPU, per-box probabilities
    image_size: tuple[int, int]  # (height, width) of the original image
    mask_threshold: float = 0.5

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def mask_probability(self, i: int) -> torch.Tensor:
        """Detection ``i``'s mask probabilities pasted into an (H, W) float tensor."""
        boxes = torch.from_numpy(self.boxes[i : i + 1])
        return paste_masks_in_image(self.mask_probs[i : i + 1], boxes, self.image_size)[0, 0]

    def mask(self, i: int) -> np.ndarray:
        """Detection ``i``'s binary mask, (H, W) bool, cut at the model's mask threshold."""
        return (self.mask_probability(i) > self.mask_threshold).numpy()

    def mask_chunks(self, pixel_budget: int = PASTE_PIXEL_BUDGET) -> Iterator[np.ndarray]:
        """Every binary mask, in order, as (H, W, n) Fortran-ordered uint8 chunks.

        That is the layout pycocotools encodes without copying. Each mask is resized and cut within its
        own box, exactly as :func:`paste_masks_in_image` does, and only that box is written into the
        zeroed chunk: no full-size float frame per mask. The budget bounds a chunk's memory.
        """
        height, width = self.image_size
        step = max(1, pixel_budget // max(1, height * width))
        padded, scale = expand_masks(self.mask_probs, padding=1)
        boxes = expand_boxes(torch.from_numpy(self.boxes), scale).to(torch.int64).tolist()
        for start in range(0, len(self), step):
            count = min(step, len(self) - start)
            chunk = np.zeros((height, width, count), dtype=np.uint8, order="F")
            for j in range(count):
                bx0, by0, bx1, by1 = boxes[start + j]
                size = (max(by1 - by0 + 1, 1), max(bx1 - bx0 + 1, 1))
                x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
                if x1 <= x0 or y1 <= y0:
                    continue
                probs = F.interpolate(padded[start + j][None], size=size, mode="bilinear", align_corners=False)
                crop = probs[0, 0, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > self.mask_threshold
                chunk[y0:y1, x0:x1, j] = crop.numpy()
            yield chunk

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0,), np.int64),
            torch.zeros((0, 1, 28, 28)),
            image_size,
        )


class Predictor:
    """A Mask R-CNN loaded once and called per image. What it adds to the raw torchvision model:

    * loading: ``model.json`` + ``model.safetensors`` via :func:`maskrcnn.model.architectures.load_model` (no
      pickle ever runs), eval mode, on one device, with a fixed number of torch threads so several
      workers share the cores instead of fighting over them, and on the CPU a malloc that keeps freed
      memory mapped (each call would otherwise page-fault its feature maps in afresh);
    * input: an H x W x 3 uint8 RGB array (what :mod:`maskrcnn.serve.codec` decodes) instead of a float
      CHW tensor; an image larger than the model's working size is shrunk (antialiased, in uint8)
      before it becomes floats, so memory follows the model's size and not the upload's;
    * per-call ``score_threshold`` and ``max_detections`` (defaults from model.json), applied
      inside the ROI heads so that masks are computed only for detections that may be returned
      (lite's heads rescore with the mask head and look at up to twice as many candidates);
    * output: :class:`Detections` with numpy boxes in the original image's coordinates and masks
      pasted lazily at full resolution, cut at model.json's ``mask_threshold``;
    * ``torch.inference_mode`` and a warm-up inference at load; ``ready`` is True only after it.

    Not thread-safe: call it from one thread (the server gives each worker one inference thread).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, device: torch.device | str = "cpu"):
        if not isinstance(model, MaskRCNN):
            raise TypeError(f"expected a torchvision MaskRCNN, got {type(model).__name__}")
        self.model: MaskRCNN = model
        self.spec = spec
        self.device = torch.device(device)
        self.ready = False
        self.warmup_seconds = 0.0
        # The model's own transform would resize to these; we pre-shrink to the same scale.
        transform: Any = model.transform
        self._min_size = float(transform.min_size[-1])
        self._max_size = float(transform.max_size)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        warm: bool = True,
    ) -> Predictor:
        """Load the saved model in ``model_dir``; raises ModelError on anything but a valid model.

        On the CPU it also keeps the memory each call frees for the next call (:mod:`maskrcnn.serve.allocator`).
        """
        if threads is not None:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cpu":
            keep_freed_memory()
        started = time.perf_counter()
        model, spec = load_model(model_dir, device)
        predictor = cls(model, spec, device)
        log.info(
            "model %s (%d classes) loaded on %s in %.2f s",
            spec.arch,
            len(spec.class_names),
            device,
            time.perf_counter() - started,
        )
        if warm:
            predictor.warm_up()
        return predictor

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def warm_up(self) -> None:
        """One inference, so that lazy initialisation is paid before the first request."""
        started = time.perf_counter()
        self(np.full((WARMUP_SIZE, WARMUP_SIZE, 3), 127, np.uint8), score_threshold=0.0, max_detections=1)
        self.warmup_seconds = time.perf_counter() - started
        self.ready = True
        log.info("warm-up inference took %.2f s", self.warmup_seconds)

    def working_scale(self, height: int, width: int) -> float:
        """The scale the model's transform would apply, capped at 1 (we never enlarge)."""
        short, long = min(height, width), max(height, width)
        return min(1.0, self._min_size / short, self._max_size / long)

    def __call__(
        self,
        image: np.ndarray,
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> Detections:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 array, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        threshold = self.spec.score_threshold if score_threshold is None else score_threshold
        limit = self.spec.max_detections if max_detections is None else max_detections

        scale = self.working_scale(height, width)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
        if not image.flags.writeable or not image.flags.c_contiguous:
            image = np.array(image)  # torch refuses to wrap read-only memory (PIL's arrays are)
        tensor = torch.from_numpy(image).to(self.device).permute(2, 0, 1).float().div_(255)

        heads: Any = self.model.roi_heads
        # Filtering inside the heads means the mask head runs only on what we return.
        heads.score_thresh = threshold
        heads.detections_per_img = limit
        with torch.inference_mode():
            images, _ = self.model.transform([tensor])
            features = self.model.backbone(images.tensors)
            proposals, _ = self.model.rpn(images, features)
            result, _ = heads(features, proposals, images.image_sizes)
        found = result[0]
        boxes = resize_boxes(found["boxes"], images.image_sizes[0], (height, width))
        return Detections(
            boxes=boxes.float().cpu().numpy(),
            scores=found["scores"].float().cpu().numpy(),
            labels=found["labels"].cpu().numpy().astype(np.int64),
            mask_probs=found["masks"].float().cpu(),
            image_size=(height, width),
            mask_threshold=self.spec.mask_threshold,
        )
