"""The CPU preset trained from scratch on the synthetic set: held-out segm AP50 against time.

Writes a training set and a held-out set (another seed), runs the real `train` entrypoint on a
hand-made /opt/ml tree with the held-out set as the validation channel, evaluating after every
epoch, and prints for each evaluation the seconds so far (wall, and without the evaluations, which
only draw the curve) and the held-out segm AP50.
The target: AP50 >= 0.85 within 300 s of training on 2 CPU cores.

    .venv/bin/python bench/bench_convergence.py [--hp key=value ...] [--images 400] [--size 160]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
from maskrcnn.train.config import PRESETS, SYNTHETIC_CPU_IMAGE_SIZE, SYNTHETIC_CPU_TRAIN_IMAGES
from maskrcnn.train.synthetic import write_coco_dataset

from local.layout import JobSpec, parse_pairs, write_host_tree
from local.runtime import ENTRYPOINTS

# The preset this benchmark measures (the demo's preset builds on it), logging more often and writing no
# checkpoints; --hp overrides single keys.
HYPERPARAMETERS = {**PRESETS["synthetic-cpu"], "log_every": "25", "checkpoint_every": "0"}
BUDGET_S = 300.0
TARGET_AP50 = 0.85


def main() -> int:
    print(hostinfo.describe(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=SYNTHETIC_CPU_TRAIN_IMAGES)
    parser.add_argument("--heldout", type=int, default=60)
    parser.add_argument("--size", type=int, default=SYNTHETIC_CPU_IMAGE_SIZE)
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--log", type=Path, help="also write the job's whole log here")
    args = parser.parse_args()
    hp = {**HYPERPARAMETERS, **parse_pairs(args.hp)}
    base = Path(tempfile.mkdtemp(prefix="bench-convergence-"))
    write_coco_dataset(base / "train", args.images, seed=0, size=args.size)
    write_coco_dataset(base / "heldout", args.heldout, seed=1000, size=args.size)
    job = base / "job"
    channels = {"training": base / "train", "validation": base / "heldout"}
    write_host_tree(job, JobSpec("bench-convergence", channels, hp), "algo-1")  # the harness's /opt/ml tree
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job), "PYTHONUNBUFFERED": "1"}
    print(f"hyperparameters: {hp}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the job too
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(ENTRYPOINTS / "train")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        return report(process, job, started, args.log)
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C, timeout): do not leave the job training
            process.terminate()
            process.wait()


def field(pattern: str, line: str) -> str:
    """The first group of ``pattern`` in the job's ``line``; a line the benchmark no longer reads stops it, named."""
    found = re.search(pattern, line)
    if found is None:
        raise SystemExit(f"bench_convergence: no {pattern!r} in the job's line: {line.strip()}")
    return found.group(1)


def report(process: subprocess.Popen[str], job: Path, started: float, log_path: Path | None) -> int:
    eval_seconds = 0.0
    first_hit = None
    loss = "?"
    assert process.stdout is not None
    pending: tuple[str, float, float] | None = None  # an evaluation's line comes before its duration
    log = open(log_path, "w") if log_path else None  # noqa: SIM115
    for line in process.stdout:
        if log is not None:
            log.write(line)
            log.flush()
        if "phase=eval" in line:
            now = time.perf_counter() - started
            ap50 = float(field(r"segm_AP50=([0-9.e-]+)", line))
            pending = (field(r"epoch=(\d+)", line), ap50, now)
        elif "phase=train" in line:
            loss = field(r" loss=([0-9.e+-]+|nan)", line)
        elif "evaluation took" in line:
            eval_seconds += float(field(r"took ([0-9.]+)s", line))
            if pending is not None:
                epoch, ap50, now = pending
                if ap50 >= TARGET_AP50 and first_hit is None:
                    first_hit = now - eval_seconds  # training time: start-up included, evaluations not
                print(
                    f"epoch {epoch}: {now:6.1f} s wall, {now - eval_seconds:6.1f} s without evaluation, "
                    f"held-out segm AP50 {ap50:.3f} (train loss {loss})",
                    flush=True,
                )
                pending = None
    if process.wait() != 0:
        print((job / "output" / "failure").read_text() if (job / "output" / "failure").exists() else "failed")
        return 1
    spec = json.loads((job / "model" / "model.json").read_text())
    print(f"training seconds (model.json, includes per-epoch evaluation): {spec['training']['train_seconds']}")
    print(f"final held-out: {spec['metrics']}")
    if first_hit is None:
        print(f"AP50 never reached {TARGET_AP50}")
        return 1
    print(
        f"reached AP50 >= {TARGET_AP50} after {first_hit:.0f} s of training (start-up included, the "
        f"per-epoch evaluations not): {first_hit / BUDGET_S:.2f}x of the {BUDGET_S:.0f} s budget"
    )
    return 0 if first_hit <= BUDGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
