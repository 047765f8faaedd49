"""The built-in synthetic dataset: coloured shapes on textured backgrounds, in COCO format.

Used by the tests, the benchmarks and ``make demo``, so nothing ever downloads data. Three classes
(circle, rectangle, triangle) of varied size, colour (always distinct from the background behind it)
and rotation; shapes overlap and the later one
occludes the earlier (the visible part is the instance mask). Same seed, same bytes.

    python -m maskrcnn.train.synthetic OUT_DIR --images 200 --seed 0 --size 256

writes ``OUT_DIR/images/*.png`` and ``OUT_DIR/annotations.json`` (masks as compressed RLE).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

CLASSES = ("circle", "rectangle", "triangle")
MIN_VISIBLE_FRACTION = 0.35  # an instance hidden more than this by later ones is dropped
MIN_VISIBLE_PIXELS = 40
MIN_CONTRAST = 80.0  # RGB distance between a shape's colour and the mean of the background it covers


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A gradient, stripes or blotches, plus noise: enough texture that colour alone won't do."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 215, size=3)
    kind = rng.integers(3)
    if kind == 0:
        angle = rng.uniform(0, math.pi)
        ramp = np.cos(angle) * xs + np.sin(angle) * ys
        field = ramp[..., None] * rng.uniform(-80, 80, size=3)
    elif kind == 1:
        freq = rng.uniform(4, 14)
        stripes = np.sin(2 * math.pi * freq * (xs + rng.uniform(0, 1) * ys))
        field = stripes[..., None] * rng.uniform(10, 40, size=3)
    else:
        coarse = rng.normal(0, 1, size=(8, 8, 3)).astype(np.float32)
        field = (
            np.asarray(
                Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255).astype(np.uint8)).resize(
                    (size, size), Image.Resampling.BICUBIC
                ),
                dtype=np.float32,
            )
            * 0.3
            - 38
        )
    noise = rng.normal(0, 8, size=(size, size, 3))
    pixels = np.clip(base + field + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _shape_mask(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """Draw one shape's full (unoccluded) mask."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    radius = rng.uniform(0.09, 0.22) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    name = CLASSES[label - 1]
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        corners = 4 if name == "rectangle" else 3
        aspect = rng.uniform(0.6, 1.0) if name == "rectangle" else 1.0
        theta = rng.uniform(0, 2 * math.pi)
        if corners == 4:
            half_w, half_h = radius, radius * aspect
            local = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        else:
            local = [(radius * math.cos(a), radius * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        points = [
            (cx + x * math.cos(theta) - y * math.sin(theta), cy + x * math.sin(theta) + y * math.cos(theta))
            for x, y in local
        ]
        draw.polygon(points, fill=255)
    return np.asarray(canvas) > 127


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A random colour that stands out from what lies behind the shape (an invisible shape teaches nothing)."""
    colour = rng.integers(0, 256, size=3)
    for _ in range(20):
        if np.linalg.norm(colour - behind) >= MIN_CONTRAST:
            break
        colour = rng.integers(0, 256, size=3)
    return colour


def make_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """One image and its visible instances as (label, boolean mask) pairs."""
    image = _background(rng, size)
    pixels = np.asarray(image).copy()
    shapes: list[tuple[int, np.ndarray, np.ndarray]] = []
    for _ in range(int(rng.integers(1, 6))):
        label = int(rng.integers(1, len(CLASSES) + 1))
        full = _shape_mask(rng, size, label)
        shapes.append((label, full, _contrasting_colour(rng, pixels[full].mean(axis=0))))
    for _, full, colour in shapes:
        shade = rng.normal(0, 10, size=(size, size, 1))
        pixels[full] = np.clip(colour + shade[full], 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=0.6))
    instances = []
    occluded = np.zeros((size, size), dtype=bool)
    for label, full, _ in reversed(shapes):
        visible = full & ~occluded
        occluded |= full
        area = int(visible.sum())
        if area >= MIN_VISIBLE_PIXELS and area >= MIN_VISIBLE_FRACTION * full.sum():
            instances.append((label, visible))
    instances.reverse()
    return image, instances


def write_coco_dataset(out_dir: str | Path, num_images: int = 200, seed: int = 0, size: int = 256) -> Path:
    """Write ``num_images`` samples as PNGs plus ``annotations.json``; returns the JSON's path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        image, instances = make_sample(rng, size)
        file_name = f"{seed:04d}_{index:06d}.png"
        image.save(out / "images" / file_name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for label, visible in instances:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [x, y, w, h],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"maskrcnn synthetic shapes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    path = write_coco_dataset(args.out, args.images, args.seed, args.size)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
