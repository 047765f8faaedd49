"""Our training loop's images/s against a plain torchvision-reference-style loop.

Same model (lite preset), same data, same batch, same machine, same process; the two loops run
in alternating rounds (ours, reference, ours, ...) so background load hits both alike. Prints
images/s for each, the ratio (ours / reference; the floor is 1.0x) and our data-loader wait as a
share of step time.

    .venv/bin/python bench/bench_train_loop.py [--steps 20] [--rounds 3] [--size 160]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
import torch
from maskrcnn.model.architectures import build_model
from maskrcnn.train.config import Hyperparameters
from maskrcnn.train.data import InstanceDataset, collate, load_index, train_transforms
from maskrcnn.train.engine import LoopState, Optimization, make_optimizer, make_scheduler, train_one_epoch
from maskrcnn.train.synthetic import write_coco_dataset
from torch.utils.data import DataLoader, DistributedSampler


def reference_loop(model, optimizer, loader, steps: int) -> float:
    """The shape of torchvision references/detection engine.train_one_epoch (no AMP on CPU)."""
    model.train()
    images_seen, started = 0, time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"loss is {loss_value}")
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        images_seen += len(images)
        if step + 1 == steps:
            break
    return images_seen / (time.perf_counter() - started)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []
        self.waits: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "phase=train" in message:
            fields = dict(p.split("=") for p in message.split()[1:])
            self.rates.append(float(fields["images_per_sec"]))
            self.waits.append(float(fields["data_wait"]))


def main() -> None:
    print(hostinfo.describe(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp()) / "data"
    write_coco_dataset(data, num_images=args.steps * args.batch, seed=0, size=args.size)
    index = load_index(data)
    dataset = InstanceDataset(index, train_transforms(0.5, False))
    hp = Hyperparameters(batch_size=args.batch, min_size=args.size, max_size=args.size)

    def fresh():
        torch.manual_seed(0)
        model = build_model("lite", index.num_classes, args.size, args.size)
        return model, make_optimizer(model, hp)

    capture = Capture()
    engine_log = logging.getLogger("maskrcnn.train.engine")
    engine_log.addHandler(capture)
    engine_log.setLevel(logging.INFO)
    engine_log.propagate = False
    ours, reference = [], []
    for _ in range(args.rounds):
        model, optimizer = fresh()
        sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(
            dataset, batch_size=args.batch, sampler=sampler, collate_fn=collate, num_workers=args.workers
        )
        scheduler = make_scheduler(optimizer, hp, len(loader), len(loader))
        train_one_epoch(
            model,
            Optimization(optimizer, scheduler, clip_grad_norm=hp.clip_grad_norm),
            loader,
            torch.device("cpu"),
            LoopState(),
            log_every=args.steps,
            max_steps=args.steps,
        )
        ours.append(capture.rates[-1])
        model, optimizer = fresh()
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=collate, num_workers=args.workers)
        reference.append(reference_loop(model, optimizer, loader, args.steps))
    ours_rate, ref_rate = statistics.median(ours), statistics.median(reference)
    print(
        f"machine: {torch.get_num_threads()} torch threads; lite @ {args.size}px, batch {args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds"
    )
    print(f"reference loop : {ref_rate:6.2f} images/s  (rounds: {', '.join(f'{r:.2f}' for r in reference)})")
    print(f"our loop       : {ours_rate:6.2f} images/s  (rounds: {', '.join(f'{r:.2f}' for r in ours)})")
    print(f"ratio ours/reference: {ours_rate / ref_rate:.3f}x  (floor 1.0x)")
    print(f"data-loader wait share of step time (ours): {statistics.median(capture.waits):.1%}")


if __name__ == "__main__":
    main()
