"""pycocotools against faster-coco-eval on the same predictions: time and agreement.

Trains nothing: it makes a synthetic ground truth and perturbed predictions (boxes jittered,
masks eroded or dilated, some dropped, some false positives), then scores them with both
evaluators for bbox and segm. Prints seconds per evaluation for each, the speed ratio and the
largest difference between their 12 COCO stats. The engine uses the one this recommends.

    .venv/bin/python bench/bench_coco_eval.py [--images 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
import numpy as np
from maskrcnn.train.synthetic import write_coco_dataset
from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils


def fake_predictions(gt: dict, rng: np.random.Generator) -> list[dict]:
    results = []
    for ann in gt["annotations"]:
        if rng.random() < 0.1:
            continue  # a miss
        mask = mask_utils.decode(ann["segmentation"])
        op = rng.integers(3)
        if op:
            grow = ImageFilter.MaxFilter(3) if op == 2 else ImageFilter.MinFilter(3)
            mask = (np.asarray(Image.fromarray(mask * 255).filter(grow)) > 127).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 2, 4)
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"] if rng.random() > 0.05 else 1,
                "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)],
                "score": float(rng.uniform(0.3, 1.0)),
                "segmentation": rle,
            }
        )
        if rng.random() < 0.2:  # a false positive elsewhere
            shifted = np.roll(mask, int(rng.integers(20, 60)), axis=1)
            frle = mask_utils.encode(np.asfortranarray(shifted))
            frle["counts"] = frle["counts"].decode()
            results.append(
                {
                    **results[-1],
                    "bbox": [float(v) for v in mask_utils.toBbox(frle)],
                    "segmentation": frle,
                    "score": float(rng.uniform(0.05, 0.6)),
                }
            )
    return results


def run(backend: str, gt: dict, results: list[dict]) -> tuple[float, dict[str, list[float]]]:
    if backend == "faster":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    import contextlib
    import io
    import logging

    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        for iou_type in ("bbox", "segm"):
            evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = [float(s) for s in evaluator.stats[:12]]
    return time.perf_counter() - started, stats


def main() -> None:
    print(hostinfo.describe(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp())
    gt = json.loads(write_coco_dataset(data, num_images=args.images, seed=0, size=256).read_text())
    results = fake_predictions(gt, np.random.default_rng(0))
    times: dict[str, list[float]] = {"pycocotools": [], "faster": []}
    stats = {}
    for _ in range(args.repeat):
        for backend in times:
            seconds, stats[backend] = run(backend, gt, results)
            times[backend].append(seconds)
    slow, fast = min(times["pycocotools"]), min(times["faster"])
    pairs = [(a, b) for t in ("bbox", "segm") for a, b in zip(stats["pycocotools"][t], stats["faster"][t], strict=True)]
    diff = max(abs(a - b) for a, b in pairs)
    print(f"{args.images} images, {len(gt['annotations'])} instances, {len(results)} detections (bbox + segm)")
    print(f"pycocotools     : {slow:.3f} s")
    print(f"faster-coco-eval: {fast:.3f} s")
    print(f"speed-up faster/pycocotools: {slow / fast:.2f}x; largest stat difference: {diff:.2e}")
    print(f"segm AP50 pycocotools={stats['pycocotools']['segm'][1]:.4f} faster={stats['faster']['segm'][1]:.4f}")


if __name__ == "__main__":
    main()
