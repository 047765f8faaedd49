"""``python -m local serve --serverless --memory MB``: the image as Serverless Inference runs it, cold start printed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO

from local import client
from local import runtime as rt
from local.errors import HarnessError


@pytest.mark.unit
def test_serverless_docker_run_is_read_only_but_tmp_with_the_memory_cap(tmp_path: Path) -> None:
    runtime = rt.Runtime(mode="docker", image="img:1", docker="docker", environ={})
    argv, _ = runtime.serve_command(tmp_path, 8080, {}, "s", serverless_memory_mb=3072)
    assert "--read-only" in argv and argv[argv.index("--tmpfs") + 1] == "/tmp"
    assert argv[argv.index("--memory") + 1] == "3072m" and argv[argv.index("--memory-swap") + 1] == "3072m"
    assert f"{(tmp_path / 'model').resolve()}:/opt/ml/model:ro" in argv
    assert argv[-2:] == ["img:1", "serve"]
    plain, _ = runtime.serve_command(tmp_path, 8080, {}, "s")
    assert "--read-only" not in plain and f"{(tmp_path / 'model').resolve()}:/opt/ml/model" in plain


@pytest.mark.unit
def test_serverless_refuses_process_mode_and_other_memory_sizes(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="docker mode"):
        rt.Runtime(mode="process", environ={}).serve_command(tmp_path, 8080, {}, "s", serverless_memory_mb=3072)
    with pytest.raises(HarnessError, match="1024, 2048"):
        rt.serverless_flags(3000)
    assert rt.serverless_flags(6144)[-3:] == ("6144m", "--memory-swap", "6144m")


@pytest.mark.container
def test_serve_serverless_prints_the_cold_start_and_answers(docker_image, trained_job, dataset, tmp_path) -> None:
    """The CLI starts ``docker run --read-only --tmpfs /tmp --memory 3072m``, prints the cold start, serves."""
    port = rt.free_port()
    argv = [sys.executable, "-m", "local", "serve", "--model", str(trained_job.model_archive), "--port", str(port)]
    argv += ["--mode", "docker", "--image", docker_image, "--serverless", "--memory", "3072"]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen = time.monotonic() + 240, []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            seen.append(line)
            if "(Ctrl-C stops)" in line or not line:
                break
        cold = [line for line in seen if line.startswith("serverless, 3072 MB")]
        assert cold and "cold start" in cold[0], "".join(seen[-30:])
        seconds = float(cold[0].split("cold start ")[1].split(" s")[0])
        assert 0 < seconds < 180
        inspect = subprocess.run(
            ["docker", "inspect", "--format", "{{json .HostConfig}}", *_containers_on(port)],
            capture_output=True,
            text=True,
            check=True,
        )
        host = json.loads(inspect.stdout)
        assert host["ReadonlyRootfs"] is True and host["Memory"] == 3072 * 1024 * 1024 and "/tmp" in host["Tmpfs"]
        image = sorted((dataset / "images").glob("*.png"))[0]
        reply = client.invoke(f"http://127.0.0.1:{port}", image.read_bytes(), "image/png")
        assert reply.ok, reply.message()
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, rest[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _containers_on(port: int) -> list[str]:
    """The container publishing ``port`` (the endpoint's)."""
    out = subprocess.run(
        ["docker", "ps", "--filter", f"publish={port}", "--format", "{{.ID}}"], capture_output=True, text=True
    ).stdout.split()
    assert len(out) == 1, out
    return out
