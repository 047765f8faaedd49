"""The Predictor: a saved model loaded once, called per image.

    predictor = Predictor.load(Path("/opt/ml/model"), device="cpu", threads=2)
    detections = predictor(image)            # image: H x W x 3 uint8 RGB numpy array
    detections.boxes, detections.scores, detections.labels, detections.mask(0)

Used by the server (one Predictor per gunicorn worker, called from that worker's single inference
thread) and by the benchmarks in-process.

On a GPU the forward pass runs under autocast (:func:`autocast_dtype`) and the masks are pasted, cut at the
threshold and run-length encoded on the GPU (:func:`paste_binary_masks`, :func:`rle_encode`): only the
runs' boundaries cross to the host. On the CPU masks are pasted box by box into the array pycocotools
encodes (:meth:`Detections.mask_chunks`), as before.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from maskrcnn.model.architectures import ModelSpec, load_model
from maskrcnn.serve.allocator import keep_freed_memory

log = logging.getLogger(__name__)

PASTE_PIXEL_BUDGET = 32_000_000  # masks pasted at once: bounds a chunk to ~160 MB
# On a GPU: mask pixels pasted at once; three float32 frames of this many pixels (~190 MB) at the peak.
GPU_PASTE_PIXEL_BUDGET = 16_000_000
WARMUP_SIZE = 64  # any size works: the model resizes it to min_size, which is what gets warmed


@dataclass(frozen=True)
class Detections:
    """What the model found in one image, in that image's pixel coordinates.

    Masks stay as the mask head's small per-box probability maps until asked for: pasting 100 of
    them at full resolution up front would cost 100 x H x W floats per request. They stay on the
    predictor's device, so on a GPU they are pasted there.
    """

    boxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2 in original pixels
    scores: np.ndarray  # (N,) float32, descending
    labels: np.ndarray  # (N,) int64, 1..num_classes-1 (0 is background)
    mask_probs: torch.Tensor  # (N, 1, M, M) float32 on the predictor's device, per-box probabilities
    image_size: tuple[int, int]  # (height, width) of the original image
    mask_threshold: float = 0.5

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def mask_probability(self, i: int) -> torch.Tensor:
        """Detection ``i``'s mask probabilities pasted into an (H, W) float tensor on the CPU."""
        boxes = torch.from_numpy(self.boxes[i : i + 1]).to(self.mask_probs.device)
        return paste_masks_in_image(self.mask_probs[i : i + 1], boxes, self.image_size)[0, 0].cpu()

    def mask(self, i: int) -> np.ndarray:
        """Detection ``i``'s binary mask, (H, W) bool, cut at the model's mask threshold."""
        return (self.mask_probability(i) > self.mask_threshold).numpy()

    def mask_chunks(self, pixel_budget: int = PASTE_PIXEL_BUDGET) -> Iterator[np.ndarray]:
        """Every binary mask, in order, as (H, W, n) Fortran-ordered uint8 chunks.

        That is the layout pycocotools encodes without copying. Each mask is resized and cut within its
        own box, exactly as :func:`paste_masks_in_image` does, and only that box is written into the
        zeroed chunk: no full-size float frame per mask. The budget bounds a chunk's memory. On a GPU
        the chunks are pasted there (:func:`paste_binary_masks`) and copied back.
        """
        if self.mask_probs.device.type != "cpu":
            yield from self._device_chunks()
            return
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

    def rle_masks(self) -> list[dict[str, Any]]:
        """Every mask as pycocotools' compressed RLE (``{"size": [h, w], "counts": b"..."}``), in order.

        CPU: :meth:`mask_chunks` encoded by pycocotools. GPU: pasted and run-length encoded on the device
        (:func:`rle_encode`); the same bytes for the same binary masks.
        """
        if self.mask_probs.device.type == "cpu":
            return [encoded for chunk in self.mask_chunks() for encoded in mask_utils.encode(chunk)]
        return [encoded for chunk in self._device_masks() for encoded in rle_encode(chunk, self.image_size)]

    def _device_masks(self) -> Iterator[torch.Tensor]:
        boxes = torch.from_numpy(self.boxes).to(self.mask_probs.device)
        yield from paste_binary_masks(self.mask_probs, boxes, self.image_size, self.mask_threshold)

    def _device_chunks(self) -> Iterator[np.ndarray]:
        for masks in self._device_masks():
            # (n, W, H) C-ordered is (H, W, n) Fortran-ordered: pycocotools' layout, no copy.
            yield masks.to(torch.uint8).cpu().numpy().transpose(2, 1, 0)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0,), np.int64),
            torch.zeros((0, 1, 28, 28)),
            image_size,
        )


def _bilinear_axis(
    start: torch.Tensor, end: torch.Tensor, length: int, source: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each box (``start``..``end`` inclusive, in pixels) and each of the image's ``length`` pixels on
    one axis: the two source indices and weights that ``F.interpolate(mode="bilinear",
    align_corners=False)`` uses to resize ``source`` samples to the box's extent, and whether the pixel
    lies in the box. Same float32 arithmetic as ATen's kernels (``area_pixel_compute_source_index``)."""
    size = (end - start + 1).clamp(min=1)
    position = torch.arange(length, device=start.device)
    offset = position[None, :] - start[:, None]
    inside = (offset >= 0) & (position[None, :] <= end[:, None])
    scale = source / size.to(torch.float32)
    real = (scale[:, None] * (offset.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    index0 = real.to(torch.int64).clamp(max=source - 1)
    weight1 = (real - index0.to(torch.float32)).clamp(0, 1)
    index1 = index0 + (index0 < source - 1).to(torch.int64)
    return index0, index1, 1 - weight1, weight1, inside


def paste_binary_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float,
    pixel_budget: int = GPU_PASTE_PIXEL_BUDGET,
) -> Iterator[torch.Tensor]:
    """The masks pasted into the image and cut at ``threshold``, all at once on their device, as
    (n, W, H) bool chunks (each mask transposed: its flat order is pycocotools' column-major order).

    The same pixels as :meth:`Detections.mask_chunks` (each mask resized to its expanded box with
    bilinear interpolation, as :func:`paste_masks_in_image` does), computed as two gathers per axis
    instead of one interpolation per box: one launch for all masks, not hundreds. On the CPU the
    box-by-box path is faster (it touches only the boxes' pixels), so this is for GPUs.
    """
    height, width = image_size
    count = int(mask_probs.shape[0])
    if count == 0:
        return
    padded, scale = expand_masks(mask_probs, padding=1)
    expanded = expand_boxes(boxes.to(torch.float32), scale).to(torch.int64)
    step = max(1, pixel_budget // max(1, height * width))
    for begin in range(0, count, step):
        source = padded[begin : begin + step, 0]  # (n, S, S)
        box = expanded[begin : begin + step]
        n, size = int(source.shape[0]), int(source.shape[-1])
        cx0, cx1, cw0, cw1, cin = _bilinear_axis(box[:, 0], box[:, 2], width, size)
        ry0, ry1, rw0, rw1, rin = _bilinear_axis(box[:, 1], box[:, 3], height, size)
        # Along x first, then y: h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d), ATen's order of operations.
        by_x = cw0[:, None, :] * source.gather(2, cx0[:, None, :].expand(n, size, width))
        by_x = by_x + cw1[:, None, :] * source.gather(2, cx1[:, None, :].expand(n, size, width))
        pasted = rw0[:, :, None] * by_x.gather(1, ry0[:, :, None].expand(n, height, width))
        pasted = pasted + rw1[:, :, None] * by_x.gather(1, ry1[:, :, None].expand(n, height, width))
        binary = (pasted > threshold) & rin[:, :, None] & cin[:, None, :]
        yield binary.transpose(1, 2).contiguous()


def rle_encode(masks: torch.Tensor, image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """(n, W, H) binary masks (column-major flat order) -> pycocotools' compressed RLE dicts.

    The runs' boundaries are found where the masks are (on a GPU: one comparison and one ``nonzero``);
    only those indices cross to the host, where pycocotools compresses the counts: the same bytes as
    ``mask_utils.encode`` of the same masks, without copying n x H x W bytes back and scanning them.
    """
    height, width = image_size
    count, total = int(masks.shape[0]), height * width
    flat = masks.reshape(count, total)
    changes = torch.nonzero(flat[:, 1:] != flat[:, :-1]).cpu().numpy()
    starts_with_one = flat[:, 0].cpu().numpy().astype(bool)
    bounds = np.searchsorted(changes[:, 0], np.arange(count + 1))
    uncompressed = []
    for i in range(count):
        edges = changes[bounds[i] : bounds[i + 1], 1] + 1
        runs = np.diff(np.concatenate(([0], edges, [total])))
        if starts_with_one[i]:
            runs = np.concatenate(([0], runs))
        uncompressed.append({"size": [height, width], "counts": runs.tolist()})
    return list(mask_utils.frPyObjects(uncompressed, height, width)) if uncompressed else []


def autocast_dtype(device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """The dtype the forward pass autocasts to, or None for float32 (no autocast; always on the CPU).

    ``auto`` on a GPU: bfloat16 where the GPU computes it natively (Ampere and newer: A10G, L4, L40S, A100,
    H100), else float16 (T4, V100: their tensor cores run float16 only, and emulated bfloat16 would be slower
    than float32). Inference has no gradients to underflow, torchvision's RoIAlign and NMS run in float32
    under autocast, and boxes are decoded against float32 anchors, so float16's narrower range is not
    a problem here; ``MASKRCNN_INFERENCE_DTYPE=float32`` turns autocast off should a model overflow.
    """
    if device.type != "cuda" or choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "float16":
        return torch.float16
    with torch.cuda.device(device):
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16


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
    * ``torch.inference_mode`` and a warm-up inference at load; ``ready`` is True only after it;
    * on a GPU: autocast (:func:`autocast_dtype`: bfloat16 where native, else float16) and masks pasted
      and encoded on the GPU (:meth:`Detections.rle_masks`).

    Not thread-safe: call it from one thread (the server gives each worker one inference thread).
    """

    def __init__(
        self, model: nn.Module, spec: ModelSpec, device: torch.device | str = "cpu", inference_dtype: str = "auto"
    ):
        if not isinstance(model, MaskRCNN):
            raise TypeError(f"expected a torchvision MaskRCNN, got {type(model).__name__}")
        self.model: MaskRCNN = model
        self.spec = spec
        self.device = torch.device(device)
        self.autocast = autocast_dtype(self.device, inference_dtype)
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
        inference_dtype: str = "auto",
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
        predictor = cls(model, spec, device, inference_dtype)
        log.info(
            "model %s (%d classes) loaded on %s in %.2f s, %s",
            spec.arch,
            len(spec.class_names),
            device,
            time.perf_counter() - started,
            f"autocast {predictor.autocast}" if predictor.autocast else "float32",
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
        autocast = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
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
            mask_probs=found["masks"].float(),  # stays on the device: pasted there when asked for
            image_size=(height, width),
            mask_threshold=self.spec.mask_threshold,
        )
