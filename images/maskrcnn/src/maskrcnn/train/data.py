"""Datasets: COCO instance segmentation and the PennFudan layout, behind one index.

Both formats load into a :class:`DatasetIndex`, a COCO-shaped description held in memory (images,
annotations with masks as polygons or RLE, categories). Training reads samples from it through
:class:`InstanceDataset`; evaluation builds its ground truth from the same index with
:meth:`DatasetIndex.to_coco`, so both see the same masks.

Formats, detected by :func:`maskrcnn.dataset_layout.detect_format` (or forced by the ``dataset_format``
hyperparameter); where each file lies is :mod:`maskrcnn.dataset_layout`'s to say:

* ``coco``: one ``*.json`` annotation file in the channel (``annotations.json`` preferred), images
  beside it or under ``images/``; polygons, RLE and uncompressed RLE; ``iscrowd`` regions are kept
  for evaluation and left out of training targets.
* ``pennfudan``: ``PNGImages/*.png`` and ``PedMasks/*_mask.png``, one grey level per instance and 0
  for background (the Penn-Fudan pedestrian database's layout). One class, ``pedestrian``.

Validation happens once, in :func:`load_index`, before any training step: every image header is read
(PIL's lazy open: size only, no pixels) and every annotation is checked, so a bad record fails the job
in seconds, not in a data-loader worker hours in (and again on every resume). Every problem a person must
fix raises :class:`maskrcnn.errors.DataError` naming the file and, for an annotation, its id and image
(``training/annotations.json: annotation 17 (image 'img_003.png'): polygon has 2 points, needs at least 3``):

* files: missing channel or file, unreadable image, an image's ``width``/``height`` not those of the image
  upright (its header's, turned by its EXIF orientation: a phone photo stored sideways is annotated as shown),
  no images, no annotated instances;
* images: an entry without ``id``, one ``id`` for two different entries, one file listed under two ids
  (which id owns its annotations is the author's call, so it is refused, not merged);
* categories: without integer ``id`` or ``name``, an id defined twice; an annotation whose ``category_id``
  is not defined, or whose ``image_id`` names no image, or whose ``iscrowd`` is not 0/1;
* polygons: not a list of coordinate lists, a non-finite or non-numeric coordinate, an odd number of
  coordinates, an empty list, or no part with at least 3 points (6 numbers);
* RLE: ``size`` not the image's ``[height, width]``, ``counts`` neither a list of non-negative integers
  (uncompressed) nor a valid COCO string (compressed), or runs that do not cover exactly height x width
  pixels (pycocotools would decode garbage or read past the mask);
* ``bbox`` (optional; training boxes come from the masks): not 4 finite numbers, a negative width or
  height, or no overlap with the image.

Where the intent is plain the record is repaired instead, and ONE warning line per dataset counts what was
done (``training/annotations.json: repaired on load: 2 duplicate image entries dropped; ...``):

* an image entry repeated verbatim is kept once;
* an annotation repeating an earlier one's image, category, crowd flag and mask (whatever its id) is
  dropped, since it would be trained twice and counted twice in mAP;
* a polygon part with fewer than 3 points is dropped from an annotation that has a good part;
* an annotation whose bbox has zero width or height is dropped (no object to learn);
* a bbox reaching past the image is clipped to it.

PennFudan masks are generated from the grey levels, so only the image header is checked against the mask.
A split (:func:`split_index`) is by file: no image is on both sides. Pixels are decoded by
:mod:`maskrcnn.imagefile`, as serving decodes a request (orientation applied, every mode converted the same way).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from maskrcnn import imagefile
from maskrcnn.dataset_layout import annotation_file, detect_format, find_image, pennfudan_images, pennfudan_mask
from maskrcnn.errors import DataError

log = logging.getLogger(__name__)


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

    def to_coco(self, image_ids: Mapping[Any, int] | None = None) -> dict[str, Any]:
        """Ground truth for pycocotools / faster-coco-eval; category ids are our labels. ``image_ids`` renumbers
        the images (a job-wide numbering of several hosts' shards, whose own ids are unique only per host)."""
        anns: list[dict[str, Any]] = []
        new_id = (lambda image_id: image_ids[image_id]) if image_ids is not None else (lambda image_id: image_id)
        for image in self.images:
            for ann in self.annotations.get(image["id"], []):
                rle = _to_rle(ann["segmentation"], image["height"], image["width"])
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": new_id(image["id"]),
                        "category_id": ann["label"],
                        "segmentation": {"size": rle["size"], "counts": _counts_str(rle)},
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "iscrowd": int(ann.get("iscrowd", 0)),
                    }
                )
        return {
            "images": [
                {"id": new_id(im["id"]), "file_name": im["file_name"], "width": im["width"], "height": im["height"]}
                for im in self.images
            ],
            "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)],
        }


def merge_coco(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One COCO ground truth from several with distinct image ids (each host's shard, renumbered by
    :meth:`DatasetIndex.to_coco`); annotation ids are renumbered, the categories are the first part's."""
    images = [image for part in parts for image in part["images"]]
    annotations = [{**ann, "id": n} for n, ann in enumerate((a for part in parts for a in part["annotations"]), 1)]
    return {"images": images, "annotations": annotations, "categories": parts[0]["categories"]}


ImageSizes = Mapping[str, tuple[int, int]]  # an image file's path -> (width, height), as its header says


def load_index(channel: Path, fmt: str = "auto", sizes: ImageSizes | None = None) -> DatasetIndex:
    """Read a channel directory into a validated :class:`DatasetIndex`.

    ``sizes``: every image's header as another process of this host already read it (:func:`image_sizes` of
    the index it loaded): no image header is opened again (under FastFile each is a read from S3)."""
    if not channel.is_dir():
        raise DataError(f"dataset folder {channel} does not exist")
    fmt = detect_format(channel) if fmt == "auto" else fmt
    index = _load_pennfudan(channel, sizes) if fmt == "pennfudan" else _load_coco(channel, sizes)
    if not index.images:
        raise DataError(f"dataset {channel} has no images")
    if not any(index.annotations.get(im["id"]) for im in index.images):
        raise DataError(f"dataset {channel} has no annotated instances")
    return index


def image_sizes(index: DatasetIndex) -> dict[str, tuple[int, int]]:
    """Each image's (width, height) by its path: what :func:`load_index` read from the headers."""
    return {str(im["path"]): (im["width"], im["height"]) for im in index.images}


def _load_coco(channel: Path, sizes: ImageSizes | None = None) -> DatasetIndex:
    path = annotation_file(channel)
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON: {exc}") from None
    where = f"{channel.name}/{path.name}"
    if not isinstance(coco, dict):
        raise DataError(f"{where} is not a COCO annotation file (a JSON object with images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{where} lacks the COCO list {key!r}")
    repairs: Counter[str] = Counter()
    categories = _coco_categories(coco["categories"], where)
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    images = _coco_images(coco["images"], channel, where, repairs)
    _check_headers(images, where, sizes)
    image_of = {im["id"]: im for im in images}
    annotations: dict[Any, list[dict[str, Any]]] = {}
    seen: set[tuple[Any, ...]] = set()
    for position, ann in enumerate(coco["annotations"]):
        fixes: Counter[str] = Counter()  # counted only if the annotation is kept: one reason per annotation
        checked = _checked_annotation(ann, position, image_of, label_of, where, fixes)
        if checked is None:
            repairs["annotations with a zero-area bbox dropped"] += 1
            continue
        instance = _annotation_key(checked)
        if instance in seen:  # trained twice and counted twice in mAP otherwise
            repairs["duplicate annotations (same image, category and mask as an earlier one) dropped"] += 1
            continue
        seen.add(instance)
        repairs.update(fixes)
        annotations.setdefault(checked["image_id"], []).append(checked)
    if repairs:
        # one line per dataset, however many annotations: the counts say how much, the rule is in the docstring
        log.warning("%s: repaired on load: %s", where, "; ".join(f"{n} {what}" for what, n in repairs.items()))
    return DatasetIndex(
        channel, images, annotations, [c["name"] for c in categories], "coco", [c["id"] for c in categories]
    )


def _is_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _coco_categories(entries: list[Any], where: str) -> list[dict[str, Any]]:
    if not entries:
        raise DataError(f"{where} defines no categories")
    seen: set[int] = set()
    for position, cat in enumerate(entries, start=1):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise DataError(f"{where}: category #{position} has no integer 'id'")
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            raise DataError(f"{where}: category {cat['id']} has no 'name'")
        if cat["id"] in seen:
            raise DataError(f"{where}: category id {cat['id']} is defined twice")
        seen.add(cat["id"])
    return sorted(entries, key=lambda c: c["id"])


def _coco_images(entries: list[Any], channel: Path, where: str, repairs: Counter[str]) -> list[dict[str, Any]]:
    """The image entries, each with its file found; an image is listed once, under one id."""
    by_id: dict[Any, dict[str, Any]] = {}
    id_of_file: dict[Path, Any] = {}
    images = []
    for position, im in enumerate(entries, start=1):
        if not isinstance(im, dict) or not _is_id(im.get("id")):
            raise DataError(f"{where}: image entry #{position} has no 'id'")
        image_id = im["id"]
        if image_id in by_id:
            if by_id[image_id] == im:  # the same entry pasted twice: one image, read once
                repairs["duplicate image entries dropped"] += 1
                continue
            raise DataError(
                f"{where}: image id {image_id!r} is listed twice with different entries "
                f"({by_id[image_id].get('file_name')!r} and {im.get('file_name')!r}); image ids must be unique"
            )
        file_name = im.get("file_name")
        file_path = find_image(channel, file_name) if isinstance(file_name, str) else None
        if file_path is None:
            raise DataError(
                f"{where}: image id {image_id!r} names {file_name!r}, which is not in {channel} or {channel / 'images'}"
            )
        # two ids for one file would train it twice an epoch and could put it on both sides of a split;
        # which id its annotations belong to is the dataset author's call, so refuse rather than guess
        real = file_path.resolve()
        if real in id_of_file:
            raise DataError(
                f"{where}: images {id_of_file[real]!r} and {image_id!r} are the same file {file_name!r}; "
                "list each image once and put all its annotations under that one id"
            )
        by_id[image_id] = im
        id_of_file[real] = image_id
        images.append({**im, "path": file_path})
    return images


def _header_size(path: Path, sizes: ImageSizes | None) -> tuple[int, int]:
    """(width, height) of an image once upright (EXIF orientation applied): from ``sizes`` when it has the file,
    else from its header (no pixels)."""
    if sizes is not None and str(path) in sizes:
        width, height = sizes[str(path)]
        return width, height
    try:
        with Image.open(path) as handle:
            return imagefile.upright_size(handle)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _check_headers(images: list[dict[str, Any]], where: str, sizes: ImageSizes | None = None) -> None:
    """Open every image's header (cheap: no pixels decoded) so a bad file fails the job now, not hours in."""
    for im in images:
        width, height = _header_size(im["path"], sizes)
        if im.get("width") is None and im.get("height") is None:
            im["width"], im["height"] = width, height
        elif (im.get("width"), im.get("height")) != (width, height):
            turned = (im.get("width"), im.get("height")) == (height, width)
            raise DataError(
                f"{where}: image {im['id']!r} ({im['path'].name}) is {width}x{height} but its entry says "
                f"{im.get('width')}x{im.get('height')}"
                + (" (sizes are of the image upright, as its EXIF orientation shows it)" if turned else "")
            )


def _checked_annotation(
    ann: Any,
    position: int,
    image_of: dict[Any, dict[str, Any]],
    label_of: dict[int, int],
    where: str,
    repairs: Counter[str],
) -> dict[str, Any] | None:
    """``ann`` with its label, repaired where the docstring's rules allow; None to drop it; else DataError."""
    if not isinstance(ann, dict):
        raise DataError(f"{where}: annotation #{position + 1} is not a JSON object")
    name = f"annotation {ann['id']!r}" if _is_id(ann.get("id")) else f"annotation #{position + 1} (no id)"
    image = image_of.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
    if image is None:
        raise DataError(f"{where}: {name} names unknown image id {ann.get('image_id')!r}")
    name = f"{where}: {name} (image {image['file_name']!r})"
    if ann.get("category_id") not in label_of or isinstance(ann.get("category_id"), bool):
        raise DataError(f"{name} has category_id {ann.get('category_id')}, not among the categories {sorted(label_of)}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise DataError(f"{name}: iscrowd is {ann['iscrowd']!r}, expected 0 or 1")
    height, width = image["height"], image["width"]
    segmentation = ann.get("segmentation")
    if segmentation is None:
        raise DataError(f"{name} has no segmentation")
    if isinstance(segmentation, list):
        polygons, short = _checked_polygons(segmentation, name)
        if short:
            repairs["polygon parts with fewer than 3 points dropped from otherwise good annotations"] += short
            segmentation = polygons
    elif isinstance(segmentation, dict):
        _check_rle(segmentation, height, width, name)
    else:
        raise DataError(f"{name}: segmentation must be polygons (a list) or RLE (an object)")
    checked = {**ann, "segmentation": segmentation, "label": label_of[ann["category_id"]]}
    if "bbox" in ann:
        box = _checked_box(ann["bbox"], height, width, name)
        if box is None:
            return None
        if box != ann["bbox"]:
            repairs["bboxes clipped to their image"] += 1
            checked["bbox"] = box
    return checked


def _checked_polygons(segmentation: list[Any], name: str) -> tuple[list[list[float]], int]:
    """The polygon parts with at least 3 points, and how many shorter parts were left out."""
    if not segmentation:
        raise DataError(f"{name}: segmentation is an empty list of polygons")
    good: list[list[float]] = []
    short: list[list[float]] = []
    for part in segmentation:
        if not isinstance(part, list):
            raise DataError(f"{name}: segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...]")
        try:
            finite = all(map(math.isfinite, part))
        except TypeError:
            raise DataError(f"{name}: polygon has a coordinate that is not a number") from None
        if not finite:
            raise DataError(f"{name}: polygon has a coordinate that is not a finite number")
        if len(part) % 2:
            raise DataError(f"{name}: polygon has {len(part)} coordinates, an odd count (x, y pairs expected)")
        # pycocotools reads a 4-number list as a box and fails on shorter ones: never let one through
        (good if len(part) >= 6 else short).append(part)
    if not good:
        points = " and ".join(str(len(p) // 2) for p in short)
        raise DataError(f"{name}: polygon has {points} point{'s' * (points != '1')}, needs at least 3")
    return good, len(short)


def _check_rle(rle: dict[str, Any], height: int, width: int, name: str) -> None:
    size, counts = rle.get("size"), rle.get("counts")
    if size is None or counts is None:
        raise DataError(f"{name}: RLE segmentation needs 'size' and 'counts'")
    if size != [height, width]:
        raise DataError(f"{name}: RLE size {size} is not the image's [height, width] [{height}, {width}]")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise DataError(f"{name}: uncompressed RLE counts must be non-negative integers")
        total = sum(counts)
    elif isinstance(counts, str):
        try:
            total = sum(_rle_string_counts(counts))
        except ValueError as exc:
            raise DataError(f"{name}: compressed RLE counts are malformed: {exc}") from None
    else:
        raise DataError(f"{name}: RLE counts must be a list (uncompressed) or a string (compressed)")
    # pycocotools decodes a short RLE into uninitialised memory and reads past a long one: check the sum
    if total != height * width:
        raise DataError(f"{name}: RLE counts cover {total} pixels, the {width}x{height} image has {height * width}")


def _rle_string_counts(text: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (``rleFrString`` in cocoapi's maskApi.c).

    pycocotools has no public call that parses without decoding the whole mask, hence these lines:
    each count is a little-endian run of 5-bit groups (ASCII 48 + value, bit 6 = more follows, sign-extended),
    and from the third count on each is stored as the difference to the count two before.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("the string ends inside a number")
            char = ord(text[position]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"character {text[position]!r} is not an RLE digit")
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise ValueError("a run length is negative")
        counts.append(value)
    return counts


def _checked_box(bbox: Any, height: int, width: int, name: str) -> list[float] | None:
    """The [x, y, w, h] box clipped to the image; None for a zero-area box (no object to learn)."""
    numbers = isinstance(bbox, list) and len(bbox) == 4
    try:
        numbers = numbers and all(map(math.isfinite, bbox))
    except TypeError:
        numbers = False
    if not numbers:
        raise DataError(f"{name}: bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise DataError(f"{name}: bbox {bbox} has a negative width or height")
    if w == 0 or h == 0:
        return None
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{name}: bbox {bbox} lies outside the {width}x{height} image")
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return bbox
    return [x0, y0, x1 - x0, y1 - y0]


def _annotation_key(ann: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two annotations the same instance: image, category, crowd flag and mask (not the id)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        mask: Any = tuple(tuple(part) for part in seg)
    else:
        counts = seg["counts"]
        mask = (tuple(seg["size"]), counts if isinstance(counts, str) else tuple(counts))
    return ann["image_id"], ann["category_id"], ann.get("iscrowd", 0), mask


def _load_pennfudan(channel: Path, sizes: ImageSizes | None = None) -> DatasetIndex:
    images, annotations = [], {}
    for image_id, path in enumerate(pennfudan_images(channel), start=1):
        mask_path = pennfudan_mask(channel, path)
        if not mask_path.is_file():
            raise DataError(f"PennFudan image {path.name} has no mask {mask_path.name} in PedMasks/")
        grey = np.asarray(_open_image(mask_path))
        if grey.ndim == 3:
            raise DataError(f"{mask_path} must be single-channel (one grey level per instance)")
        height, width = grey.shape
        image_size = _header_size(path, sizes)  # the header only: a mismatch fails now, not in the data loader
        if image_size != (width, height):
            raise DataError(
                f"PennFudan image {path.name} is {image_size[0]}x{image_size[1]} but its mask {mask_path.name} "
                f"is {width}x{height}"
            )
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
    """A seeded train/validation split by image file; both parts keep at least one image.

    Entries that share a file (an index not built by :func:`load_index`, which refuses them) stay on one side:
    an image in both parts would be scored on what it was trained on.
    """
    ids_of_file: dict[Path, list[Any]] = {}
    for im in index.images:
        ids_of_file.setdefault(Path(im["path"]).resolve(), []).append(im["id"])
    files = list(ids_of_file)
    if len(files) < 2:
        raise DataError("need at least 2 images to hold out a validation split (or pass a validation channel)")
    random.Random(seed).shuffle(files)
    n_val = min(max(1, round(len(files) * fraction)), len(files) - 1)
    ids = [image_id for file in files for image_id in ids_of_file[file]]
    n_val_ids = sum(len(ids_of_file[file]) for file in files[:n_val])
    return index.subset(ids[n_val_ids:]), index.subset(ids[:n_val_ids])


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


def load_rgb(path: Path) -> np.ndarray:
    """An image file as upright H x W x 3 uint8 RGB, decoded as serving decodes it (:mod:`maskrcnn.imagefile`)."""
    try:
        with Image.open(path) as image:
            return imagefile.decode(image)
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports unreadable, corrupt or truncated files through all of these.
        raise DataError(f"cannot read image {path}: {exc}") from None


class InstanceDataset(torch.utils.data.Dataset):
    """Samples as (image tensor float [0,1] CHW, target dict) the way torchvision's Mask R-CNN wants.

    Augmentation is seeded per (seed, epoch, sample) in a forked RNG, so results do not depend on
    worker count or on where a resumed run picks up, and the caller's RNG is left untouched.
    With ``cache=True`` each image and its masks are decoded once and kept (uint8) for later epochs;
    augmentation still runs on every read. Only worth it in the training process itself (``num_workers=0``):
    a loader worker's cache dies with the worker at the end of each epoch.
    """

    def __init__(self, index: DatasetIndex, transforms: Callable[..., Any] | None, seed: int = 0, cache: bool = False):
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
        height, width = image.shape[:2]
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
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), mask_t, boxes, labels

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


def aspect_ratio_groups(index: DatasetIndex, factor: int) -> list[int]:
    """Each image's aspect-ratio group: ``2 * factor`` bins of width/height between 1/2 and 2 (plus the two
    open ends), as torchvision's ``references/detection/group_by_aspect_ratio.py`` (``create_aspect_ratio_groups``,
    BSD-3) makes them; that module is not part of the torchvision package. ``factor`` 0: one group."""
    if factor <= 0:
        return [0] * len(index.images)
    bins = (2 ** np.linspace(-1, 1, 2 * factor + 1)).tolist()
    return [bisect.bisect_right(bins, im["width"] / im["height"]) for im in index.images]


class GroupedOrder(torch.utils.data.Sampler[int]):
    """``sampler``'s indices reordered so that each run of ``batch_size`` holds one aspect-ratio group.

    The batching of torchvision's ``GroupedBatchSampler`` (same reference module): indices are buffered
    per group in the sampler's order and a group's batch is emitted when it fills, so images padded into
    one batch have similar shapes and the padding wastes little GPU work. Unlike that sampler this yields
    single indices (the DataLoader batches them), so a resumed epoch skips ``steps * batch_size`` of them
    exactly as before; and the partial groups left at the end close the epoch in the sampler's order
    (their last batches may mix groups) instead of being topped up with repeated images: every image
    is seen once. With one group (square images, or the factor 0) the order is the sampler's own.
    """

    def __init__(self, sampler: Iterable[int], groups: Sequence[int], batch_size: int):
        self.sampler, self.groups, self.batch_size = sampler, groups, batch_size

    def __iter__(self) -> Iterator[int]:
        buffers: dict[int, list[tuple[int, int]]] = {}
        for position, index in enumerate(self.sampler):
            buffer = buffers.setdefault(self.groups[index], [])
            buffer.append((position, index))
            if len(buffer) == self.batch_size:
                yield from (i for _, i in buffer)
                buffer.clear()
        yield from (i for _, i in sorted(item for buffer in buffers.values() for item in buffer))

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]
