"""Where the image's entrypoints run: as plain processes on this machine, or in the image.

* ``process``: ``python images/maskrcnn/train`` (or ``serve``) with ``SAGEMAKER_BASE_DIR`` pointing at
  the job tree; the package must be importable (``pip install -e images/maskrcnn``).
* ``docker``: ``docker run IMAGE train`` with the tree mounted at /opt/ml, host networking (emulated
  hosts reach each other on 127.0.0.1), ``--gpus all`` on request; ``docker run -p P:8080 IMAGE serve``.
* ``auto``: docker when an engine answers and the image exists, else process.

A serverless endpoint (``serve_command(..., serverless_memory_mb=MB)``, docker mode only) runs as SageMaker
Serverless Inference runs a container: ``--read-only --tmpfs /tmp --memory MB``, the model mounted read-only.

Both run the same code on the same files, so they make the same artifacts. The docker CLI's
``docker run`` forwards SIGTERM to the container (sig-proxy), so stopping the CLI stops the job.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from maskrcnn.contract import SERVE_PORT

from local.errors import HarnessError

log = logging.getLogger(__name__)

MODES = ("auto", "process", "docker")
DEFAULT_IMAGE = "maskrcnn-sagemaker:latest"  # the tag scripts/build-image.sh builds (IMAGE overrides)
CONTAINER_BASE = "/opt/ml"
REPO = Path(__file__).resolve().parents[1]
ENTRYPOINTS = REPO / "images" / "maskrcnn"
# DataLoader workers pass batches through /dev/shm; Docker's 64 MB default is too small for them.
SHM_SIZE = "1g"
# torch's and oneDNN's choice of CPU kernels: set on the host (ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2 emulates the AVX2 class on a newer CPU), they reach the container too, so docker
# mode measures what process mode measures.
CPU_KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
# Serverless Inference's memory sizes (MemorySizeInMB): 1024 to 6144 in steps of 1024.
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)


def serverless_flags(memory_mb: int) -> tuple[str, ...]:
    """``docker run`` flags of a serverless endpoint: only /tmp writable, ``memory_mb`` of memory, no swap."""
    if memory_mb not in SERVERLESS_MEMORY_MB:
        sizes = ", ".join(str(size) for size in SERVERLESS_MEMORY_MB)
        raise HarnessError(f"--memory must be one of Serverless Inference's sizes ({sizes} MB), got {memory_mb}")
    return ("--read-only", "--tmpfs", "/tmp", "--memory", f"{memory_mb}m", "--memory-swap", f"{memory_mb}m")


@dataclass(frozen=True)
class Runtime:
    """A resolved mode plus what it needs; ``environ`` is the harness's environment, read once."""

    mode: str  # process | docker
    image: str = DEFAULT_IMAGE
    gpus: bool = False
    docker: str = "docker"
    python: str = sys.executable
    environ: Mapping[str, str] = field(default_factory=dict)

    def entrypoint(self, name: str) -> list[str]:
        """argv of the ``train`` / ``serve`` executable in process mode."""
        script = ENTRYPOINTS / name
        if script.is_file():
            return [self.python, str(script)]
        # An installed (non-editable) harness has no repo next to it: call the same function.
        main = {"train": "train_main", "serve": "serve_main"}[name]
        code = f"import sys; from maskrcnn.cli import exit_process, {main}; exit_process({main}(sys.argv[1:]))"
        return [self.python, "-c", code]

    def train_command(
        self, base: Path, env: Mapping[str, str], container_name: str
    ) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) that run ``train`` on the tree at ``base``."""
        if self.mode == "process":
            return self.entrypoint("train"), {**self.environ, **env, "SAGEMAKER_BASE_DIR": str(base)}
        argv = self._docker_run(container_name, env, "--network", "host", "-v", f"{base.resolve()}:{CONTAINER_BASE}")
        return [*argv, self.image, "train"], dict(self.environ)

    def serve_command(
        self,
        base: Path,
        port: int,
        env: Mapping[str, str],
        container_name: str,
        serverless_memory_mb: int | None = None,
        multi_model: bool = False,
    ) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) that run ``serve`` on ``base``/model, answering on ``port``; with
        ``serverless_memory_mb``, as Serverless Inference runs it (:func:`serverless_flags`); with ``multi_model``,
        ``base``/models where SageMaker puts a multi-model endpoint's models (/opt/ml/models) instead."""
        if self.mode == "process":
            if serverless_memory_mb is not None:
                raise HarnessError("--serverless needs docker mode: a read-only root file system is a container's")
            extra = {"SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(port)}
            return self.entrypoint("serve"), {**self.environ, **env, **extra}
        model = (base / "model").resolve()
        if multi_model:
            flags: tuple[str, ...] = ("-v", f"{(base / 'models').resolve()}:{CONTAINER_BASE}/models:ro")
        elif serverless_memory_mb is None:
            flags = ("-v", f"{model}:{CONTAINER_BASE}/model")
        else:
            flags = ("-v", f"{model}:{CONTAINER_BASE}/model:ro", *serverless_flags(serverless_memory_mb))
        if multi_model and serverless_memory_mb is not None:
            raise HarnessError("a serverless endpoint serves one model: --serverless or --multi-model, not both")
        argv = self._docker_run(container_name, env, "-p", f"127.0.0.1:{port}:{SERVE_PORT}", *flags)
        return [*argv, self.image, "serve"], dict(self.environ)

    def _docker_run(self, container_name: str, env: Mapping[str, str], *flags: str) -> list[str]:
        """``docker run`` up to the image: name, shared memory for loader workers, env, GPUs, ``flags``."""
        argv = [self.docker, "run", "--rm", "--name", container_name, *flags, "--shm-size", SHM_SIZE]
        kernels = {key: self.environ[key] for key in CPU_KERNEL_VARIABLES if self.environ.get(key)}
        argv += self._env_flags({**kernels, **env})
        if self.gpus:
            argv += ["--gpus", "all"]
        return argv

    def remove_container(self, name: str) -> None:
        """Best effort: a container left behind by a killed CLI."""
        if self.mode == "docker":
            subprocess.run([self.docker, "rm", "-f", name], capture_output=True, check=False, timeout=60)

    @staticmethod
    def _env_flags(env: Mapping[str, str]) -> list[str]:
        flags: list[str] = []
        for key, value in env.items():
            flags += ["-e", f"{key}={value}"]
        return flags


def start_streaming(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    """A ``train`` or ``serve`` process whose output the harness reads line by line (stderr merged), in a
    session of its own: Ctrl-C reaches the harness only, which stops its processes in order."""
    return subprocess.Popen(
        argv,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        errors="replace",
        start_new_session=True,
    )


def docker_status(image: str, docker: str = "docker") -> tuple[bool, str]:
    """(usable, why): an engine answers and ``image`` exists in it."""
    binary = shutil.which(docker)
    if binary is None:
        return False, "no docker CLI on PATH"
    try:
        result = subprocess.run(
            [binary, "image", "inspect", "--format", "{{.Id}}", image],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"docker did not answer ({exc})"
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        return False, message
    return True, f"image {image} ({result.stdout.strip()[:19]})"


def resolve(
    mode: str,
    image: str = DEFAULT_IMAGE,
    gpus: bool = False,
    environ: Mapping[str, str] | None = None,
    docker: str = "docker",
) -> Runtime:
    """Turn ``auto`` into a concrete mode; ``docker`` without engine or image fails here, not later."""
    if mode not in MODES:
        raise HarnessError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    environ = dict(os.environ if environ is None else environ)
    if mode in ("auto", "docker"):
        usable, why = docker_status(image, docker)
        if mode == "docker" and not usable:
            raise HarnessError(f"--mode docker needs a Docker engine with image {image}: {why}")
        mode = "docker" if usable else "process"
        log.info("mode %s (%s)", mode, why)
    if mode == "process" and gpus:
        log.info("--gpus has no effect in process mode: the job sees this machine's GPUs directly")
    return Runtime(mode=mode, image=image, gpus=gpus, docker=shutil.which(docker) or docker, environ=environ)


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. SO_REUSEADDR as servers set it, so that
    connections of a previous server lingering in TIME_WAIT do not count as "in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the yielded event instead of killing the harness (handlers only in the main thread).

    Enter it before telling the user what Ctrl-C does: a signal that lands between the message and
    the handlers would otherwise take the default path (KeyboardInterrupt) and lose the clean stop.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
