"""The measuring phases of ``scripts/gpu-check.sh``: what a lent GPU machine prints about this project.

    python bench/gpu_check.py info                   # torch, CUDA, driver, devices, packages missing here
    python bench/gpu_check.py train --work DIR       # resnet50_fpn, 60 steps, AMP and float32 side by side
    python bench/gpu_check.py serve --work DIR       # the real serve stack: p50/p99 of 20 requests, GPU memory

``--quick`` shrinks every phase to seconds so that the script can be dry-run on a CPU
(``GPU_CHECK_ALLOW_CPU=1 scripts/gpu-check.sh``); its figures mean nothing. Self-contained on purpose: the lent
machine has its own Python and torch plus the wheels carried in (docs/benchmarks.md, "GPU checks"), so this
imports only the image's package, numpy, the standard library and the standard-library-only parts of the
harness and bench (``local.runtime``'s ``free_port`` and ``ENTRYPOINTS``, ``local.layout``'s job tree,
``bench_serving``'s server start and stop), never the dev tools.

train: a synthetic COCO set (the one ``make demo`` uses, :mod:`maskrcnn.train.synthetic`) and two jobs of the
package's own ``train`` entrypoint on one GPU (``CUDA_VISIBLE_DEVICES`` = the first), so ``images_per_sec`` is
per GPU whatever the metric counts: ``amp=true`` (bfloat16 where native) then ``amp=false``. Prints each metric
line's images/s and data-wait share, the median after the first line (cuDNN's and the allocator's warm-up), the
evaluation's time and the job's wall time. The AMP job's model is what ``serve`` then loads.

serve: ``images/maskrcnn/serve`` behind nginx where nginx is installed, else gunicorn on the port itself (the
line says which), three configurations one after the other: the defaults (workers per GPU from its memory,
autocast auto), one worker per GPU, and float32. For each: 20 sequential requests (a 640x480 JPEG, 20
detections with masks per answer), p50/p99 and the worker's own Server-Timing split; then 2 clients per worker
for throughput; then each process's GPU memory from nvidia-smi (the supervisor and the arbiter must hold none)
and what the workers' allocators hold from their log lines.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench_serving import SERVE, stop_server, wait_ready  # bench/ is on sys.path: this runs as a script

from local.layout import JobSpec, write_host_tree
from local.runtime import ENTRYPOINTS, free_port  # gpu-check.sh puts the repository on PYTHONPATH

TRAIN = ENTRYPOINTS / "train"
PACKAGES: tuple[str, ...] = ("torch", "torchvision", "numpy", "PIL", "safetensors", "pycocotools", "faster_coco_eval")
PACKAGES += ("flask", "werkzeug", "gunicorn", "gevent", "tensorboardX", "matplotlib")


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_", "SM_"))}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


def nvidia_smi(*query: str) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-...=... --format=csv,noheader,nounits``; [] where it does not run."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        done = subprocess.run(
            [executable, *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.strip().splitlines() if line.strip()]


# info


def info(args: argparse.Namespace) -> int:
    import importlib.util
    import platform

    say(
        f"python {platform.python_version()} at {sys.executable}; {os.cpu_count()} CPUs; nginx: "
        f"{shutil.which('nginx') or 'not installed (serve falls back to gunicorn on the port)'}"
    )
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    say("packages missing:", ", ".join(missing) if missing else "none")
    if missing:
        say("  carry them as wheels: docs/benchmarks.md, 'GPU checks'")
    import torch

    say(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    for row in nvidia_smi("--query-gpu=index,name,driver_version,memory.total,compute_cap"):
        say("nvidia-smi:", " | ".join(row))
    if not torch.cuda.is_available():
        say("CUDA: not available to torch")
        return 0
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        say(
            f"cuda:{i} {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
            f"{props.multi_processor_count} SMs"
        )
    with torch.cuda.device(0):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    say(f"bfloat16 native: {native} (serving autocast 'auto' picks {'bfloat16' if native else 'float16'})")
    say(f"torch kernels for: {', '.join(torch.cuda.get_arch_list())}")
    return 0


# train

METRIC = re.compile(r"#metrics (.*)")


def write_job(base: Path, data: Path, hyperparameters: dict[str, str]) -> Path:
    """One host's /opt/ml tree, as the harness lays it out."""
    channels = {"training": data / "train", "validation": data / "validation"}
    write_host_tree(base, JobSpec(base.name, channels, hyperparameters), "algo-1")
    return base


def parse_metrics(text: str) -> list[dict[str, str]]:
    rows = []
    for line in text.splitlines():
        found = METRIC.search(line)
        if found:
            rows.append(dict(pair.split("=", 1) for pair in found.group(1).split() if "=" in pair))
    return rows


def run_job(name: str, base: Path, timeout: float, log_dir: Path | None, gpu: bool) -> dict[str, Any]:
    env = clean_env(SAGEMAKER_BASE_DIR=str(base))
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # one GPU: per-GPU figures
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(TRAIN)], env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        code = -1
    wall = time.perf_counter() - started
    if log_dir is not None:
        (log_dir / f"train-{name}.log").write_text(output)
    metrics = parse_metrics(output)
    train = [m for m in metrics if m.get("phase") == "train" and "images_per_sec" in m]
    evals = [m for m in metrics if m.get("phase") == "eval"]
    evaluation = re.findall(r"evaluation took ([\d.]+)s for (\d+) detections", output)
    precision = re.findall(r"mixed precision: (\S+)", output)
    say(
        f"--- {name}: exit {f'timed out after {timeout:.0f} s' if code == -1 else code}, {wall:.1f} s wall, "
        f"mixed precision {precision[0] if precision else '?'}"
    )
    for m in train:
        say(
            f"  step {m.get('step', '?'):>4}  images/s {float(m['images_per_sec']):8.2f}  "
            f"data wait {100 * float(m.get('data_wait', 'nan')):5.1f} %  loss {m.get('loss', '?')}"
        )
    steady = [float(m["images_per_sec"]) for m in train[1:]] or [float(m["images_per_sec"]) for m in train]
    waits = [float(m.get("data_wait", "nan")) for m in train[1:]] or [float("nan")]
    result = {
        "name": name,
        "exit": code,
        "wall_s": round(wall, 1),
        "precision": precision[0] if precision else None,
        "images_per_sec": round(statistics.median(steady), 2) if steady else None,
        "data_wait": round(statistics.median(waits), 4) if train else None,
        "eval_s": float(evaluation[-1][0]) if evaluation else None,
        "eval_detections": int(evaluation[-1][1]) if evaluation else None,
        "segm_mAP": evals[-1].get("segm_mAP") if evals else None,
    }
    if evaluation:
        say(f"  evaluation: {evaluation[-1][0]} s for {evaluation[-1][1]} detections")
    if code != 0:
        say("  last lines:\n" + "\n".join("    " + line for line in output.strip().splitlines()[-25:]))
    return result


def train(args: argparse.Namespace) -> int:
    import torch
    from maskrcnn.train.synthetic import write_coco_dataset

    gpu = torch.cuda.is_available()
    work = Path(args.work)
    data = work / "data"
    # 60 steps x 4 images: 160 training images is 1.5 epochs; 24 validation images for the evaluation's time.
    sizes = (16, 8, 128) if args.quick else (160, 24, 320)
    started = time.perf_counter()
    write_coco_dataset(data / "train", sizes[0], 0, sizes[2])
    write_coco_dataset(data / "validation", sizes[1], 1, sizes[2])
    say(
        f"synthetic data: {sizes[0]} training + {sizes[1]} validation images of {sizes[2]} px "
        f"in {time.perf_counter() - started:.1f} s"
    )
    hp = {
        # From scratch (nothing downloads): trainable BatchNorm, ResNet-50 + FPN's cost. The dry run trains lite.
        "arch": "lite" if args.quick else "resnet50_fpn",
        "max_steps": "4" if args.quick else "60",
        "epochs": "50",
        "batch_size": "2" if args.quick else "4",
        "lr": "0.01",
        "warmup_steps": "20",
        "num_workers": "0" if args.quick else "4",
        "log_every": "2" if args.quick else "10",
        "checkpoint_every": "0",
    }
    if args.quick:
        hp.update({"min_size": "128", "max_size": "128"})
    log_dir = Path(args.log_dir) if args.log_dir else None
    results = []
    for name, amp in (("amp", "true"), ("fp32", "false")):
        base = write_job(work / f"job-{name}", data, {**hp, "amp": amp})
        results.append(run_job(name, base, args.job_timeout, log_dir, gpu))
    say("\n| job | exit | precision | images/s per GPU (median after the first line) | data wait | evaluation | wall |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        wait = f"{100 * r['data_wait']:.1f} %" if r["data_wait"] is not None else "?"
        ev = f"{r['eval_s']} s ({r['eval_detections']} detections)" if r["eval_s"] is not None else "?"
        say(
            f"| {r['name']} | {r['exit']} | {r['precision']} | {r['images_per_sec']} | {wait} | {ev} "
            f"| {r['wall_s']} s |"
        )
    amp_rate, fp32_rate = results[0]["images_per_sec"], results[1]["images_per_sec"]
    if amp_rate and fp32_rate:
        say(f"AMP / float32 images/s: {amp_rate / fp32_rate:.2f}x")
    if log_dir is not None:
        with (log_dir / "summary.json").open("a") as out:
            out.write(json.dumps({"phase": "train", "gpu": gpu, "jobs": results}) + "\n")
    model = work / "job-amp" / "model"
    if (model / "model.json").exists():
        (work / "model-path").write_text(str(model))
    return 0 if all(r["exit"] == 0 for r in results) else 1


# serve


def sample_jpeg(width: int, height: int) -> bytes:
    import numpy as np
    from maskrcnn.train.synthetic import make_sample
    from PIL import Image

    image, _ = make_sample(np.random.default_rng(0), max(width, height))
    buffer = io.BytesIO()
    image.resize((width, height), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def post(port: int, body: bytes, attributes: str) -> tuple[float, int, dict[str, float], int]:
    """One invocation: seconds, status, Server-Timing (ms by name), instances in the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": attributes}
    started = time.perf_counter()
    conn.request("POST", "/invocations", body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    took = time.perf_counter() - started
    timing = {}
    for part in (response.getheader("Server-Timing") or "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            timing[name] = float(duration)
    count = 0
    if response.status == 200:
        count = len(json.loads(payload)["predictions"][0]["instances"])
    conn.close()
    return took, response.status, timing, count


def stack_processes(root: int) -> dict[int, str]:
    """pid -> role (serve, arbiter, worker, nginx) for ``serve`` (pid ``root``) and its descendants."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    roles = {}
    for pid in parents:
        depth, parent = 0, pid
        while parent != root and parent in parents and parent > 1:
            parent, depth = parents[parent], depth + 1
        if parent != root:
            continue
        command = commands.get(pid, "")
        if pid == root:
            roles[pid] = "serve"
        elif "nginx" in command:
            roles[pid] = "nginx"
        else:
            roles[pid] = "worker" if depth >= 2 and "maskrcnn.serve.wsgi" in command else "arbiter"
    return roles


def gpu_memory_by_process(roles: dict[int, str]) -> str:
    rows = nvidia_smi("--query-compute-apps=pid,used_memory")
    if not rows:
        return "nvidia-smi lists no compute processes (none, or not visible from this PID namespace)"
    seen = []
    for pid_text, used in rows:
        pid = int(pid_text) if pid_text.isdigit() else -1
        seen.append(f"{roles.get(pid, 'other')} {pid}: {used} MiB")
    return "; ".join(seen)


def gpu_memory_used() -> list[int]:
    """MiB in use on each GPU, as nvidia-smi reports it (empty without nvidia-smi)."""
    return [int(r[0]) for r in nvidia_smi("--query-gpu=memory.used") if r and r[0].isdigit()]


def start_stack(name: str, base: Path, extra: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``serve`` on a free port with the configuration's environment, its output appended to ``log``."""
    port = free_port()
    env = clean_env(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_BIND_TO_PORT=str(port), **extra)
    if shutil.which("nginx") is None:
        env["MASKRCNN_NGINX"] = "off"
    with log.open("ab") as out:
        out.write(f"\n===== {name}: {extra}\n".encode())
        out.flush()
        process = subprocess.Popen(
            [sys.executable, str(SERVE)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, port


def measure_latency(port: int, body: bytes, attributes: str, requests: int) -> dict[str, Any]:
    """Warm the stack, then ``requests`` one at a time: p50/p99, detections and the server's phases (medians)."""
    for _ in range(3):  # warm: the first requests at a new size pay cuDNN's and the allocator's first calls
        post(port, body, attributes)
    latencies, timings, counts = [], [], []
    for _ in range(requests):
        took, status, timing, count = post(port, body, attributes)
        if status != 200:
            raise RuntimeError(f"/invocations answered {status}")
        latencies.append(took * 1000)
        timings.append(timing)
        counts.append(count)
    latencies.sort()
    return dict(
        p50_ms=round(statistics.median(latencies), 1),
        p99_ms=round(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], 1),
        detections=statistics.median(counts),
        **{
            f"{k}_ms": round(statistics.median(t.get(k, 0.0) for t in timings), 1)
            for k in ("decode", "inference", "encode")
        },
    )


def measure_throughput(port: int, body: bytes, attributes: str, requests: int, workers: int) -> dict[str, Any]:
    """Two clients per worker at once, each sending ``max(2, requests // 2)``: requests per second and errors."""
    clients, each = 2 * max(1, workers), max(2, requests // 2)
    errors: list[str] = []

    def client() -> None:
        for _ in range(each):
            try:
                if post(port, body, attributes)[1] != 200:
                    errors.append("status")
            except OSError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "workers": workers,
        "clients": clients,
        "req_per_s": round(clients * each / (time.perf_counter() - started), 1),
        "errors": len(errors),
    }


def log_excerpt(log: Path, name: str) -> list[str]:
    """The first 12 lines of this configuration's part of ``log`` that say how the stack came up, or failed."""
    text = log.read_text(errors="replace").split(f"===== {name}:")[-1]
    return [
        line.split(" ", 3)[-1]
        for line in text.splitlines()
        if re.search(r"worker\(s\)|GPU\(s\) of|torch holds|loaded on|nginx is not installed|Traceback|Error", line)
    ][:12]


def run_config(
    name: str, model_dir: Path, extra: dict[str, str], body: bytes, attributes: str, requests: int, log: Path
) -> dict[str, Any]:
    """One configuration of the stack: started, timed one request at a time and under load, stopped, reported."""
    used_before = gpu_memory_used()
    process, port = start_stack(name, model_dir.parent, extra, log)
    result: dict[str, Any] = {"name": name, **extra}
    try:
        result["ready_s"] = round(wait_ready(port, 45, process), 1)
        result.update(measure_latency(port, body, attributes, requests))
        roles = stack_processes(process.pid)
        workers = sum(1 for r in roles.values() if r == "worker")
        result.update(measure_throughput(port, body, attributes, requests, workers))
        result["gpu_memory"] = gpu_memory_by_process(roles)
        used_now = gpu_memory_used()
        if used_before and used_now:
            result["gpu_used_delta_mib"] = sum(used_now) - sum(used_before)
    except Exception as exc:  # one configuration's failure must not hide the others' figures
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_server(process)
    result["log"] = log_excerpt(log, name)
    say(f"--- {name}: " + json.dumps({k: v for k, v in result.items() if k != "log"}))
    for line in result["log"]:
        say("    " + line)
    return result


def compare_pasting(model_dir: Path, quick: bool, device: str = "cuda:0") -> list[dict[str, Any]]:
    """Masks to RLE for one answer, in this process: on the GPU (the worker's path now) against copying the
    probabilities to the host and pasting there box by box (the path before), at two image sizes. (On the CPU,
    in the dry run, both sides are the CPU path: it only exercises this code.)"""
    import torch
    from maskrcnn.serve.codec import decode_image
    from maskrcnn.serve.predictor import Detections, Predictor
    from pycocotools import mask as mask_utils

    predictor = Predictor.load(model_dir, device)
    synchronize = torch.cuda.synchronize if predictor.device.type == "cuda" else (lambda: None)
    rows = []
    for width, height, detections in ((640, 480, 20), (1920, 1080, 50)):
        image = decode_image(sample_jpeg(width, height), 10**8)
        found = predictor(image, score_threshold=0.0, max_detections=detections)
        timings: dict[str, list[float]] = {"gpu": [], "cpu": []}
        for _ in range(3 if quick else 10):
            synchronize()
            started = time.perf_counter()
            on_gpu = found.rle_masks()
            timings["gpu"].append(time.perf_counter() - started)
            started = time.perf_counter()
            host = Detections(found.boxes, found.scores, found.labels, found.mask_probs.cpu(), found.image_size)
            on_cpu = host.rle_masks()
            timings["cpu"].append(time.perf_counter() - started)
        differing = sum(
            int((mask_utils.decode(a) != mask_utils.decode(b)).sum()) for a, b in zip(on_gpu, on_cpu, strict=True)
        )
        row = {
            "image": f"{width}x{height}",
            "masks": len(found),
            "gpu_ms": round(1000 * statistics.median(timings["gpu"]), 2),
            "cpu_ms": round(1000 * statistics.median(timings["cpu"]), 2),
            "pixels_differing": differing,
        }
        say("pasting + RLE, one answer: " + json.dumps(row))
        rows.append(row)
    del predictor
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def serve(args: argparse.Namespace) -> int:
    import torch

    work = Path(args.work)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    trained = work / "model-path"
    model_dir = Path(trained.read_text().strip()) if trained.exists() else None
    serve_base = work / "serve"
    target = serve_base / "model"
    target.mkdir(parents=True, exist_ok=True)
    if model_dir is not None:
        for item in ("model.json", "model.safetensors"):
            shutil.copy2(model_dir / item, target / item)
        say(f"model: the AMP training job's ({model_dir})")
    else:
        from maskrcnn.model.architectures import ModelSpec, build_model, save_model

        arch = "lite" if args.quick else "resnet50_fpn"
        torch.manual_seed(0)
        sizes = (128, 256) if args.quick else (800, 1333)
        save_model(target, build_model(arch, 4, *sizes), ModelSpec(arch, ("circle", "rectangle", "triangle"), *sizes))
        say(f"model: {arch} with random weights (the training phase left none)")
    front = "nginx -> gunicorn" if shutil.which("nginx") else "gunicorn on the port itself (nginx is not installed)"
    say(f"stack: images/maskrcnn/serve, {front}; {gpus} GPU(s)")
    detections = 5 if args.quick else 20
    attributes = f"score_threshold=0,max_detections={detections}"
    body = sample_jpeg(*((320, 240) if args.quick else (640, 480)))
    requests = 5 if args.quick else 20
    log = Path(args.log_dir) / "serve.log" if args.log_dir else work / "serve.log"
    configs: list[tuple[str, dict[str, str]]] = [("defaults", {})]
    if gpus and not args.quick:
        configs += [
            ("one worker per GPU", {"SAGEMAKER_MODEL_SERVER_WORKERS": str(gpus)}),
            ("float32", {"MASKRCNN_INFERENCE_DTYPE": "float32"}),
        ]
    results = [run_config(name, target, extra, body, attributes, requests, log) for name, extra in configs]
    say(
        f"\n| configuration | workers | ready | p50 / p99 of {requests} (ms) | decode / inference / encode (ms) "
        "| req/s at 2 clients per worker | GPU memory (nvidia-smi) |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            say(f"| {r['name']} | | | failed: {r['error']} | | | |")
            continue
        say(
            f"| {r['name']} | {r['workers']} | {r['ready_s']} s | {r['p50_ms']} / {r['p99_ms']} | "
            f"{r['decode_ms']} / {r['inference_ms']} / {r['encode_ms']} | {r['req_per_s']} ({r['clients']} clients) | "
            f"{r['gpu_memory']}; +{r.get('gpu_used_delta_mib', '?')} MiB in all |"
        )
    pasting = compare_pasting(target, args.quick, "cuda:0" if gpus else "cpu")
    if args.log_dir:
        with (Path(args.log_dir) / "summary.json").open("a") as out:
            out.write(json.dumps({"phase": "serve", "gpus": gpus, "configs": results, "pasting": pasting}) + "\n")
    return 0 if all("error" not in r and r.get("errors") == 0 for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("info", "train", "serve"))
    parser.add_argument("--work", default="/tmp/gpu-check", help="scratch folder (data, jobs, the served model)")
    parser.add_argument("--log-dir", default="", help="where logs and summary.json go (the script passes $OUT)")
    parser.add_argument("--quick", action="store_true", help="seconds-long phases for a dry run on the CPU")
    parser.add_argument("--job-timeout", type=float, default=55.0, help="seconds each training job may take")
    args = parser.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    return {"info": info, "train": train, "serve": serve}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
