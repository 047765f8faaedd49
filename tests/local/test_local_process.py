"""The harness in process mode: real training jobs, a real server, real HTTP (tiny data, 2 steps)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from support import REPO, free_port
from tiny import TINY_HP
from tinyjob import tiny_spec

from local import client
from local.errors import JobFailed
from local.progress import Progress
from local.training import run_training
from local.transform import TransformSettings, run_transform

pytestmark = pytest.mark.integration


def test_train_packs_model_tar_gz_as_sagemaker_does(trained_job):
    output = trained_job.model_archive.parent
    with tarfile.open(trained_job.model_archive) as tar:
        assert sorted(tar.getnames()) == ["model.json", "model.safetensors"]
        spec = json.loads(tar.extractfile("model.json").read())
    assert spec["training"]["job_name"] == "tiny-job"  # TRAINING_JOB_NAME reached the job
    assert spec["min_size"] == 128
    with tarfile.open(trained_job.output_archive) as tar:
        assert "metrics.json" in tar.getnames()
    job = json.loads((output / "job.json").read_text())
    assert job["exit_code"] == 0 and job["failure_reason"] is None and job["mode"] == "process"
    assert "validation:segm_AP50" in job["final_metrics"]  # read from the log with the image's regexes
    assert any(h.get("phase") == "train" and "train:loss" in h for h in job["history"])
    assert json.loads((output / "algo-1/input/config/hyperparameters.json").read_text()) == TINY_HP
    assert "#metrics phase=eval" in trained_job.log_file.read_text()  # the job's raw log, kept in the job folder
    assert trained_job.tensorboard_dir == output / "algo-1/output/tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in trained_job.tensorboard_dir.iterdir())


def test_failure_prints_the_reason_and_exits_non_zero(dataset, tmp_path):
    """Through the real CLI: an unknown hyperparameter fails the job the way SageMaker would."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local",
            "train",
            "--data",
            str(dataset),
            "--hp",
            "bogus_knob=1",
            "--mode",
            "process",
            "--output",
            str(tmp_path / "job"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "training failed" in result.stderr and "unknown hyperparameter 'bogus_knob'" in result.stderr
    failure = (tmp_path / "job/algo-1/output/failure").read_text()
    assert "bogus_knob" in failure
    assert json.loads((tmp_path / "job/job.json").read_text())["failure_reason"] == failure.strip()
    assert not (tmp_path / "job/model.tar.gz").exists()


def test_two_hosts_train_together(dataset, process_runtime, tmp_path):
    lines: list[str] = []

    class Collect(Progress):
        def line(self, text):
            lines.append(text)

    result = run_training(
        tiny_spec(dataset, "two-hosts", instance_count=2), tmp_path / "job", process_runtime, Collect()
    )
    assert result.exit_code == 0 and result.hosts == ["algo-1", "algo-2"]
    assert any(line.startswith("algo-1 | ") and "rank 0 of 2" in line for line in lines)
    assert any(line.startswith("algo-2 | ") and "rank 1 of 2" in line for line in lines)
    resources = json.loads((tmp_path / "job/algo-2/input/config/resourceconfig.json").read_text())
    assert resources["current_host"] == "algo-2"
    assert sorted(p.name for p in (tmp_path / "job/algo-2/model").iterdir()) == []  # only rank 0 writes
    assert result.model_archive.is_file()


def test_a_failing_host_fails_the_job(dataset, process_runtime, tmp_path):
    spec = tiny_spec(dataset, "bad-job", hyperparameters={**TINY_HP, "lr": "-1"})
    with pytest.raises(JobFailed, match="lr must be > 0"):
        run_training(spec, tmp_path / "job", process_runtime)


def test_serve_invoke_json_and_png(trained_job, process_runtime, endpoint_factory, dataset, tmp_path):
    endpoint = endpoint_factory(process_runtime, trained_job.model_archive, port=0)
    image = sorted((dataset / "images").glob("*.png"))[0]
    reply = client.invoke(endpoint.url, image.read_bytes(), "image/png", attributes="score_threshold=0.0")
    assert reply.ok, reply.message()
    prediction = reply.json()["predictions"][0]
    assert prediction["image_size"] == [128, 128]
    failures = client.invoke_files(endpoint.url, [image], "image/png", None, None, tmp_path / "out", sys.stdout)
    assert failures == []
    assert (tmp_path / "out" / f"{image.name}.out").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = client.invoke(endpoint.url, b"not an image", "image/png")
    assert bad.status == 400


def test_transform_writes_one_out_per_input(trained_job, process_runtime, dataset, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    images = sorted((dataset / "images").glob("*.png"))[:3]
    for image in images[:2]:
        (inputs / image.name).write_bytes(image.read_bytes())
    (inputs / "nested" / images[2].name).write_bytes(images[2].read_bytes())
    (inputs / "broken.png").write_bytes(b"not a png")
    result = run_transform(
        process_runtime,
        trained_job.model_archive,
        inputs,
        tmp_path / "out",
        TransformSettings(max_concurrent=2),
    )
    assert result.total == 4 and result.succeeded == 3
    assert [name.split("/")[-1] for name, _ in result.failures] == ["broken.png"]
    assert result.parameters["MaxConcurrentTransforms"] == 2
    outs = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.out"))
    assert outs == sorted([f"{images[0].name}.out", f"{images[1].name}.out", f"nested/{images[2].name}.out"])
    assert "predictions" in json.loads((tmp_path / "out" / outs[0]).read_text())


def test_serve_cli_stops_cleanly_on_ctrl_c(trained_job, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "local",
            "serve",
            "--model",
            str(trained_job.model_archive),
            "--port",
            str(port),
            "--mode",
            "process",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            seen.append(line)
            if f"at http://127.0.0.1:{port} (Ctrl-C stops)" in line or not line:
                break  # not the harness's "endpoint ready at ..." log line, which comes before it
        # At once: the line is the promise that Ctrl-C stops cleanly from this moment on.
        process.send_signal(signal.SIGINT)
        assert seen[-1].startswith("serving "), "".join(seen[-20:])
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, rest[-2000:]
        assert not client.ping(f"http://127.0.0.1:{port}", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctrl_c_stops_the_job_like_stop_training_job(dataset, tmp_path):
    """SIGINT to the harness -> SIGTERM to the job -> checkpoint, exit 143."""
    argv = [
        sys.executable,
        "-m",
        "local",
        "train",
        "--data",
        str(dataset),
        "--mode",
        "process",
        "--output",
        str(tmp_path / "job"),
    ]
    for key, value in {**TINY_HP, "max_steps": "500"}.items():
        argv += ["--hp", f"{key}={value}"]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if "#metrics phase=train" in line:
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err[-2000:]
    assert "training stopped" in err
    assert (tmp_path / "job/algo-1/checkpoints/last.pt").is_file()
    assert not (tmp_path / "job/model.tar.gz").exists()


def test_sharded_hosts_each_train_their_own_part_for_the_same_steps(process_runtime, tmp_path):
    """--distribution sharded: disjoint parts of unequal size; every rank runs the smallest part's steps."""
    from maskrcnn.train.synthetic import write_coco_dataset

    data = tmp_path / "data"
    write_coco_dataset(data, num_images=9, seed=5, size=128)  # algo-1 gets 5 images, algo-2 gets 4
    hp = {**TINY_HP, "max_steps": "0", "epochs": "2", "batch_size": "1", "val_fraction": "0.25"}
    lines: list[str] = []

    class Collect(Progress):
        def line(self, text):
            lines.append(text)

    spec = tiny_spec(data, "sharded", instance_count=2, distribution="sharded", hyperparameters=hp)
    result = run_training(spec, tmp_path / "job", process_runtime, Collect())
    assert result.exit_code == 0
    parts = [json.loads((tmp_path / f"job/{h}/input/data/training/annotations.json").read_text()) for h in result.hosts]
    names = [{im["file_name"] for im in part["images"]} for part in parts]
    assert [len(n) for n in names] == [5, 4] and not names[0] & names[1]
    config = json.loads((tmp_path / "job/algo-2/input/config/inputdataconfig.json").read_text())
    assert config["training"]["S3DistributionType"] == "ShardedByS3Key"
    # 4 training images on algo-1 after its held-out image, 3 on algo-2: both train 3 steps an epoch
    assert any("algo-1 | " in line and "every rank trains 3" in line for line in lines), lines[-20:]
    with tarfile.open(result.model_archive) as tar:
        spec_json = json.loads(tar.extractfile("model.json").read())
    assert spec_json["training"]["steps"] == 6


def test_demo_runs_end_to_end_through_the_cli(tmp_path):
    """`make demo`'s path on a small scale: data -> training job -> model.tar.gz -> endpoint -> scored answers."""
    out = tmp_path / "demo"
    small = {**TINY_HP, "epochs": "1", "max_steps": "2", "max_runtime": "0"}
    hp_flags = [flag for key, value in small.items() for flag in ("--hp", f"{key}={value}")]
    command = [sys.executable, "-m", "local", "demo", "--mode", "process", "--out", str(out)]
    command += ["--train-images", "8", "--heldout-images", "3", "--seed", "1", *hp_flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"demo output: {out.resolve()}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "process" and summary["heldout"]["images"] == 3
    assert summary["hyperparameters"]["seed"] == "1" and summary["hyperparameters"]["max_runtime"] == "0"
    assert 0.0 <= summary["heldout"]["segm_AP50"] <= 1.0 and summary["inference"]["failed_requests"] == 0
    assert len(list((out / "predictions").glob("*.out"))) == 3 and len(list((out / "overlays").glob("*.png"))) == 3
    assert (out / "contact_sheet.png").stat().st_size > 0 and (out / "job" / "model.tar.gz").is_file()
    assert "Target segm AP50 >= 0.85 on held-out images" in (out / "summary.md").read_text()
