"""Speed of the inner loop: ``python -m local train`` against running the entrypoint directly.

    .venv/bin/python bench/bench_local.py [--repeats 3] [--steps 4]

Targets (2 CPU cores): ``local train`` in process mode on a tiny dataset with a step limit produces
model.tar.gz within 30 s; the harness adds at most 1 s over running ``images/maskrcnn/train``
directly on the same tree. Both are measured in this run, alternating harness and direct runs so
that load from other processes hits both alike, and the medians compared. The harness's own parts
(start-up, tree layout, packing) are timed separately too, since they are what it adds: on a
shared machine the difference of two ~15 s medians carries a second of noise, so the overhead
target counts as met when either measure is within it. Prints a table and the ratios; exits 1
when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hostinfo  # bench/hostinfo.py (bench/ is on sys.path: benchmarks run as scripts)
from maskrcnn.train.synthetic import write_coco_dataset

from local.artifacts import pack_dir
from local.layout import JobSpec, write_job
from local.runtime import ENTRYPOINTS, REPO  # local/ is importable: installed or on PYTHONPATH

TRAIN_BUDGET_S = 30.0
OVERHEAD_BUDGET_S = 1.0


def hyperparameters(steps: int) -> dict[str, str]:
    return {
        "arch": "lite",
        "max_steps": str(steps),
        "batch_size": "2",
        "min_size": "128",
        "max_size": "128",
        "num_workers": "0",
    }


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def reset_tree(base: Path) -> None:
    """Back to the state before the job ran: no model, outputs or checkpoints (those would resume it)."""
    for sub in ("model", "output", "checkpoints"):
        shutil.rmtree(base / sub, ignore_errors=True)
        (base / sub).mkdir()
    (base / "output" / "data").mkdir()


def parse_args() -> argparse.Namespace:
    """The command line (the module docstring is its manual)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=12)
    return parser.parse_args()


def harness_command(data: Path, output: Path, hp: dict[str, str]) -> list[str]:
    """``python -m local train`` in process mode on ``data``, into ``output``."""
    argv = [
        sys.executable,
        "-m",
        "local",
        "train",
        "--data",
        str(data),
        "--mode",
        "process",
        "--output",
        str(output),
        "--overwrite",
        "--job-name",
        "bench",
    ]
    for key, value in hp.items():
        argv += ["--hp", f"{key}={value}"]
    return argv


def time_training(
    work: Path, data: Path, hp: dict[str, str], direct_tree: Path, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of each harness run and each direct entrypoint run, alternating, on the harness's own job tree."""
    harness_argv = harness_command(data, work / "job", hp)
    harness, direct = [], []
    for _ in range(repeats):
        harness.append(timed(harness_argv))
        if not direct_tree.exists():
            shutil.copytree(work / "job" / "algo-1", direct_tree)
        reset_tree(direct_tree)
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(direct_tree), "TRAINING_JOB_NAME": "bench"}
        direct.append(timed([sys.executable, str(ENTRYPOINTS / "train")], env))
    assert (work / "job" / "model.tar.gz").is_file()
    return harness, direct


def time_harness_parts(work: Path, data: Path, hp: dict[str, str], direct_tree: Path) -> tuple[float, float, float]:
    """Seconds of what the harness adds, each alone: CLI start-up (median of 3), tree layout, packing the model."""
    startup = statistics.median(timed([sys.executable, "-m", "local", "--help"]) for _ in range(3))
    started = time.perf_counter()
    write_job(work / "layout", JobSpec("bench", {"training": data}, hp), overwrite=True)
    layout_s = time.perf_counter() - started
    started = time.perf_counter()
    pack_dir(direct_tree / "model", work / "pack" / "model.tar.gz")
    pack_s = time.perf_counter() - started
    return startup, layout_s, pack_s


def report(harness: list[float], direct: list[float], startup: float, layout_s: float, pack_s: float) -> bool:
    """Print the table and the ratios to the budgets; whether the targets are met."""
    harness_s, direct_s = statistics.median(harness), statistics.median(direct)
    overhead = harness_s - direct_s
    parts = startup + layout_s + pack_s
    table = {
        "harness_train_s": round(harness_s, 2),
        "direct_entrypoint_s": round(direct_s, 2),
        "overhead_s (median harness - median direct)": round(overhead, 2),
        "harness_parts_s (cli start-up + layout + pack)": round(parts, 3),
        "  cli_startup_s": round(startup, 3),
        "  layout_s": round(layout_s, 3),
        "  pack_s": round(pack_s, 3),
        "runs": {"harness": [round(x, 2) for x in harness], "direct": [round(x, 2) for x in direct]},
    }
    print(json.dumps(table, indent=1))
    print(f"ratio harness/direct:             {harness_s / direct_s:.3f}")
    print(f"ratio train time / {TRAIN_BUDGET_S:.0f} s budget:    {harness_s / TRAIN_BUDGET_S:.3f}")
    print(
        f"ratio overhead / {OVERHEAD_BUDGET_S:.0f} s budget:      {overhead / OVERHEAD_BUDGET_S:.3f} "
        f"(harness parts alone: {parts / OVERHEAD_BUDGET_S:.3f})"
    )
    ok = harness_s <= TRAIN_BUDGET_S and min(overhead, parts) <= OVERHEAD_BUDGET_S
    print("targets met" if ok else "TARGET MISSED")
    return ok


def main() -> int:
    print(hostinfo.describe(), flush=True)
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    try:
        data = work / "data"
        write_coco_dataset(data, args.images, seed=0, size=128)
        hp = hyperparameters(args.steps)
        direct_tree = work / "direct"
        harness, direct = time_training(work, data, hp, direct_tree, args.repeats)
        startup, layout_s, pack_s = time_harness_parts(work, data, hp, direct_tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report(harness, direct, startup, layout_s, pack_s) else 1


if __name__ == "__main__":
    raise SystemExit(main())
