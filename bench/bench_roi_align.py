"""Training-time RoIAlign: torchvision's CPU kernel against maskrcnn.model.roi_align's separable form.

Forward + backward of the same features, regions and upstream gradient, in one process, at the
shapes the lite preset's heads see on 160-px images (batch 4, 96 channels): box pooling (7x7) and
mask pooling (14x14) on the stride-4, -8 and -16 maps. Prints both times, the speed-up and the
largest difference in output and gradient.

    .venv/bin/python bench/bench_roi_align.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
import torch
from maskrcnn.model.roi_align import separable_roi_align
from torchvision.ops import roi_align

# (feature side, regions, pooled size): lite at 160 px, 4 images, 64 sampled boxes and ~32 masks each
CASES = [(40, 256, 7), (20, 256, 7), (10, 256, 7), (40, 128, 14), (20, 128, 14), (10, 128, 14)]


def main() -> None:
    print(hostinfo.describe(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.threads} torch threads, forward + backward, median of {args.repeats}")
    print("map    regions pooled | torchvision | separable | speed-up | max |out diff| | max |grad diff|")
    totals = [0.0, 0.0]
    for side, count, pooled in CASES:
        scale = side / 160
        features = torch.randn(4, 96, side, side, generator=generator)
        corner = torch.rand(count, 2, generator=generator) * 130
        size = 20 + torch.rand(count, 2, generator=generator) * 50
        rois = torch.cat([torch.randint(0, 4, (count, 1), generator=generator).float(), corner, corner + size], 1)
        upstream = torch.randn(count, 96, pooled, pooled, generator=generator)
        results = []
        for pool in (roi_align, separable_roi_align):
            times = []
            for _ in range(args.repeats + 2):
                leaf = features.clone().requires_grad_(True)
                started = time.perf_counter()
                out = pool(leaf, rois, (pooled, pooled), scale, 2, False)
                (out * upstream).sum().backward()
                times.append(time.perf_counter() - started)
            results.append((statistics.median(times[2:]), out.detach(), leaf.grad))
        (t_ref, out_ref, grad_ref), (t_ours, out_ours, grad_ours) = results
        assert grad_ref is not None and grad_ours is not None  # backward() filled both leaves
        totals[0] += t_ref
        totals[1] += t_ours
        print(
            f"{side:2d}x{side:<3d} {count:7d} {pooled:4d}x{pooled:<2d}| {1000 * t_ref:8.1f} ms |"
            f" {1000 * t_ours:6.1f} ms | {t_ref / t_ours:7.1f}x | {float((out_ref - out_ours).abs().max()):16.2e} |"
            f" {float((grad_ref - grad_ours).abs().max()):17.2e}"
        )
    print(f"all six: {1000 * totals[0]:.1f} ms -> {1000 * totals[1]:.1f} ms, {totals[0] / totals[1]:.1f}x")


if __name__ == "__main__":
    main()
