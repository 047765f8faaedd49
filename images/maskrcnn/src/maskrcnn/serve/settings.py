"""How the inference server runs, read once from the environment at the edge.

:meth:`ServeSettings.from_env` is called by ``serve`` (:mod:`maskrcnn.serve.supervisor`) with the process
environment and the machine's CPU and GPU counts; nothing else in the serving code reads
``os.environ``. The gunicorn child receives the resolved settings as JSON (:meth:`to_json`), so the
supervisor and every worker agree on one set of values. A wrong value fails before any traffic,
with the variable's name in the message.

Environment (SageMaker's names first, then ours):

==================================  ==========================================================
``SAGEMAKER_BASE_DIR``              root of every path (default ``/opt/ml``); model from ``model/``
``SAGEMAKER_BIND_TO_PORT``          public port (default 8080)
``SAGEMAKER_MODEL_SERVER_WORKERS``  gunicorn workers (default: see below)
``SAGEMAKER_MODEL_SERVER_TIMEOUT``  seconds one inference may take (default 60; 600 in batch; at most 3600)
``SAGEMAKER_MAX_PAYLOAD_IN_MB``     request body limit in MiB (default 6, at most 1024)
``SAGEMAKER_BATCH``                 ``true`` in batch transform
``SAGEMAKER_BATCH_STRATEGY``        reported by ``/execution-parameters`` (default SINGLE_RECORD)
``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS``  reported by ``/execution-parameters`` (default workers)
``MASKRCNN_TORCH_THREADS``          intra-op threads per worker (default cores // workers)
``MASKRCNN_DEVICE``                 ``auto`` (default), ``cpu`` or ``cuda``
``MASKRCNN_INFERENCE_DTYPE``        GPU autocast: ``auto`` (default), ``bfloat16``, ``float16``, ``float32``
``MASKRCNN_MAX_IMAGE_PIXELS``       decoded-pixel cap per image, our decompression-bomb guard
``MASKRCNN_MAX_IMAGES``             images per JSON request (default 16)
``MASKRCNN_NGINX``                  path to nginx, or ``off`` to let gunicorn listen itself
``SAGEMAKER_MULTI_MODEL``           ``true``: a multi-model endpoint (:mod:`maskrcnn.serve.multimodel`)
``MASKRCNN_MAX_MODELS``             multi-model: models loaded at once before a load is a 507 (default 0: memory only)
==================================  ==========================================================

CPU default: ``workers = min(cores, 4, workers the memory cap holds)`` and ``threads = cores // workers`` so that
workers x threads <= cores (oversubscribing cores makes every request slower and starves /ping). The memory
cap is the container's cgroup limit (``docker run --memory``, a serverless endpoint's ``MemorySizeInMB``):
``SERVE_RESERVE_BYTES`` for nginx, the supervisor and gunicorn's arbiter, then ``CPU_WORKER_BYTES`` a worker,
at least one; so a 3-GB serverless endpoint runs one worker with every core's thread.

GPU default (:func:`default_workers_per_gpu`): two workers per GPU where two fit in the smallest GPU's memory
(``GPU_WORKER_BYTES`` each, with ``GPU_RESERVE_BYTES`` left free) and the host has a core for each, else one;
worker ``slot`` runs on ``cuda:<slot % gpus>``. Each worker has one request in flight, so a GPU has
``workers_per_gpu`` requests in flight: one request's CPU part (decode, resize, RLE) overlaps the other's
forward pass, which one worker alone leaves the GPU idle for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskrcnn.contract import DEFAULT_BASE_DIR, SERVE_PORT, base_paths
from maskrcnn.errors import ConfigError

DEFAULT_PORT = SERVE_PORT
DEFAULT_TIMEOUT_S = 60  # SageMaker answers a real-time invocation within 60 s
BATCH_TIMEOUT_S = 600  # a batch-transform invocation may take up to 600 s
DEFAULT_PAYLOAD_MB = 6  # real-time request limit: 6 MiB
MAX_PAYLOAD_MB = 1024  # asynchronous inference posts S3 objects of up to 1 GB (batch transform's ceiling: 100)
MAX_TIMEOUT_S = 3600  # asynchronous inference's longest InvocationTimeoutSeconds
DEFAULT_MAX_IMAGE_PIXELS = 36_000_000  # 6000 x 6000: above any camera we expect, far below an OOM
DEFAULT_MAX_IMAGES = 16
MAX_CPU_WORKERS = 4  # beyond this, more threads per worker beat more copies of the model
MAX_WORKERS_PER_GPU = 2  # the second overlaps the first's CPU part; a third only queues on the GPU
GIB = 1024**3
# One GPU worker's device memory: CUDA context, weights, the caching allocator's peak for a full-size
# (800 x 1333) resnet50_fpn forward pass and mask pasting (docs/serving.md, "GPU serving", says how measured).
GPU_WORKER_BYTES = 3 * GIB
GPU_RESERVE_BYTES = 1 * GIB  # left free on each GPU for fragmentation and the driver
# One CPU worker's memory: resnet50_fpn's weights and a full-size forward pass (lite's worker peaks near 0.5 GiB
# with a 20-MB PNG; docs/serving.md, "Hosting modes"), and what serve's other processes take beside them.
CPU_WORKER_BYTES = 3 * GIB // 2
SERVE_RESERVE_BYTES = GIB // 2
INFERENCE_DTYPES = ("auto", "bfloat16", "float16", "float32")
GRACEFUL_TIMEOUT_S = 25  # SIGKILL follows SIGTERM after 30 s; leave room to exit cleanly
BATCH_STRATEGIES = ("SINGLE_RECORD", "MULTI_RECORD")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the server needs, resolved. Build with :meth:`from_env` or directly in tests."""

    base_dir: Path = Path(DEFAULT_BASE_DIR)
    port: int = DEFAULT_PORT
    workers: int = 1
    torch_threads: int = 1
    device: str = "cpu"  # "cpu" or "cuda"; a GPU worker takes cuda:<its slot>
    gpu_count: int = 0
    gpu_memory_bytes: int = 0  # the smallest visible GPU's total memory; 0 = unknown
    memory_bytes: int = 0  # the container's memory cap (cgroup); 0 = none
    inference_dtype: str = "auto"  # GPU autocast dtype; auto = bfloat16 where native, else float16
    timeout_s: int = DEFAULT_TIMEOUT_S
    max_payload_mb: int = DEFAULT_PAYLOAD_MB
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    nginx: str | None = None  # path to the nginx binary; None = gunicorn listens on the port itself
    batch: bool = False
    batch_strategy: str = "SINGLE_RECORD"
    max_concurrent_transforms: int = 1
    graceful_timeout_s: int = GRACEFUL_TIMEOUT_S
    multi_model: bool = False  # SAGEMAKER_MULTI_MODEL: models loaded through POST /models, none at start
    max_models: int = 0  # multi-model: loaded models at once (0 = as many as memory holds)

    @property
    def model_dir(self) -> Path:
        return self.base_dir / "model"

    @property
    def workers_per_gpu(self) -> int:
        """Workers sharing one GPU (the busiest GPU's count when workers is not a multiple); 0 on the CPU."""
        if self.device != "cuda" or self.gpu_count < 1:
            return 0
        return -(-self.workers // self.gpu_count)

    @property
    def max_payload_bytes(self) -> int:
        return self.max_payload_mb * 1024 * 1024

    @property
    def gunicorn_timeout_s(self) -> int:
        """A worker is declared hung only after the model's own deadline has passed."""
        return self.timeout_s + 5

    @property
    def nginx_timeout_s(self) -> int:
        """nginx waits longer than gunicorn, so a slow answer arrives instead of a 504."""
        return self.gunicorn_timeout_s + 5

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str],
        *,
        cpu_count: int,
        gpu_count: int = 0,
        gpu_memory_bytes: int = 0,
        memory_bytes: int = 0,
        nginx: str | None = None,
    ) -> ServeSettings:
        """Resolve settings from the environment and the machine; raise ConfigError on bad values."""
        env = {k: v.strip() for k, v in environ.items() if v.strip()}
        cpu_count = max(1, cpu_count)
        device = _device(env, gpu_count)
        workers, threads = _workers_and_threads(env, device, cpu_count, gpu_count, gpu_memory_bytes, memory_bytes)
        batch = _bool(env, "SAGEMAKER_BATCH", False)
        timeout = _int(
            env,
            "SAGEMAKER_MODEL_SERVER_TIMEOUT",
            BATCH_TIMEOUT_S if batch else DEFAULT_TIMEOUT_S,
            minimum=1,
            maximum=MAX_TIMEOUT_S,
        )
        payload = _payload_mb(env)
        strategy = _batch_strategy(env)
        dtype = _inference_dtype(env)
        nginx = _nginx(env, nginx)
        return cls(
            base_dir=base_paths(env).base,
            port=_int(env, "SAGEMAKER_BIND_TO_PORT", DEFAULT_PORT, minimum=1, maximum=65535),
            workers=workers,
            torch_threads=threads,
            device=device,
            gpu_count=gpu_count,
            gpu_memory_bytes=max(0, gpu_memory_bytes),
            memory_bytes=max(0, memory_bytes),
            inference_dtype=dtype,
            timeout_s=timeout,
            max_payload_mb=payload,
            max_image_pixels=_int(env, "MASKRCNN_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS, minimum=1),
            max_images=_int(env, "MASKRCNN_MAX_IMAGES", DEFAULT_MAX_IMAGES, minimum=1),
            nginx=nginx,
            batch=batch,
            batch_strategy=strategy,
            max_concurrent_transforms=_int(env, "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", workers, minimum=1),
            multi_model=_bool(env, "SAGEMAKER_MULTI_MODEL", False),
            max_models=_int(env, "MASKRCNN_MAX_MODELS", 0, minimum=0),
        )

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["base_dir"] = str(self.base_dir)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        data: dict[str, Any] = json.loads(text)
        data["base_dir"] = Path(data["base_dir"])
        return cls(**data)


def cpu_workers_in_memory(memory_bytes: int) -> int:
    """CPU workers a memory cap holds (``CPU_WORKER_BYTES`` each after ``SERVE_RESERVE_BYTES``), at least one;
    no cap (0) holds any number."""
    if memory_bytes <= 0:
        return MAX_CPU_WORKERS
    return max(1, (memory_bytes - SERVE_RESERVE_BYTES) // CPU_WORKER_BYTES)


def default_workers_per_gpu(gpu_memory_bytes: int, cpu_count: int, gpu_count: int) -> int:
    """Default workers per GPU: as many as fit in the GPU's memory and have a core each, 1 to 2.

    An unknown memory size (0) gets one: a second worker that does not fit fails with CUDA out of memory
    under load instead of at start.
    """
    if gpu_count < 1:
        return 0
    fit = (gpu_memory_bytes - GPU_RESERVE_BYTES) // GPU_WORKER_BYTES if gpu_memory_bytes > 0 else 1
    cores = max(1, cpu_count // gpu_count)
    return int(max(1, min(MAX_WORKERS_PER_GPU, fit, cores)))


def _device(env: Mapping[str, str], gpu_count: int) -> str:
    """``MASKRCNN_DEVICE`` resolved: auto takes the GPU where one is visible; cuda without one is an error."""
    device = env.get("MASKRCNN_DEVICE", "auto").lower()
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"MASKRCNN_DEVICE must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and gpu_count == 0:
        raise ConfigError("MASKRCNN_DEVICE=cuda but no CUDA device is visible")
    if device == "auto":
        device = "cuda" if gpu_count > 0 else "cpu"
    return device


def _workers_and_threads(
    env: Mapping[str, str], device: str, cpu_count: int, gpu_count: int, gpu_memory_bytes: int, memory_bytes: int
) -> tuple[int, int]:
    """(workers, torch threads a worker): the environment's, else the defaults in this module's docstring."""
    if device == "cuda":
        default_workers = gpu_count * default_workers_per_gpu(gpu_memory_bytes, cpu_count, gpu_count)
    else:
        default_workers = min(cpu_count, MAX_CPU_WORKERS, cpu_workers_in_memory(memory_bytes))
    workers = _int(env, "SAGEMAKER_MODEL_SERVER_WORKERS", default_workers, minimum=1)
    default_threads = max(1, cpu_count // workers) if device == "cpu" else 1
    threads = _int(env, "MASKRCNN_TORCH_THREADS", default_threads, minimum=1)
    return workers, threads


def _payload_mb(env: Mapping[str, str]) -> int:
    """``SAGEMAKER_MAX_PAYLOAD_IN_MB``, 1 to ``MAX_PAYLOAD_MB``."""
    payload = _int(env, "SAGEMAKER_MAX_PAYLOAD_IN_MB", DEFAULT_PAYLOAD_MB, minimum=1)
    if payload > MAX_PAYLOAD_MB:
        raise ConfigError(f"SAGEMAKER_MAX_PAYLOAD_IN_MB must be at most {MAX_PAYLOAD_MB}, got {payload}")
    return payload


def _batch_strategy(env: Mapping[str, str]) -> str:
    """``SAGEMAKER_BATCH_STRATEGY``, one of ``BATCH_STRATEGIES`` (any case)."""
    strategy = env.get("SAGEMAKER_BATCH_STRATEGY", "SINGLE_RECORD").upper()
    if strategy not in BATCH_STRATEGIES:
        raise ConfigError(f"SAGEMAKER_BATCH_STRATEGY must be one of {', '.join(BATCH_STRATEGIES)}")
    return strategy


def _inference_dtype(env: Mapping[str, str]) -> str:
    """``MASKRCNN_INFERENCE_DTYPE``, one of ``INFERENCE_DTYPES`` (any case)."""
    dtype = env.get("MASKRCNN_INFERENCE_DTYPE", "auto").lower()
    if dtype not in INFERENCE_DTYPES:
        raise ConfigError(f"MASKRCNN_INFERENCE_DTYPE must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    return dtype


def _nginx(env: Mapping[str, str], found: str | None) -> str | None:
    """``MASKRCNN_NGINX``: ``off`` (None: gunicorn listens itself), a path, else the nginx ``found`` on PATH."""
    choice = env.get("MASKRCNN_NGINX", "")
    if choice.lower() == "off":
        return None
    return choice or found


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")
