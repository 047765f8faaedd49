"""Full serving stack (client -> nginx -> gunicorn -> Flask -> model) against the bare Predictor.

One run, same machine, same model, same image, same per-request options:

Alternating rounds of:

1. baseline: ``workers`` processes, each with its own in-process :class:`Predictor` (same torch
   threads as a server worker), calling it in a closed loop on an already-decoded image;
2. server: a real ``serve`` with ``workers`` workers; ``workers`` client threads POST the JPEG in a
   closed loop (keep-alive);

then one phase with 2 x ``workers`` clients while another thread GETs /ping every 20 ms.

Prints throughput of both and the ratio (floor 0.95x), p50 latency of both and the overhead
(ceiling 5 ms), and /ping p50/p99 while saturated (ceiling 100 ms). The server's work is a
superset of the baseline's: it also decodes the JPEG and encodes the masks as RLE JSON.

    .venv/bin/python bench/bench_serving.py [--seconds 30] [--rounds 6] [--workers N] [--detections 10]
"""

from __future__ import annotations

import argparse
import http.client
import io
import logging
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "images" / "maskrcnn" / "serve"


def make_model(model_dir: Path, min_size: int = 256, max_size: int = 512) -> Path:
    """A lite model with random weights (inference cost does not depend on training)."""
    import torch
    from maskrcnn.model.architectures import ModelSpec, build_model, save_model

    torch.manual_seed(0)
    model = build_model("lite", 4, min_size, max_size)
    save_model(model_dir, model, ModelSpec("lite", ("circle", "rectangle", "triangle"), min_size, max_size))
    return model_dir


def sample_jpeg(size: int = 256) -> bytes:
    from maskrcnn.train.synthetic import make_sample

    image, _ = make_sample(np.random.default_rng(0), size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    base_dir: Path, port: int, env_extra: dict[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update({"SAGEMAKER_BASE_DIR": str(base_dir), "SAGEMAKER_BIND_TO_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    env.update(env_extra or {})
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, str(SERVE)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_ready(port: int, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until GET /ping answers 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no 200 on /ping within {timeout} s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=35)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _baseline_worker(
    model_dir: str,
    threads: int,
    jpeg: bytes,
    options: tuple[float, int],
    seconds: float,
    rounds: int,
    go: Any,
    queue: Any,
) -> None:
    import torch
    from maskrcnn.serve.codec import decode_image
    from maskrcnn.serve.predictor import Predictor

    torch.set_num_interop_threads(1)
    predictor = Predictor.load(Path(model_dir), "cpu", threads=threads)
    image = decode_image(jpeg, 10**8)
    queue.put("ready")
    for round_index in range(rounds):
        go[round_index].wait()
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            predictor(image, *options)
            latencies.append(time.perf_counter() - t)
        queue.put(latencies)


class Baseline:
    """``workers`` in-process predictors that run one timed phase each time they are told to."""

    def __init__(
        self,
        model_dir: Path,
        workers: int,
        threads: int,
        jpeg: bytes,
        options: tuple[float, int],
        seconds: float,
        rounds: int,
    ):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.go = [ctx.Event() for _ in range(rounds)]
        self.seconds = seconds
        self.procs = [
            ctx.Process(
                target=_baseline_worker,
                args=(str(model_dir), threads, jpeg, options, seconds, rounds, self.go, self.queue),
            )
            for _ in range(workers)
        ]
        for proc in self.procs:
            proc.start()
        for _ in self.procs:
            self.queue.get()  # each one loaded and warm
        self.round = 0

    def phase(self) -> list[float]:
        self.go[self.round].set()
        self.round += 1
        return [lat for _ in self.procs for lat in self.queue.get()]

    def close(self) -> None:
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _process_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds so far) for every process /proc lists."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) / tick)
    return table


def stack_cpu(root: int) -> dict[str, float]:
    """CPU seconds used so far by ``serve`` (pid ``root``) and its descendants, by role."""
    table = _process_table()
    roles: dict[str, float] = {"workers": 0.0, "nginx": 0.0, "serve + gunicorn arbiter": 0.0}
    for pid, (_, cmdline, cpu) in table.items():
        chain, parent = [], pid
        while parent in table and parent != root and parent > 1:
            chain.append(parent)
            parent = table[parent][0]
        if parent != root and pid != root:
            continue
        if "nginx" in cmdline:
            roles["nginx"] += cpu
        elif "maskrcnn.serve.wsgi" in cmdline and len(chain) >= 2:  # forked by the arbiter
            roles["workers"] += cpu
        else:
            roles["serve + gunicorn arbiter"] += cpu
    return roles


def server_timing(header: str | None) -> dict[str, float]:
    """``decode;dur=0.41, inference;dur=80.2, ...`` -> {"decode": 0.00041, ...} in seconds."""
    parts = (item.strip().split(";dur=") for item in (header or "").split(",") if ";dur=" in item)
    return {name: float(ms) / 1000 for name, ms in parts}


def run_server_load(
    port: int,
    clients: int,
    jpeg: bytes,
    attributes: str,
    seconds: float,
    ping_every: float,
    timings: list[dict[str, float]] | None = None,
) -> tuple[float, list[float], list[float], int]:
    """Closed-loop clients for ``seconds``; returns (req/s, latencies, ping latencies, errors).

    With ``timings``, each answer's Server-Timing (decode, inference, encode) is appended to it.
    """
    latencies: list[float] = []
    pings: list[float] = []
    errors = [0]
    stop = threading.Event()
    headers = {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": attributes}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop.is_set():
            t = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body=jpeg, headers=headers)
                response = response_ok = conn.getresponse()
                response.read()
                response_ok = response.status == 200
                if timings is not None and not stop.is_set():
                    timings.append(server_timing(response.getheader("Server-Timing")))
            except OSError:
                response_ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            if not stop.is_set():
                latencies.append(time.perf_counter() - t)
                if not response_ok:
                    errors[0] += 1

    def pinger() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/ping")
                ok = conn.getresponse().status == 200
                conn.close()
            except OSError:
                ok = False
            pings.append(time.perf_counter() - t if ok else float("inf"))
            time.sleep(ping_every)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    threads.append(threading.Thread(target=pinger))
    warmup = 1.0  # let every worker take a request before measuring
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    latencies.clear()
    pings.clear()
    if timings is not None:
        timings.clear()
    errors[0] = 0
    time.sleep(seconds)
    count = len(latencies)
    stop.set()
    for thread in threads:
        thread.join()
    return count / seconds, latencies[:count], pings, errors[0]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    print(hostinfo.describe(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per side, all rounds")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ping-seconds", type=float, default=10.0, help="saturated phase that measures /ping")
    parser.add_argument("--workers", type=int, default=0, help="default: what serve picks on this machine")
    parser.add_argument("--detections", type=int, default=10, help="detections per answer (score_threshold=0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from maskrcnn.serve.settings import ServeSettings
    from maskrcnn.serve.supervisor import cpu_count

    settings = ServeSettings.from_env(
        {"SAGEMAKER_MODEL_SERVER_WORKERS": str(args.workers)} if args.workers else {}, cpu_count=cpu_count()
    )
    workers, threads = settings.workers, settings.torch_threads
    jpeg = sample_jpeg(args.size)
    options = (0.0, args.detections)
    attributes = f"score_threshold=0.0,max_detections={args.detections}"

    # Alternating rounds (baseline, server, baseline, ...) so that other load on the machine
    # falls on both alike; the idle side costs nothing while the other runs.
    phase = args.seconds / args.rounds
    base_lat: list[float] = []
    lat: list[float] = []
    pings: list[float] = []
    timings: list[dict[str, float]] = []
    errors = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_model(base / "model")
        baseline = Baseline(base / "model", workers, threads, jpeg, options, phase, args.rounds)
        port = free_port()
        server = start_server(
            base,
            port,
            {"SAGEMAKER_MODEL_SERVER_WORKERS": str(workers), "MASKRCNN_TORCH_THREADS": str(threads)},
            base / "serve.log",
        )
        try:
            wait_ready(port, process=server)
            cpu: dict[str, float] = {}
            for _ in range(args.rounds):
                base_lat += baseline.phase()
                before, client_before, wall_before = stack_cpu(server.pid), time.process_time(), time.perf_counter()
                # Throughput rounds ping rarely: each ping costs the CPU-bound workers a little.
                round_timings: list[dict[str, float]] = []
                _, round_lat, _, round_errors = run_server_load(
                    port, workers, jpeg, attributes, phase, 1.0, round_timings
                )
                timings += round_timings
                after = stack_cpu(server.pid)
                for role, seconds in after.items():
                    cpu[role] = cpu.get(role, 0.0) + seconds - before[role]
                cpu["load generator (this process)"] = (
                    cpu.get("load generator (this process)", 0.0) + time.process_time() - client_before
                )
                cpu["wall"] = cpu.get("wall", 0.0) + time.perf_counter() - wall_before
                lat += round_lat
                errors += round_errors
            # Then saturate with twice as many clients as workers and ping every 20 ms.
            saturated_rps, _, pings, round_errors = run_server_load(
                port, 2 * workers, jpeg, attributes, args.ping_seconds, 0.02
            )
            errors += round_errors
        finally:
            stop_server(server)
            baseline.close()
    base_rps = len(base_lat) / args.seconds
    rps = len(lat) / args.seconds

    print(
        f"machine: {cpu_count()} CPUs; {workers} worker(s) x {threads} torch thread(s); "
        f"{args.size}px JPEG, {args.detections} detections per answer; "
        f"{args.seconds:g} s per side in {args.rounds} rounds"
    )
    print(f"bare predictor in-process : {base_rps:7.2f} img/s   p50 {1000 * statistics.median(base_lat):7.1f} ms")
    print(
        f"full stack via nginx      : {rps:7.2f} req/s   p50 {1000 * statistics.median(lat):7.1f} ms   errors {errors}"
    )
    names = timings[0] if timings else {}
    inside = {name: 1000 * statistics.median(t.get(name, 0.0) for t in timings) for name in names}
    print(
        "inside the worker (Server-Timing, p50)    : "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in inside.items())
        + f"; the rest of the p50 (HTTP, nginx, gunicorn, Flask, client) "
        f"{1000 * statistics.median(lat) - sum(inside.values()):.1f} ms"
    )
    if "inference" in inside:
        print(
            f"forward in a server worker / bare predictor forward (p50): "
            f"{inside['inference'] / (1000 * statistics.median(base_lat)):.3f}"
        )
    capacity = cpu.pop("wall") * cpu_count()
    shares = ", ".join(f"{role} {seconds / capacity:.1%}" for role, seconds in cpu.items())
    print(f"CPU during full-stack rounds (share of {cpu_count()} cores) : {shares}")
    ratio = rps / base_rps
    overhead = 1000 * (statistics.median(lat) - statistics.median(base_lat))
    ping_p50, ping_p99 = 1000 * pct(pings, 0.5), 1000 * pct(pings, 0.99)
    print(f"throughput ratio          : {ratio:.3f}x  (floor 0.95x)  {'OK' if ratio >= 0.95 else 'BELOW'}")
    # With one client per worker a worker may idle while its answer travels back; with two, nginx holds the next
    # request ready. Printed to tell the two apart (docs/serving.md: on Zen 5 it was lower, not higher).
    print(
        f"saturated ({2 * workers} clients)     : {saturated_rps:7.2f} req/s, "
        f"{saturated_rps / base_rps:.3f}x of the bare predictor (with /ping every 20 ms)"
    )
    print(f"p50 latency overhead      : {overhead:.1f} ms (ceiling 5 ms)  {'OK' if overhead <= 5 else 'ABOVE'}")
    print(
        f"/ping while saturated     : p50 {ping_p50:.1f} ms  p99 {ping_p99:.1f} ms over {len(pings)} pings "
        f"(ceiling p99 100 ms)  {'OK' if ping_p99 <= 100 else 'ABOVE'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
