"""Full serving stack (client -> nginx -> gunicorn -> Flask -> model) against the bare Predictor.

One run, same machine, same model, same image, same per-request options. Alternating rounds of:

1. baseline: ``workers`` processes, each with its own in-process :class:`Predictor` (same torch
   threads as a server worker), calling it in a closed loop on an already-decoded image;
2. server, one client per worker: a real ``serve`` with ``workers`` workers; ``workers`` client
   threads POST the JPEG in a closed loop (keep-alive). Latency is the stack's own here, but each
   worker idles while its answer goes back and the next request comes in;
3. server, two clients per worker: a request always waits at nginx, so no worker idles; this is the
   stack's capacity, the throughput the floor (0.95x of the baseline) applies to;

then one phase with two clients per worker while another thread GETs /ping every 20 ms.

Prints throughput of each side and the ratios, as the median of the rounds' ratios (the verdict: robust to
another process busy during a round) and all rounds together (runs of the same code on one 2-core VM move by
several per cent: read the spread before a single figure), p50 latency of both
and the overhead (ceiling 5 ms), the forward pass inside a worker against the bare one, minor page
faults per image on each side, where the CPU went, and /ping p50/p99 while saturated (ceiling
100 ms). The server's work is a superset of the baseline's: it also decodes the JPEG and encodes
the masks as RLE JSON. ``--glibc-malloc-defaults`` runs both sides without
:mod:`maskrcnn.serve.allocator`, to see what keeping freed memory buys.

    .venv/bin/python bench/bench_serving.py [--seconds 60] [--rounds 12] [--workers N] [--detections 10]
"""

from __future__ import annotations

import argparse
import http.client
import io
import logging
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
import numpy as np

from local.runtime import ENTRYPOINTS, free_port  # local/ is importable: installed or on PYTHONPATH

SERVE = ENTRYPOINTS / "serve"


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
    index: int,
    model_dir: str,
    threads: int,
    jpeg: bytes,
    options: tuple[float, int],
    seconds: float,
    rounds: int,
    go: Any,
    queue: Any,
) -> None:
    import resource

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
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            predictor(image, *options)
            latencies.append(time.perf_counter() - t)
        # The last call started before the deadline and ended after it: the round's rate is its calls over the
        # time they took, not over `seconds` (that would count about half a call a round too many).
        elapsed = time.perf_counter() - started
        queue.put((index, latencies, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, elapsed))


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
                args=(index, str(model_dir), threads, jpeg, options, seconds, rounds, self.go, self.queue),
            )
            for index in range(workers)
        ]
        self.calls = [0] * workers
        self.elapsed = [0.0] * workers
        for proc in self.procs:
            proc.start()
        for _ in self.procs:
            self.queue.get()  # each one loaded and warm
        self.round = 0

    def phase(self) -> tuple[list[float], int, float]:
        """Every call's latency in this round, the minor page faults of all the processes, and the round's
        throughput: each process's calls over the time they took, summed."""
        self.go[self.round].set()
        self.round += 1
        latencies, faults, rate = [], 0, 0.0
        for _ in self.procs:
            index, round_latencies, round_faults, elapsed = self.queue.get()
            latencies += round_latencies
            faults += round_faults
            rate += len(round_latencies) / elapsed
            self.calls[index] += len(round_latencies)
            self.elapsed[index] += elapsed
        return latencies, faults, rate

    def rate(self) -> float:
        """Throughput over all rounds: each process's calls over the time they took, summed."""
        return sum(calls / max(elapsed, 1e-9) for calls, elapsed in zip(self.calls, self.elapsed, strict=True))

    def close(self) -> None:
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _process_table() -> dict[int, tuple[int, str, float, int]]:
    """pid -> (parent pid, command line, CPU seconds so far, minor page faults so far) for every process."""
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
        table[int(entry.name)] = (
            int(fields[1]),
            cmdline,
            (int(fields[11]) + int(fields[12])) / tick,
            int(fields[7]),
        )
    return table


def stack_usage(root: int) -> tuple[dict[str, float], int]:
    """CPU seconds used so far by ``serve`` (pid ``root``) and its descendants, by role, and the workers'
    minor page faults so far."""
    table = _process_table()
    roles: dict[str, float] = {"workers": 0.0, "nginx": 0.0, "serve + gunicorn arbiter": 0.0}
    faults = 0
    for pid, (_, cmdline, cpu, minflt) in table.items():
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
            faults += minflt
        else:
            roles["serve + gunicorn arbiter"] += cpu
    return roles, faults


def server_timing(header: str | None) -> dict[str, float]:
    """``decode;dur=0.41, inference;dur=80.2, ...`` -> {"decode": 0.00041, ...} in seconds."""
    parts = (item.strip().split(";dur=") for item in (header or "").split(",") if ";dur=" in item)
    return {name: float(ms) / 1000 for name, ms in parts}


class KeepAliveClient:
    """One keep-alive connection that sends a prebuilt request and reads each answer by its Content-Length.

    The load generator shares the two cores with the stack, so its own CPU time is taken from the server's:
    http.client parses every response's headers with the email package, and this costs a fraction of it
    (the load generator process: 0.21 against 0.45 ms of CPU a request, 4 clients, 2 workers). It checks the
    status line; a response without Content-Length (which nginx always sends here) is an error.
    """

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.pending = b""

    def call(self, request: bytes) -> tuple[int, dict[str, str]]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            self.pending = b""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.pending:
            self.pending += self._recv()
        head, _, body = self.pending.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines[1:])}
        length = int(headers["content-length"])
        while len(body) < length:
            body += self._recv()
        self.pending = body[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), headers

    def _recv(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def invocation_request(port: int, jpeg: bytes, attributes: str) -> bytes:
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
        f"X-Amzn-SageMaker-Custom-Attributes: {attributes}\r\nContent-Length: {len(jpeg)}\r\n\r\n"
    )
    return head.encode("latin-1") + jpeg


def _load_client(
    port: int,
    request: bytes,
    stop: threading.Event,
    latencies: list[float],
    errors: list[int],
    timings: list[dict[str, float]] | None,
) -> None:
    """One closed-loop client on a kept-alive connection until ``stop``: latencies, failures in ``errors[0]``."""
    conn = KeepAliveClient(port)
    while not stop.is_set():
        t = time.perf_counter()
        try:
            status, headers = conn.call(request)
            response_ok = status == 200
            if timings is not None and not stop.is_set():
                timings.append(server_timing(headers.get("server-timing")))
        except (OSError, ValueError, KeyError, IndexError):
            response_ok = False
            conn.close()
        if not stop.is_set():
            latencies.append(time.perf_counter() - t)
            if not response_ok:
                errors[0] += 1


def _pinger(port: int, stop: threading.Event, pings: list[float], ping_every: float) -> None:
    """GET /ping every ``ping_every`` seconds until ``stop``: each answer's latency, inf for a failed one."""
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
    request = invocation_request(port, jpeg, attributes)
    threads = [
        threading.Thread(target=_load_client, args=(port, request, stop, latencies, errors, timings))
        for _ in range(clients)
    ]
    threads.append(threading.Thread(target=_pinger, args=(port, stop, pings, ping_every)))
    warmup = 0.5  # let every worker take a request before measuring
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


@dataclass
class ServerSide:
    """What the full stack did in its rounds at one number of clients."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    round_counts: list[int] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0

    def run_round(self, port: int, jpeg: bytes, attributes: str, seconds: float) -> None:
        # Rounds ping once a second (as a load balancer would), not more: each ping costs the busy workers.
        round_timings: list[dict[str, float]] = []
        _, latencies, _, errors = run_server_load(port, self.clients, jpeg, attributes, seconds, 1.0, round_timings)
        self.latencies += latencies
        self.round_counts.append(len(latencies))
        self.timings += round_timings
        self.errors += errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (the module docstring is its manual)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per side, all rounds")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--ping-seconds", type=float, default=10.0, help="saturated phase that measures /ping")
    parser.add_argument("--workers", type=int, default=0, help="default: what serve picks on this machine")
    parser.add_argument("--detections", type=int, default=10, help="detections per answer (score_threshold=0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument(
        "--glibc-malloc-defaults",
        action="store_true",
        help="both sides with glibc's own malloc thresholds (maskrcnn.serve.allocator not applied)",
    )
    return parser.parse_args(argv)


@dataclass
class Measured:
    """Both sides over all rounds, then /ping while the stack is saturated."""

    round_seconds: float  # each side's share of one round
    # One client per worker: no request ever waits for a worker, so latency is the stack's own; but each
    # worker idles while its answer goes back and the next request comes in (client and nginx share the cores).
    paced: ServerSide
    # Two per worker: a request always waits at nginx, so a worker never idles: the stack's capacity.
    saturated: ServerSide
    base_latencies: list[float] = field(default_factory=list)
    base_rates: list[float] = field(default_factory=list)  # each round's
    base_faults: int = 0
    base_rps: float = 0.0  # all rounds together
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by role in the paced rounds, and "wall"
    worker_faults: int = 0  # the server workers' minor page faults in the paced rounds
    pings: list[float] = field(default_factory=list)
    ping_errors: int = 0

    @property
    def errors(self) -> int:
        return self.paced.errors + self.saturated.errors + self.ping_errors


def measure(args: argparse.Namespace, workers: int, threads: int) -> Measured:
    """Alternating rounds (baseline, server at one client per worker, server at two, baseline, ...) so that
    other load on the machine falls on all alike; the idle side costs nothing while another runs."""
    jpeg = sample_jpeg(args.size)
    attributes = f"score_threshold=0.0,max_detections={args.detections}"
    measured = Measured(args.seconds / args.rounds, ServerSide(workers), ServerSide(2 * workers))
    phase = measured.round_seconds
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_model(base / "model")
        baseline = Baseline(base / "model", workers, threads, jpeg, (0.0, args.detections), phase, args.rounds)
        port = free_port()
        server = start_server(
            base,
            port,
            {"SAGEMAKER_MODEL_SERVER_WORKERS": str(workers), "MASKRCNN_TORCH_THREADS": str(threads)},
            base / "serve.log",
        )
        try:
            wait_ready(port, process=server)
            for _ in range(args.rounds):
                round_base_lat, round_base_faults, round_base_rate = baseline.phase()
                measured.base_latencies += round_base_lat
                measured.base_rates.append(round_base_rate)
                measured.base_faults += round_base_faults
                paced_round(measured, server.pid, port, jpeg, attributes)
                measured.saturated.run_round(port, jpeg, attributes, phase)
            # Then saturate and ping every 20 ms: /ping must answer fast while every worker is busy.
            _, _, measured.pings, measured.ping_errors = run_server_load(
                port, 2 * workers, jpeg, attributes, args.ping_seconds, 0.02
            )
        finally:
            stop_server(server)
            baseline.close()
    measured.base_rps = baseline.rate()
    return measured


def paced_round(measured: Measured, server_pid: int, port: int, jpeg: bytes, attributes: str) -> None:
    """One round at one client per worker, adding where the CPU went (each role of the stack, this process's
    load generator, the wall time) and the workers' minor page faults to ``measured``."""
    cpu = measured.cpu
    (before, faults_before), client_before = stack_usage(server_pid), time.process_time()
    wall_before = time.perf_counter()
    measured.paced.run_round(port, jpeg, attributes, measured.round_seconds)
    after, faults_after = stack_usage(server_pid)
    for role, seconds in after.items():
        cpu[role] = cpu.get(role, 0.0) + seconds - before[role]
    measured.worker_faults += faults_after - faults_before
    cpu["load generator (this process)"] = (
        cpu.get("load generator (this process)", 0.0) + time.process_time() - client_before
    )
    cpu["wall"] = cpu.get("wall", 0.0) + time.perf_counter() - wall_before


def print_sides(args: argparse.Namespace, workers: int, threads: int, cpus: int, measured: Measured) -> None:
    """The settings, then each side's throughput and p50 latency."""
    print(
        f"machine: {cpus} CPUs; {workers} worker(s) x {threads} torch thread(s); "
        f"{args.size}px JPEG, {args.detections} detections per answer; "
        f"{args.seconds:g} s per side in {args.rounds} rounds; errors {measured.errors}"
    )
    base_p50 = 1000 * statistics.median(measured.base_latencies)
    print(f"bare predictor in-process         : {measured.base_rps:7.2f} img/s   p50 {base_p50:7.1f} ms")
    for side in (measured.paced, measured.saturated):
        print(
            f"full stack, {side.clients} clients ({side.clients // workers} per worker): "
            f"{len(side.latencies) / args.seconds:7.2f} req/s   p50 {1000 * statistics.median(side.latencies):7.1f} ms"
        )


def print_costs(cpus: int, measured: Measured) -> None:
    """Where a request's time went inside the worker, the forward pass against the bare one, page faults, CPU."""
    paced, base_lat = measured.paced, measured.base_latencies
    timings = paced.timings
    names = timings[0] if timings else {}
    inside = {name: 1000 * statistics.median(t.get(name, 0.0) for t in timings) for name in names}
    print(
        "inside the worker (Server-Timing, p50, one client per worker): "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in inside.items())
        + f"; the rest of the p50 (HTTP, nginx, gunicorn, Flask, client) "
        f"{1000 * statistics.median(paced.latencies) - sum(inside.values()):.1f} ms"
    )
    if "inference" in inside:
        # Throughput follows the mean, and a few slow calls move it where the p50 does not.
        forward_mean = statistics.mean(t["inference"] for t in timings + measured.saturated.timings)
        print(
            f"forward in a server worker / bare predictor forward: p50 "
            f"{inside['inference'] / (1000 * statistics.median(base_lat)):.3f}, "
            f"mean {forward_mean / statistics.mean(base_lat):.3f}"
        )
    # Each minor fault maps a fresh page (zeroed by the kernel): memory given back to the system and taken again.
    print(
        f"minor page faults per image : bare predictor {measured.base_faults / len(base_lat):.0f}, "
        f"server worker {measured.worker_faults / len(paced.latencies):.0f}"
    )
    cpu = dict(measured.cpu)
    capacity = cpu.pop("wall") * cpus
    shares = ", ".join(f"{role} {seconds / capacity:.1%}" for role, seconds in cpu.items())
    print(f"CPU, one client per worker (share of {cpus} cores) : {shares}")


def print_verdicts(args: argparse.Namespace, measured: Measured) -> None:
    """Throughput ratios (floor 0.95x at capacity), the p50 overhead (ceiling 5 ms), /ping (ceiling p99 100 ms)."""
    paced, saturated = measured.paced, measured.saturated
    # The verdict reads the median of the rounds' ratios: another process busy for a few seconds (a test run, a
    # package install) falls on one side of one round and moves the all-rounds total by a per cent or more;
    # the median is robust to that. A cost of the stack's own comes in every round and moves the median too.
    for side, label in ((paced, "one client per worker"), (saturated, "capacity (2 per worker)")):
        # The stack's side counts the answers completed inside each round's window of `round_seconds`.
        ratio = len(side.latencies) / args.seconds / measured.base_rps
        rounds = [
            count / measured.round_seconds / base
            for count, base in zip(side.round_counts, measured.base_rates, strict=True)
        ]
        median = statistics.median(rounds)
        verdict = f"(floor 0.95x)  {'OK' if median >= 0.95 else 'BELOW'}" if side is saturated else ""
        off = sum(1 for r in rounds if abs(r - median) > 0.1 * median)
        print(
            f"throughput ratio, {label:24s}: {median:.3f}x, the median of {len(rounds)} rounds  {verdict}\n"
            f"  all rounds together {ratio:.3f}x; rounds from {min(rounds):.3f}x to {max(rounds):.3f}x"
            + (f"; {off} more than 10 % off the median (another process on the machine?)" if off else "")
        )
    overhead = 1000 * (statistics.median(paced.latencies) - statistics.median(measured.base_latencies))
    ping_p50, ping_p99 = 1000 * pct(measured.pings, 0.5), 1000 * pct(measured.pings, 0.99)
    print(f"p50 latency overhead      : {overhead:.1f} ms (ceiling 5 ms)  {'OK' if overhead <= 5 else 'ABOVE'}")
    print(
        f"/ping while saturated     : p50 {ping_p50:.1f} ms  p99 {ping_p99:.1f} ms over {len(measured.pings)} pings "
        f"(ceiling p99 100 ms)  {'OK' if ping_p99 <= 100 else 'ABOVE'}"
    )


def main(argv: list[str] | None = None) -> int:
    print(hostinfo.describe(), flush=True)
    args = parse_args(argv)
    if args.glibc_malloc_defaults:
        # Any glibc.malloc tunable makes keep_freed_memory leave malloc alone; 7 is tcache_count's default.
        # Set here, it reaches the baseline processes and the server alike.
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.tcache_count=7"
    logging.basicConfig(level=logging.WARNING)

    from maskrcnn.serve.settings import ServeSettings
    from maskrcnn.serve.supervisor import cpu_count

    settings = ServeSettings.from_env(
        {"SAGEMAKER_MODEL_SERVER_WORKERS": str(args.workers)} if args.workers else {}, cpu_count=cpu_count()
    )
    workers, threads = settings.workers, settings.torch_threads
    measured = measure(args, workers, threads)
    print_sides(args, workers, threads, cpu_count(), measured)
    print_costs(cpu_count(), measured)
    print_verdicts(args, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
