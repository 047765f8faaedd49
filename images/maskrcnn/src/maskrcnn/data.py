"""Datasets: COCO instance segmentation and the PennFudan layout, behind one index.

Both formats load into a :class:`DatasetIndex`, a COCO-shaped description held in memory (images,
annotations with masks as polygons or RLE, categories). Training reads samples from it through
:class:`InstanceDataset`; evaluation builds its ground truth from the same index with
:meth:`DatasetIndex.to_coco`, so both see the same masks.

Formats, detected by :func:`detect_format` (or forced by the ``dataset_format`` hyperparameter):

* ``coco``: one ``*.json`` annotation file in the channel (``annotations.json`` preferred), images
  beside it or under ``images/``; polygons, RLE and uncompressed RLE; ``iscrowd`` regions are kept
  for evaluation and left out of training targets.
* ``pennfudan``: ``PNGImages/*.png`` and ``PedMasks/*_mask.png``, one grey level per instance and 0
  for background (the seed article's data). One class, ``pedestrian``.

Every problem a person could fix (missing channel, unreadable image, annotation naming a missing
file, empty set, unknown category) raises :class:`maskrcnn.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
import logging
import random
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from maskrcnn.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class DatasetIndex:
    """A COCO-shaped dataset in memory; labels are contiguous 1..K in ``class_names`` order."""

    root: Path
    images: list[dict[str, Any]]  # {"id", "file_name", "width", "height", "path"}
    annotations: dict[int, list[dict[str, Any]]]  # image id -> anns with "label" added
    class_names: list[str]  # index 0 is label 1
    source: str = "coco"
    category_ids: list[int] = field(default_factory=list)  # COCO category id of each label

    @property
    def num_classes(self) -> int:
        """Including background, as torchvision's Mask R-CNN counts them."""
        return len(self.class_names) + 1

    def decoded_bytes(self) -> int:
        """Memory for every image decoded (3 bytes a pixel) with its instance masks (1 byte a pixel each)."""
        total = 0
        for im in self.images:
            masks = sum(1 for a in self.annotations.get(im["id"], []) if not a.get("iscrowd", 0))
            total += im["width"] * im["height"] * (3 + masks)
        return total

    def subset(self, image_ids: Sequence[int]) -> DatasetIndex:
        keep = set(image_ids)
        return DatasetIndex(
            self.root,
            [im for im in self.images if im["id"] in keep],
            {k: v for k, v in self.annotations.items() if k in keep},
            self.class_names,
            self.source,
            self.category_ids,
        )

    def to_coco(self) -> dict[str, Any]:
        """Ground truth for pycocotools / faster-coco-eval; category ids are our labels."""
        anns: list[dict[str, Any]] = []
        for image in self.images:
            for ann in self.annotations.get(image["id"], []):
                rle = _to_rle(ann["segmentation"], image["height"], image["width"])
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image["id"],
                        "category_id": ann["label"],
                        "segmentation": {"size": rle["size"], "counts": _counts_str(rle)},
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "iscrowd": int(ann.get("iscrowd", 0)),
                    }
                )
        return {
            "images": [{k: im[k] for k in ("id", "file_name", "width", "height")} for im in self.images],
            "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)],
        }


def detect_format(channel: Path) -> str:
    if (channel / "PNGImages").is_dir() and (channel / "PedMasks").is_dir():
        return "pennfudan"
    if list(channel.glob("*.json")):
        return "coco"
    raise DataError(
        f"cannot tell the dataset format of {channel}: expected a COCO annotation *.json "
        "or PennFudan's PNGImages/ and PedMasks/ folders"
    )


def load_index(channel: Path, fmt: str = "auto") -> DatasetIndex:
    """Read a channel directory into a validated :class:`DatasetIndex`."""
    if not channel.is_dir():
        raise DataError(f"dataset folder {channel} does not exist")
    fmt = detect_format(channel) if fmt == "auto" else fmt
    index = _load_pennfudan(channel) if fmt == "pennfudan" else _load_coco(channel)
    if not index.images:
        raise DataError(f"dataset {channel} has no images")
    if not any(index.annotations.get(im["id"]) for im in index.images):
        raise DataError(f"dataset {channel} has no annotated instances")
    return index


def _load_coco(channel: Path) -> DatasetIndex:
    candidates = sorted(channel.glob("*.json"))
    preferred = [p for p in candidates if p.name in ("annotations.json", "instances.json")]
    if not candidates:
        raise DataError(f"no COCO annotation *.json in {channel}")
    if len(candidates) > 1 and not preferred:
        raise DataError(
            f"several annotation files in {channel} ({', '.join(p.name for p in candidates)}); "
            "name the one to use annotations.json"
        )
    path = (preferred or candidates)[0]
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{path} lacks the COCO list {key!r}")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    if not categories:
        raise DataError(f"{path} defines no categories")
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    images = []
    for im in coco["images"]:
        file_path = _find_image(channel, im.get("file_name", ""))
        if file_path is None:
            raise DataError(
                f"{path.name}: image id {im.get('id')} names {im.get('file_name')!r}, "
                f"which is not in {channel} or {channel / 'images'}"
            )
        images.append({**im, "path": file_path})
    _check_headers(images)
    known_ids = {im["id"] for im in images}
    annotations: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        if ann.get("category_id") not in label_of:
            raise DataError(
                f"{path.name}: annotation {ann.get('id')} has category_id {ann.get('category_id')}, "
                f"not among the categories {sorted(label_of)}"
            )
        if ann.get("image_id") not in known_ids:
            raise DataError(f"{path.name}: annotation {ann.get('id')} names unknown image {ann.get('image_id')}")
        if "segmentation" not in ann:
            raise DataError(f"{path.name}: annotation {ann.get('id')} has no segmentation")
        annotations.setdefault(ann["image_id"], []).append({**ann, "label": label_of[ann["category_id"]]})
    return DatasetIndex(
        channel, images, annotations, [c["name"] for c in categories], "coco", [c["id"] for c in categories]
    )


def _check_headers(images: list[dict[str, Any]]) -> None:
    """Open every image's header (cheap) so a bad file fails the job now, not hours in."""
    for im in images:
        try:
            with Image.open(im["path"]) as handle:
                width, height = handle.size
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {im['path']}: {exc}") from None
        if (im.get("width"), im.get("height")) != (width, height):
            if im.get("width") is not None:
                raise DataError(
                    f"image {im['path'].name} is {width}x{height} but its annotation says "
                    f"{im.get('width')}x{im.get('height')}"
                )
            im["width"], im["height"] = width, height


def _find_image(channel: Path, file_name: str) -> Path | None:
    for candidate in (channel / file_name, channel / "images" / file_name):
        if file_name and candidate.is_file():
            return candidate
    return None


def _load_pennfudan(channel: Path) -> DatasetIndex:
    image_paths = sorted(p for p in (channel / "PNGImages").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images, annotations = [], {}
    for image_id, path in enumerate(image_paths, start=1):
        mask_path = channel / "PedMasks" / f"{path.stem}_mask.png"
        if not mask_path.is_file():
            raise DataError(f"PennFudan image {path.name} has no mask {mask_path.name} in PedMasks/")
        grey = np.asarray(_open_image(mask_path))
        if grey.ndim == 3:
            raise DataError(f"{mask_path} must be single-channel (one grey level per instance)")
        height, width = grey.shape
        anns = []
        for level in np.unique(grey):
            if level == 0:
                continue
            rle = mask_utils.encode(np.asfortranarray((grey == level).astype(np.uint8)))
            anns.append({"segmentation": rle, "label": 1, "iscrowd": 0})
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height, "path": path})
        annotations[image_id] = anns
    return DatasetIndex(channel, images, annotations, ["pedestrian"], "pennfudan", [1])


def split_index(index: DatasetIndex, fraction: float, seed: int) -> tuple[DatasetIndex, DatasetIndex]:
    """A seeded train/validation split by image; both parts keep at least one image."""
    ids = [im["id"] for im in index.images]
    if len(ids) < 2:
        raise DataError("need at least 2 images to hold out a validation split (or pass a validation channel)")
    random.Random(seed).shuffle(ids)
    n_val = min(max(1, round(len(ids) * fraction)), len(ids) - 1)
    return index.subset(ids[n_val:]), index.subset(ids[:n_val])


def _open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segmentation, list):  # polygons
        if not segmentation:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    rle = dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return rle


def _counts_str(rle: dict[str, Any]) -> str:
    counts = rle["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def decode_masks(anns: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    if not anns:
        return np.zeros((0, height, width), dtype=np.uint8)
    return np.stack([mask_utils.decode(_to_rle(a["segmentation"], height, width)) for a in anns])


def load_rgb(path: Path) -> Image.Image:
    """An image file as RGB, whatever its mode (palette, greyscale, 16-bit, RGBA)."""
    image = _open_image(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((array / max(float(array.max()), 1.0) * 255).astype(np.uint8))
    return image.convert("RGB")


class InstanceDataset(torch.utils.data.Dataset):
    """Samples as (image tensor float [0,1] CHW, target dict) the way torchvision's Mask R-CNN wants.

    Augmentation is seeded per (seed, epoch, sample) in a forked RNG, so results do not depend on
    worker count or on where a resumed run picks up, and the caller's RNG is left untouched.
    With ``cache=True`` each image and its masks are decoded once and kept (uint8) for later epochs;
    augmentation still runs on every read. Only worth it in the training process itself (``num_workers=0``):
    a loader worker's cache dies with the worker at the end of each epoch.
    """

    def __init__(self, index: DatasetIndex, transforms: Callable[..., Any] | None, seed: int = 0,
                 cache: bool = False):
        self.index = index
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = (
            {} if cache else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index.images)

    def _decode(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image (uint8 CHW), masks (uint8 NHW), boxes (XYXY) and labels of sample ``i``."""
        meta = self.index.images[i]
        image = load_rgb(meta["path"])
        width, height = image.size
        anns = [a for a in self.index.annotations.get(meta["id"], []) if not a.get("iscrowd", 0)]
        masks = decode_masks(anns, height, width)
        if masks.shape[1:] != (height, width):
            raise DataError(f"masks of {meta['file_name']} are {masks.shape[1:]}, image is {(height, width)}")
        mask_t = torch.from_numpy(masks).to(torch.uint8)
        boxes = torch.zeros((len(anns), 4), dtype=torch.float32)
        for k in range(len(anns)):
            ys, xs = torch.nonzero(mask_t[k], as_tuple=True)
            if len(xs):
                boxes[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        labels = torch.tensor([a["label"] for a in anns], dtype=torch.int64)
        return F.pil_to_tensor(image), mask_t, boxes, labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self._cache is None:
            pixels, masks, boxes, labels = self._decode(i)
        else:
            if i not in self._cache:
                self._cache[i] = self._decode(i)
            # copies: neither augmentation nor the model may write into what later epochs read
            pixels, masks, boxes, labels = (t.clone() for t in self._cache[i])
        height, width = pixels.shape[-2:]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "masks": tv_tensors.Mask(masks),
            "labels": labels,
            "image_id": self.index.images[i]["id"],
        }
        img = tv_tensors.Image(pixels)
        if self.transforms is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + i) % (2**63))
                img, target = self.transforms(img, target)
        return img, target


def train_transforms(hflip: float, photometric: bool) -> T.Compose:
    steps: list[Any] = []
    if photometric:
        steps.append(T.RandomPhotometricDistort(p=0.5))
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(p=hflip))
    steps += [T.ToDtype(torch.float32, scale=True), T.SanitizeBoundingBoxes(min_size=1)]
    return T.Compose(steps)


def eval_transforms() -> T.Compose:
    return T.Compose([T.ToDtype(torch.float32, scale=True)])


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn: a stop signal sent to the whole process group (Ctrl-C, ``kill -- -PGID``)
    must reach only the training process, which checkpoints and then shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
