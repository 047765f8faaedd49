"""Distributed paths that a CPU can show with gloo: sharded evaluation, and a stop while processes start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eval_setup(base: Path, rank: int, world_size: int) -> tuple[Any, ...]:
    """The job's config, this rank's context, the validation index and a seeded lite model with detections."""
    from maskrcnn.model.architectures import build_model
    from maskrcnn.train.config import TrainConfig
    from maskrcnn.train.distributed import DistContext
    from maskrcnn.train.job import load_data

    config = TrainConfig.from_env({"SAGEMAKER_BASE_DIR": str(base)})
    ctx = DistContext(rank, rank, world_size, torch.device("cpu"))
    _, val_index = load_data(config)
    torch.manual_seed(0)
    model = build_model("lite", val_index.num_classes, 128, 128)
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep every detection, so there is something to merge
    return config, ctx, val_index, model


def sharded_eval(rank: int, world_size: int, base: Path, port: int, out: Path) -> None:
    from maskrcnn.train import distributed
    from maskrcnn.train.engine import evaluate, predict_coco
    from maskrcnn.train.job import validation_loader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        config, ctx, val_index, model = eval_setup(base, rank, world_size)
        loader, shared = validation_loader(val_index, config, ctx)
        assert shared
        merged: list[Any] = []

        def gather(results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            gathered = distributed.gather_to_main(results, ctx)
            merged.extend(gathered or [])
            return gathered

        scores = evaluate(model, loader, val_index.to_coco(), ctx.device, gather=gather)
        own = predict_coco(model, loader, ctx.device)
        (out / f"rank{rank}.json").write_text(json.dumps({"scores": scores, "merged": merged, "own": len(own)}))
    finally:
        dist.destroy_process_group()


def canonical(results: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in results)


def test_sharded_two_process_evaluation_equals_the_single_process_one(make_job, tmp_path: Path) -> None:
    from maskrcnn.train.distributed import DistContext
    from maskrcnn.train.engine import evaluate, predict_coco
    from maskrcnn.train.job import validation_loader

    base = make_job({"val_fraction": "0.5"})
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(sharded_eval, args=(2, base, free_port(), out), nprocs=2, start_method="spawn")
    rank0 = json.loads((out / "rank0.json").read_text())
    rank1 = json.loads((out / "rank1.json").read_text())
    assert rank1["scores"] == {} and rank1["merged"] == []  # only rank 0 scores
    assert rank0["own"] > 0 and rank1["own"] > 0  # each rank predicted (and had detections in) its own part

    config, _, val_index, model = eval_setup(base, 0, 1)
    loader, shared = validation_loader(val_index, config, DistContext(0, 0, 1, torch.device("cpu")))
    assert not shared
    single = predict_coco(model, loader, torch.device("cpu"))
    assert len(single) > 0
    assert canonical(rank0["merged"]) == canonical(json.loads(json.dumps(single)))
    assert rank0["scores"] == evaluate(model, loader, val_index.to_coco(), torch.device("cpu"))


def test_a_stop_while_the_processes_start_is_a_stop_not_a_failure(make_job) -> None:
    """SIGTERM to the launcher while its per-device processes still import torch: exit 143, no failure."""
    base = make_job({"max_steps": "200"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update(
        {
            "SAGEMAKER_BASE_DIR": str(base),
            "PYTHONUNBUFFERED": "1",
            "MASKRCNN_PROCS_PER_HOST": "2",
            "MASKRCNN_MASTER_PORT": str(free_port()),
        }
    )
    process = subprocess.Popen(
        [sys.executable, str(REPO / "images/maskrcnn/train")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "started 2 training processes" in line:
                break
        else:
            pytest.fail("the launcher never started its processes:\n" + "".join(seen[-30:]))
        process.send_signal(signal.SIGTERM)  # the children are still importing torch
        rest = process.communicate(timeout=180)[0]
    finally:
        process.kill()
    assert process.returncode == 143, "".join(seen) + rest
    assert not (base / "output" / "failure").exists()
