"""Distributed paths that a CPU can show with gloo: evaluation split over every rank (replicated and sharded
data, one host and two), one collective a step for the step's flags, and a stop while processes start."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from maskrcnn.contract import SageMakerPaths
from support import REPO, free_port

from local.layout import inputdataconfig

pytestmark = pytest.mark.integration


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
        loader = validation_loader(val_index, config, ctx)
        assert len(loader.dataset) < len(val_index.images)  # type: ignore[arg-type]  # a part of it
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


def test_split_two_process_evaluation_equals_the_single_process_one(make_job, tmp_path: Path) -> None:
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

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a float sum's order follows the threads
    try:
        config, _, val_index, model = eval_setup(base, 0, 1)
        loader = validation_loader(val_index, config, DistContext(0, 0, 1, torch.device("cpu")))
        assert len(loader.dataset) == len(val_index.images)  # type: ignore[arg-type]
        single = predict_coco(model, loader, torch.device("cpu"))
        assert len(single) > 0
        assert canonical(rank0["merged"]) == canonical(json.loads(json.dumps(single)))
        assert rank0["scores"] == evaluate(model, loader, val_index.to_coco(), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


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


def labelled_sharded(base: Path) -> Path:
    """The training channel labelled ShardedByS3Key with its files left as they are: each host was given its own
    dataset, as SageMaker deals a dataset stored as one annotation file per shard (the harness would re-deal it)."""
    config = SageMakerPaths(base).inputdataconfig_file
    config.write_text(json.dumps(inputdataconfig(json.loads(config.read_text()), sharded="training")))
    return base


def train_env(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update({"SAGEMAKER_BASE_DIR": str(base), "TRAINING_JOB_NAME": base.name, "PYTHONUNBUFFERED": "1", **extra})
    return env


SHARE = re.compile(
    r"\[rank (\d)\] maskrcnn\.train\.job: evaluation: this rank predicts (\d+) of this host's (\d+) \(sharded\)"
)


def test_sharded_data_on_two_processes_both_evaluate_and_the_log_says_each_share(make_job) -> None:
    """Issue 29's check: two CPU processes on one host, sharded data; each rank predicts half the images."""
    base = make_job({"max_steps": "3", "val_fraction": "0.5"}, distribution="sharded")
    result = subprocess.run(
        [sys.executable, str(REPO / "images/maskrcnn/train")],
        env=train_env(base, MASKRCNN_PROCS_PER_HOST="2", MASKRCNN_MASTER_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shares = {int(rank): (int(part), int(whole)) for rank, part, whole in SHARE.findall(result.stdout)}
    assert set(shares) == {0, 1}, result.stdout[-3000:]
    assert (
        shares[0][1] == shares[1][1] == 8 and shares[0][0] + shares[1][0] == 8 and min(shares[0][0], shares[1][0]) > 0
    )
    assert "data checked once for this host: 16 image headers read" in result.stdout
    assert re.search(
        r"learning rate: peak 0\.04 for 4 images a step \(2 process\(es\) x batch_size 2.*0\.01 per image",
        result.stdout,
    )
    spec = json.loads((base / "model" / "model.json").read_text())
    assert set(spec["metrics"]) == {"bbox_mAP", "bbox_AP50", "segm_mAP", "segm_AP50"}


def test_two_sharded_hosts_are_scored_together_under_job_wide_image_ids(make_job, tmp_path: Path) -> None:
    """Each host's own validation images (ids unique only per host), predicted there, scored on rank 0."""
    from maskrcnn.train.synthetic import write_coco_dataset

    hosts = ["algo-1", "algo-2"]
    bases = []
    for n, host in enumerate(hosts):
        data = tmp_path / f"shard{n}"
        write_coco_dataset(data, num_images=8 + 4 * n, seed=10 + n, size=128)
        hp = {"max_steps": "2", "val_fraction": "0.5"}
        bases.append(labelled_sharded(make_job(hp, {"training": data}, host=host, hosts=len(hosts), name=host)))
    extra = {"MASKRCNN_MASTER_ADDR": "127.0.0.1", "MASKRCNN_MASTER_PORT": str(free_port())}
    processes = [
        subprocess.Popen(
            [sys.executable, str(REPO / "images/maskrcnn/train")],
            env=train_env(b, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for b in bases
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "rank 0 scores 10 validation images of 2 hosts ([4, 6])" in outputs[0]  # 4 + 6 held out
    assert "evaluation: this rank predicts 6 of this host's 6 (sharded)" in outputs[1]


def counted_job(local_rank: int, base: Path, port: int, out: Path) -> None:
    """One rank of a 2-process job, counting the all_reduce calls made between its training steps."""
    import torch.distributed as dist
    from maskrcnn.contract import setup_logging
    from maskrcnn.train.config import TrainConfig
    from maskrcnn.train.job import StopSignal, worker

    torch.set_num_threads(1)
    setup_logging(rank=local_rank)
    in_loop: list[int] = []
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        if any(frame.function == "train_epoch" for frame in inspect.stack(0)):
            in_loop.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]  # DDP's own reductions do not come through here
    config = TrainConfig.from_env({"SAGEMAKER_BASE_DIR": str(base), "MASKRCNN_MASTER_PORT": str(port)})
    code = worker(local_rank, config, 2, StopSignal(), time.monotonic())
    (out / f"rank{local_rank}.json").write_text(json.dumps({"code": code, "in_loop": len(in_loop)}))


def test_one_collective_a_step_for_the_loss_the_stop_and_the_budget(make_job, tmp_path: Path) -> None:
    """Finiteness, the stop request and the time budget (planning at step 10) agreed in ONE all_reduce a step."""
    base = make_job({"max_steps": "11", "max_runtime": "3600", "log_every": "5"})
    out = tmp_path / "counts"
    out.mkdir()
    mp.start_processes(counted_job, args=(base, free_port(), out), nprocs=2, start_method="spawn")
    counts = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert json.loads((base / "model" / "model.json").read_text())["training"]["steps"] == 11
    assert counts == [{"code": 0, "in_loop": 11}, {"code": 0, "in_loop": 11}]
