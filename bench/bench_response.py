"""Our COCO-RLE JSON answer against the seed article's dense mask lists, on the same detections.

The seed answered with every detection's full-image mask probabilities as nested JSON lists
(``prediction["masks"].tolist()``). We answer with COCO compressed RLE of the thresholded masks.
Both encoders start from the same :class:`~maskrcnn.serve.predictor.Detections` (one model run per
case) and both pay for pasting the masks at full resolution. Prints bytes and encode time for
each, and the ratios (seed / ours), from one run.

    .venv/bin/python bench/bench_response.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
from bench_serving import make_model

CASES = [((256, 256), 5), ((480, 640), 10), ((480, 640), 30), ((960, 1280), 30)]


def seed_encode(detections, class_names) -> bytes:
    """The seed's answer shape: boxes, labels, scores and dense per-pixel mask probabilities."""
    masks = [detections.mask_probability(i).tolist() for i in range(len(detections))]
    return json.dumps(
        {
            "boxes": detections.boxes.tolist(),
            "labels": detections.labels.tolist(),
            "scores": detections.scores.tolist(),
            "masks": masks,
        }
    ).encode()


def timed(fn, repeat: int) -> tuple[float, bytes]:
    times, out = [], b""
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    print(hostinfo.describe(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from maskrcnn.serve.codec import encode_json
    from maskrcnn.serve.predictor import Predictor
    from maskrcnn.train.synthetic import make_sample

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        predictor = Predictor.load(make_model(Path(tmp) / "model"), "cpu", threads=1)
    names = predictor.class_names
    print(
        f"{'image':>10} {'dets':>4} | {'seed bytes':>12} {'ours bytes':>11} {'size x':>8} | "
        f"{'seed ms':>8} {'ours ms':>8} {'time x':>7}"
    )
    for (height, width), count in CASES:
        sample, _ = make_sample(np.random.default_rng(0), max(height, width))
        image = np.ascontiguousarray(np.asarray(sample)[:height, :width])
        detections = predictor(image, score_threshold=0.0, max_detections=count)
        seed_time, seed_bytes = timed(lambda d=detections: seed_encode(d, names), args.repeat)
        our_time, our_bytes = timed(lambda d=detections: encode_json([d], names, "rle"), args.repeat)
        print(
            f"{width:>4}x{height:<5} {len(detections):>4} | {len(seed_bytes):>12,} {len(our_bytes):>11,} "
            f"{len(seed_bytes) / len(our_bytes):>7.0f}x | {1000 * seed_time:>8.1f} {1000 * our_time:>8.1f} "
            f"{seed_time / our_time:>6.0f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
