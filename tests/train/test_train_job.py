"""The real `train` entrypoint on hand-made /opt/ml trees (SAGEMAKER_BASE_DIR), on CPU.

Each test starts `images/maskrcnn/train` as a subprocess, exactly as the container would, and
checks what a user sees: the model directory, the metrics, the failure file and the exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from maskrcnn.train.metrics import Plan, parse_metrics, parse_plan
from PIL import Image
from safetensors.torch import load_file
from support import REPO, free_port

pytestmark = pytest.mark.integration

TRAIN = [sys.executable, str(REPO / "images" / "maskrcnn" / "train")]


def env_for(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update({"SAGEMAKER_BASE_DIR": str(base), "TRAINING_JOB_NAME": base.name, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_train(base: Path, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(TRAIN, env=env_for(base, **extra), capture_output=True, text=True, timeout=timeout)


def failure_reason(base: Path) -> str:
    return (base / "output" / "failure").read_text().splitlines()[0]


def test_train_writes_model_metrics_and_no_failure(make_job) -> None:
    base = make_job({"max_steps": "4"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = json.loads((base / "model" / "model.json").read_text())
    assert spec["arch"] == "lite" and spec["class_names"] == ["circle", "rectangle", "triangle"]
    assert spec["min_size"] == 128 and spec["training"]["steps"] == 4
    assert set(spec["metrics"]) == {"bbox_mAP", "bbox_AP50", "segm_mAP", "segm_AP50"}
    weights = load_file(base / "model" / "model.safetensors")
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight" in weights
    history = json.loads((base / "output" / "data" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history if h["phase"] == "train"] == [1, 2, 3, 4]
    assert (base / "output" / "data" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert not (base / "output" / "failure").exists()
    seen = {}
    for line in result.stdout.splitlines():
        seen.update(parse_metrics(line))
    assert {"train:loss", "train:lr", "train:images_per_sec", "validation:segm_mAP"} <= set(seen)


def test_a_stale_failure_file_is_removed_by_a_successful_run(make_job) -> None:
    base = make_job({"max_steps": "1"})
    (base / "output" / "failure").write_text("old reason\n")
    assert run_train(base).returncode == 0
    assert not (base / "output" / "failure").exists()


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("unknown_hp", "unknown hyperparameter 'learning_rate'; accepted:"),
        ("no_training_channel", "the 'training' channel is required"),
        ("empty_dataset", "has no images"),
        ("missing_image", "which is not in"),
    ],
)
def test_bad_input_fails_with_a_reason_and_nonzero_exit(make_job, tmp_path: Path, setup: str, fragment: str) -> None:
    if setup == "unknown_hp":
        base = make_job({"learning_rate": "0.1"})
    elif setup == "no_training_channel":
        base = make_job(channels={})
    else:
        data = tmp_path / "bad"
        data.mkdir()
        images = [] if setup == "empty_dataset" else [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}]
        (data / "annotations.json").write_text(
            json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]})
        )
        base = make_job(channels={"training": data})
    result = run_train(base, timeout=120)
    assert result.returncode == 1
    reason = failure_reason(base)
    assert fragment in reason
    assert len((base / "output" / "failure").read_text()) <= 1025
    assert "Traceback" not in result.stdout + result.stderr


def test_a_bad_annotation_fails_the_job_before_any_training_step(make_job, tmp_path: Path) -> None:
    """A 2-point polygon is refused before the first step, naming file, annotation and problem (inside a data-loader
    worker it would fail 25 s in, naming nothing)."""
    data = tmp_path / "bad"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), "white").save(data / name)
    square = [[8, 8, 40, 8, 40, 40, 8, 40]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 17, "image_id": 1, "category_id": 1, "segmentation": [[10, 10, 60, 80]], "iscrowd": 0},
    ]
    (data / "annotations.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": i, "file_name": n, "width": 64, "height": 64} for i, n in ((1, "a.png"), (2, "b.png"))
                ],
                "annotations": anns,
                "categories": [{"id": 1, "name": "a"}],
            }
        )
    )
    base = make_job({"max_steps": "50"}, channels={"training": data})
    started = time.monotonic()
    result = run_train(base, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout[-2000:]
    assert failure_reason(base) == (
        "training/annotations.json: annotation 17 (image 'a.png'): polygon has 2 points, needs at least 3"
    )
    assert "phase=train" not in result.stdout  # refused up front, not by a worker mid-epoch
    assert elapsed < 60, f"the job took {elapsed:.0f} s to refuse its data"


def test_non_finite_loss_stops_the_job_with_a_clear_failure(make_job) -> None:
    base = make_job({"lr": "1e12", "clip_grad_norm": "0", "warmup_steps": "0", "max_steps": "30"})
    result = run_train(base)
    assert result.returncode == 1, result.stdout[-2000:]
    reason = failure_reason(base)
    assert reason.startswith("loss became nan") or reason.startswith("loss became inf"), reason
    assert "lower lr" in reason
    assert not (base / "model" / "model.safetensors").exists()


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines[-30:])}")


def test_sigterm_checkpoints_and_the_restart_ends_where_an_uninterrupted_run_does(make_job) -> None:
    # AdamW (fused), as the CPU preset trains: its moments and step counts must come back from the checkpoint
    hp = {
        "max_steps": "10",
        "epochs": "2",
        "num_workers": "1",
        "checkpoint_every": "0",
        "optimizer": "adamw",
        "lr": "0.003",
    }
    reference = make_job(hp, name="uninterrupted")
    assert run_train(reference).returncode == 0

    base = make_job(hp, name="interrupted")
    process = subprocess.Popen(TRAIN, env=env_for(base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(process, "step=3 ", timeout=180)
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 143, rest
    assert (base / "checkpoints" / "last.pt").exists()
    assert not (base / "model" / "model.safetensors").exists()
    assert not (base / "output" / "failure").exists()

    resumed = run_train(base)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from checkpoint" in resumed.stdout
    resumed_steps = [
        int(m.split("step=")[1].split()[0]) for m in resumed.stdout.splitlines() if "#metrics phase=train" in m
    ]
    assert resumed_steps and resumed_steps[0] > 3  # it continued; it did not start over
    a = load_file(reference / "model" / "model.safetensors")
    b = load_file(base / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert different == []


def test_two_hosts_train_together_and_only_the_first_writes_the_model(make_job) -> None:
    hosts = ["algo-1", "algo-2"]
    bases = [make_job({"max_steps": "3"}, host=h, hosts=len(hosts), name=h) for h in hosts]
    extra = {"MASKRCNN_MASTER_ADDR": "127.0.0.1", "MASKRCNN_MASTER_PORT": str(free_port())}
    processes = [
        subprocess.Popen(TRAIN, env=env_for(b, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for b in bases
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "rank 0 of 2" in outputs[0] and "rank 1 of 2" in outputs[1]
    assert (bases[0] / "model" / "model.safetensors").exists()
    assert not (bases[1] / "model" / "model.safetensors").exists()
    # each step saw both hosts' images: the logged rate counts the whole job's batch
    spec = json.loads((bases[0] / "model" / "model.json").read_text())
    assert spec["training"]["steps"] == 3


def test_one_process_per_device_launcher_trains_and_stops_together(make_job) -> None:
    """The per-GPU launcher (spawn, SIGTERM forwarding, exit codes), exercised on CPU with gloo."""
    base = make_job({"max_steps": "3"})
    result = run_train(base, MASKRCNN_PROCS_PER_HOST="2", MASKRCNN_MASTER_PORT=str(free_port()))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 1 of 2" in result.stdout
    assert (base / "model" / "model.safetensors").exists()
    assert result.stdout.count("phase=train epoch=0 step=1 ") == 1  # only rank 0 reports metrics

    stopped = make_job({"max_steps": "200"}, name="stopped")
    process = subprocess.Popen(
        TRAIN,
        env=env_for(stopped, MASKRCNN_PROCS_PER_HOST="2", MASKRCNN_MASTER_PORT=str(free_port())),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_line(process, "step=2 ", timeout=240)
        process.send_signal(signal.SIGTERM)  # to the launcher only, as SageMaker signals PID 1
        rest = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 143, rest
    assert (stopped / "checkpoints" / "last.pt").exists()
    import torch

    payload = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert len(payload["rng"]) == 2  # each rank's own random state, restored to that rank on resume


def test_a_failing_device_process_leaves_its_reason(make_job, synthetic_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"  # what the device processes read (the launcher checks only the data)
    weights.mkdir()
    for name in ("a.pth", "b.pth"):
        (weights / name).write_bytes(b"")
    base = make_job(channels={"training": synthetic_dir, "pretrained": weights})
    result = run_train(base, MASKRCNN_PROCS_PER_HOST="2", MASKRCNN_MASTER_PORT=str(free_port()))
    assert result.returncode == 1
    assert "started 2 training processes" in result.stdout
    assert "the pretrained channel must hold exactly one" in failure_reason(base)


def test_bad_data_fails_in_the_launcher_before_the_device_processes_start(make_job, tmp_path: Path) -> None:
    data = tmp_path / "empty"
    data.mkdir()
    (data / "annotations.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    )
    base = make_job(channels={"training": data})
    result = run_train(base, MASKRCNN_PROCS_PER_HOST="2", MASKRCNN_MASTER_PORT=str(free_port()))
    assert result.returncode == 1
    assert "has no images" in failure_reason(base)
    assert "started 2 training processes" not in result.stdout  # checked once for the host, by the launcher


def test_a_short_job_still_reports_its_loss(make_job) -> None:
    """max_steps below log_every: the first and the last step are logged, so MetricDefinitions see a loss."""
    result = run_train(make_job({"max_steps": "3", "log_every": "10"}))
    assert result.returncode == 0, result.stdout[-3000:]
    steps = [parse_metrics(line) and line for line in result.stdout.splitlines() if "#metrics phase=train" in line]
    assert len(steps) == 2 and " step=1 " in steps[0] and " step=3 " in steps[1], steps
    assert all("train:loss" in parse_metrics(line) for line in steps)
    plans = [plan for line in result.stdout.splitlines() if (plan := parse_plan(line))]
    assert plans == [Plan("start", 0, 3), Plan("end", 3, 3)]  # what the harness's bar reads, and all it reads


def _two_hosts(make_job, hyperparameters: dict[str, str], channels: list[dict[str, Path]] | None = None):
    hosts = ["algo-1", "algo-2"]
    return [
        make_job(
            hyperparameters,
            channels=channels[i] if channels else None,
            host=h,
            hosts=len(hosts),
            name=h,
        )
        for i, h in enumerate(hosts)
    ]


def test_a_host_that_dies_is_named_in_the_survivors_failure(make_job) -> None:
    """kill -9 of algo-2 mid-training: algo-1 fails at once, saying whom it lost and when (not gloo's text)."""
    bases = _two_hosts(make_job, {"max_steps": "500", "epochs": "100"})
    extra = {"MASKRCNN_MASTER_ADDR": "127.0.0.1", "MASKRCNN_MASTER_PORT": str(free_port())}
    first = subprocess.Popen(
        TRAIN, env=env_for(bases[0], **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    second = subprocess.Popen(TRAIN, env=env_for(bases[1], **extra), stdout=subprocess.DEVNULL)
    try:
        wait_for_line(first, " step=2 ", timeout=240)
        second.kill()
        rest = first.communicate(timeout=120)[0]
    finally:
        first.kill()
        second.kill()
    assert first.returncode == 1, rest[-3000:]
    reason = failure_reason(bases[0])
    assert reason.startswith("lost contact with algo-2 (rank 1) at epoch 0 step "), reason
    assert "see algo-2's own log and failure" in reason


def test_hosts_with_different_classes_fail_naming_both_lists(make_job, synthetic_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-classes"
    shutil.copytree(synthetic_dir, other)
    coco = json.loads((other / "annotations.json").read_text())
    for category in coco["categories"]:
        category["name"] = "renamed-" + category["name"]
    (other / "annotations.json").write_text(json.dumps(coco))
    bases = _two_hosts(make_job, {"max_steps": "2"}, [{"training": synthetic_dir}, {"training": other}])
    extra = {"MASKRCNN_MASTER_ADDR": "127.0.0.1", "MASKRCNN_MASTER_PORT": str(free_port())}
    processes = [subprocess.Popen(TRAIN, env=env_for(b, **extra), stdout=subprocess.PIPE, text=True) for b in bases]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    assert [p.returncode for p in processes] == [1, 1], outputs[0][-2000:] + outputs[1][-2000:]
    for base in bases:
        reason = failure_reason(base)
        assert "different classes" in reason and "algo-2 has ['renamed-" in reason, reason


def test_validation_images_that_are_also_training_images_are_refused(make_job, synthetic_dir: Path) -> None:
    base = make_job(channels={"training": synthetic_dir, "validation": synthetic_dir})
    result = run_train(base)
    assert result.returncode == 1
    assert "in both the training and the validation channel" in failure_reason(base)
