"""Cold start: seconds from starting `serve` to the first 200 on /ping, and where they go.

Starts `serve` (nginx in front when installed) on a fresh base directory several times and
reports each run and the median; the phases come from serve's own log lines (gunicorn started,
model loaded, warm-up done). SageMaker allows 4-8 minutes (ContainerStartupHealthCheckTimeout).

    .venv/bin/python bench/bench_cold_start.py [--runs 3] [--workers N]
    .venv/bin/python bench/bench_cold_start.py --serverless [--image TAG] [--memory 3072]

``--serverless`` measures what a serverless endpoint bills as ``ModelSetupTime``: from ``docker run`` to the
first 200 on /ping, the container started as Serverless Inference starts it (``--read-only --tmpfs /tmp
--memory MB``, the model mounted read-only; ``local.runtime.serverless_flags``), the image's own code.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)
from bench_serving import free_port, make_model, start_server, stop_server


def first_200(port: int, process, timeout: float = 300.0) -> float:
    import http.client

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("no 200 on /ping")


def serverless_run(image: str, model_dir: Path, memory_mb: int, log_path: Path) -> float:
    """One cold start of ``docker run <serverless flags> IMAGE serve``: seconds to the first 200 on /ping."""
    from local.runtime import serverless_flags

    port = free_port()
    name = f"bench-cold-start-{port}"
    argv = ["docker", "run", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8080"]
    argv += ["-v", f"{model_dir.resolve()}:/opt/ml/model:ro", *serverless_flags(memory_mb), image, "serve"]
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            return first_200(port, process) - started
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
            process.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    print(hostinfo.describe(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="default: what serve picks")
    parser.add_argument("--serverless", action="store_true", help="docker run as Serverless Inference runs it")
    parser.add_argument("--image", default="maskrcnn-sagemaker:latest", help="--serverless: the image")
    parser.add_argument("--memory", type=int, default=3072, help="--serverless: MemorySizeInMB")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_model(base / "model")
        (base / "model").chmod(0o755)
        for path in (base / "model").iterdir():
            path.chmod(0o644)  # the container's user reads the mounted model
        if args.serverless:
            for run in range(args.runs):
                log_path = base / f"serverless-{run}.log"
                ready = serverless_run(args.image, base / "model", args.memory, log_path)
                lines = log_path.read_text(errors="replace").splitlines()
                # serve's start line: "... on port 8080: 1 worker(s) x 2 torch thread(s) on cpu, timeout ..."
                serving = [line for line in lines if " worker(s) x " in line]
                workers = serving[0].split(": ")[-1].split(", timeout")[0] if serving else "?"
                print(f"run {run + 1}: docker run -> first 200 on /ping after {ready:.2f} s ({workers})")
                results.append(ready)
            print(
                f"serverless cold start ({args.image}, --read-only --tmpfs /tmp --memory {args.memory}m; "
                f"ModelSetupTime): median {statistics.median(results):.2f} s, min {min(results):.2f} s, "
                f"max {max(results):.2f} s over {len(results)} runs"
            )
            return 0
        for run in range(args.runs):
            port = free_port()
            env = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(args.workers)} if args.workers else {}
            log_path = base / f"serve-{run}.log"
            started = time.perf_counter()
            process = start_server(base, port, env, log_path)
            try:
                ready = first_200(port, process) - started
            finally:
                stop_server(process)
            lines = log_path.read_text(errors="replace").splitlines()
            loaded = [line for line in lines if "loaded on" in line]
            warm = [line for line in lines if "warm-up inference took" in line]
            print(
                f"run {run + 1}: first 200 on /ping after {ready:.2f} s "
                f"({len(loaded)} worker(s) loaded; "
                f"{warm[0].split('took')[-1].strip() if warm else '?'} warm-up)"
            )
            results.append(ready)
    print(
        f"cold start (serve -> first 200 on /ping): median {statistics.median(results):.2f} s, "
        f"min {min(results):.2f} s, max {max(results):.2f} s over {len(results)} runs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
