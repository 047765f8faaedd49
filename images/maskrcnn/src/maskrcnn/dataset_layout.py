"""Where a dataset's files lie in a channel: the rules the training job reads by and the harness shards by.

A channel folder holds one of two layouts:

* ``coco``: one annotation ``*.json`` (``annotations.json`` or ``instances.json`` preferred where there are
  several; several and none of those is refused, naming them), each entry's ``file_name`` beside it or under
  ``images/``;
* ``pennfudan``: ``PNGImages/`` and ``PedMasks/``, the image ``NAME.<suffix>`` (any of :data:`IMAGE_SUFFIXES`,
  any case) with its mask ``PedMasks/NAME_mask.png``.

:mod:`maskrcnn.train.data` loads a channel by these rules and ``local.layout.shard_tree`` deals a dataset's
files to hosts by them (:data:`SHARDED`), so a folder the job would refuse is refused by the harness too. No
torch, no PIL: the harness imports this without the training stack.
"""

from __future__ import annotations

from pathlib import Path

from maskrcnn.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
ANNOTATION_NAMES = ("annotations.json", "instances.json")  # preferred, in this order, among several *.json
IMAGE_FOLDER = "images"  # a COCO image's other home beside the channel's top level
PENNFUDAN_IMAGES, PENNFUDAN_MASKS = "PNGImages", "PedMasks"
# A channel's S3DistributionType (inputdataconfig.json): every host gets all of it, or its own part.
REPLICATED, SHARDED = "FullyReplicated", "ShardedByS3Key"
DISTRIBUTIONS = (REPLICATED, SHARDED)


def detect_format(channel: Path) -> str:
    """``pennfudan`` where both of its folders exist, ``coco`` where a ``*.json`` does; else DataError."""
    if (channel / PENNFUDAN_IMAGES).is_dir() and (channel / PENNFUDAN_MASKS).is_dir():
        return "pennfudan"
    if any(channel.glob("*.json")):
        return "coco"
    raise DataError(
        f"cannot tell the dataset format of {channel}: expected a COCO annotation *.json "
        f"or PennFudan's {PENNFUDAN_IMAGES}/ and {PENNFUDAN_MASKS}/ folders"
    )


def annotation_file(channel: Path) -> Path:
    """The COCO annotation file of ``channel``: its only ``*.json``, or the preferred name among several."""
    candidates = sorted(channel.glob("*.json"))
    if not candidates:
        raise DataError(f"no COCO annotation *.json in {channel}")
    preferred = [channel / name for name in ANNOTATION_NAMES if (channel / name) in candidates]
    if len(candidates) > 1 and not preferred:
        raise DataError(
            f"several annotation files in {channel} ({', '.join(p.name for p in candidates)}); "
            f"name the one to use {ANNOTATION_NAMES[0]}"
        )
    return (preferred or candidates)[0]


def find_image(channel: Path, file_name: str) -> Path | None:
    """A COCO entry's image file: ``channel/file_name`` or ``channel/images/file_name``; None if neither."""
    for candidate in (channel / file_name, channel / IMAGE_FOLDER / file_name):
        if file_name and candidate.is_file():
            return candidate
    return None


def pennfudan_images(channel: Path) -> list[Path]:
    """The images of a PennFudan channel, sorted by name."""
    folder = channel / PENNFUDAN_IMAGES
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def pennfudan_mask(channel: Path, image: Path) -> Path:
    """Where the mask of a PennFudan image lies (it may be missing: the loader says so)."""
    return channel / PENNFUDAN_MASKS / f"{image.stem}_mask.png"
