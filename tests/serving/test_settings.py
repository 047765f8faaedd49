"""ServeSettings, gunicorn options and the nginx config: resolved from plain dicts, no processes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from maskrcnn.errors import ConfigError, ModelError
from maskrcnn.model.format import FORMAT_VERSION, ModelSpec, check_saved_model
from maskrcnn.serve.gunicorn_conf import RunDir, assign_device_slot, gunicorn_options
from maskrcnn.serve.settings import (
    CPU_WORKER_BYTES,
    GPU_RESERVE_BYTES,
    GPU_WORKER_BYTES,
    SERVE_RESERVE_BYTES,
    ServeSettings,
    cpu_workers_in_memory,
    default_workers_per_gpu,
)
from maskrcnn.serve.supervisor import gpu_count, gpu_memory_bytes, memory_limit_bytes, render_nginx_conf

pytestmark = pytest.mark.unit


def test_defaults_on_a_cpu_machine() -> None:
    settings = ServeSettings.from_env({}, cpu_count=8)
    assert settings.base_dir == Path("/opt/ml") and settings.model_dir == Path("/opt/ml/model")
    assert settings.port == 8080 and settings.device == "cpu"
    assert settings.workers == 4 and settings.torch_threads == 2  # workers x threads <= cores
    assert settings.timeout_s == 60 and settings.max_payload_bytes == 6 * 1024 * 1024
    assert settings.max_concurrent_transforms == 4


@pytest.mark.parametrize("cores", [1, 2, 3, 16, 96])
def test_cpu_workers_times_threads_never_exceed_cores(cores: int) -> None:
    settings = ServeSettings.from_env({}, cpu_count=cores)
    assert settings.workers * settings.torch_threads <= cores


GIB = 1024**3


def test_one_worker_per_gpu_when_its_memory_is_unknown() -> None:
    settings = ServeSettings.from_env({}, cpu_count=32, gpu_count=4)
    assert settings.device == "cuda" and settings.workers == 4 and settings.torch_threads == 1
    assert settings.workers_per_gpu == 1


@pytest.mark.parametrize(
    ("gpus", "memory_gib", "cores", "per_gpu"),
    [
        (1, 15, 4, 2),  # g4dn.xlarge: T4 (15 GiB usable), 4 vCPU
        (1, 22, 4, 2),  # g5.xlarge / g6.xlarge: A10G / L4
        (8, 80, 192, 2),  # p5.48xlarge: H100
        (4, 15, 48, 2),  # g4dn.12xlarge
        (1, 6, 8, 1),  # a GPU two workers do not fit in (3 GiB each + 1 GiB free)
        (1, 7, 8, 2),
        (1, 80, 1, 1),  # one core: a second worker has no core for its CPU part
        (8, 80, 8, 1),
    ],
)
def test_workers_per_gpu_follow_memory_and_cores(gpus: int, memory_gib: int, cores: int, per_gpu: int) -> None:
    settings = ServeSettings.from_env({}, cpu_count=cores, gpu_count=gpus, gpu_memory_bytes=memory_gib * GIB)
    assert settings.workers == gpus * per_gpu and settings.workers_per_gpu == per_gpu
    assert settings.max_concurrent_transforms == settings.workers  # a request in flight per worker


def test_default_workers_per_gpu_is_pure() -> None:
    assert default_workers_per_gpu(0, cpu_count=8, gpu_count=1) == 1  # unknown memory
    assert default_workers_per_gpu(80 * GIB, cpu_count=8, gpu_count=0) == 0
    assert default_workers_per_gpu(GPU_RESERVE_BYTES + 2 * GPU_WORKER_BYTES, cpu_count=8, gpu_count=1) == 2
    assert default_workers_per_gpu(GPU_RESERVE_BYTES + 2 * GPU_WORKER_BYTES - 1, cpu_count=8, gpu_count=1) == 1


def test_worker_count_override_holds_on_a_gpu() -> None:
    settings = ServeSettings.from_env(
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "3"}, cpu_count=32, gpu_count=2, gpu_memory_bytes=80 * GIB
    )
    assert settings.workers == 3 and settings.workers_per_gpu == 2  # slots 0, 2 on GPU 0; slot 1 on GPU 1


def test_inference_dtype_choice() -> None:
    assert ServeSettings.from_env({}, cpu_count=2).inference_dtype == "auto"
    chosen = ServeSettings.from_env({"MASKRCNN_INFERENCE_DTYPE": "Float32"}, cpu_count=2)
    assert chosen.inference_dtype == "float32"
    assert ServeSettings.from_json(chosen.to_json()) == chosen


def test_gpu_count_reads_the_driver_folder_seam(tmp_path: Path) -> None:
    assert gpu_count({"MASKRCNN_NVIDIA_PROC": str(tmp_path / "absent")}) == 0
    assert gpu_memory_bytes(0) == 0
    # A faked driver folder on a host whose torch sees no CUDA: still no GPU to serve on.
    if not torch.cuda.is_available():
        (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05")
        assert gpu_count({"MASKRCNN_NVIDIA_PROC": str(tmp_path)}) == 0


def test_sagemaker_variables_are_honoured() -> None:
    settings = ServeSettings.from_env(
        {
            "SAGEMAKER_BASE_DIR": "/tmp/job",
            "SAGEMAKER_BIND_TO_PORT": "9000",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "3",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT": "20",
            "SAGEMAKER_MAX_PAYLOAD_IN_MB": "50",
            "SAGEMAKER_BATCH": "true",
            "SAGEMAKER_BATCH_STRATEGY": "multi_record",
            "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "7",
        },
        cpu_count=2,
    )
    assert settings.model_dir == Path("/tmp/job/model") and settings.port == 9000 and settings.workers == 3
    assert settings.timeout_s == 20 and settings.max_payload_mb == 50 and settings.batch
    assert settings.batch_strategy == "MULTI_RECORD" and settings.max_concurrent_transforms == 7
    assert settings.torch_threads == 1


def test_batch_transform_gets_the_longer_default_timeout() -> None:
    assert ServeSettings.from_env({"SAGEMAKER_BATCH": "true"}, cpu_count=2).timeout_s == 600


@pytest.mark.parametrize(
    ("memory_gib", "cores", "workers", "threads"),
    [(0, 8, 4, 2), (3, 2, 1, 2), (3, 4, 1, 4), (6, 4, 3, 1), (1, 2, 1, 2), (24, 2, 2, 1)],
)
def test_cpu_workers_and_threads_follow_the_memory_cap(memory_gib: int, cores: int, workers: int, threads: int) -> None:
    """A 3-GB serverless endpoint runs one worker with every core's thread; no cap (0) changes nothing."""
    settings = ServeSettings.from_env({}, cpu_count=cores, memory_bytes=memory_gib * GIB)
    assert (settings.workers, settings.torch_threads) == (workers, threads)
    assert settings.memory_bytes == memory_gib * GIB
    assert cpu_workers_in_memory(SERVE_RESERVE_BYTES + 2 * CPU_WORKER_BYTES) == 2


def test_memory_cap_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("3221225472\n")
    assert memory_limit_bytes(v2) == 3 * GIB
    (v2 / "memory.max").write_text("max\n")
    assert memory_limit_bytes(v2) == 0
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_limit_bytes(tmp_path / "v1") == 0
    assert memory_limit_bytes(tmp_path / "none") == 0


def test_asynchronous_limits_reach_nginx_gunicorn_and_the_worker(tmp_path: Path) -> None:
    """1024 MiB bodies and a 3600-s inference: nginx waits longest, gunicorn next, the model's deadline first."""
    env = {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "1024", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3600"}
    settings = ServeSettings.from_env(env, cpu_count=2, nginx="/usr/sbin/nginx")
    assert settings.max_payload_bytes == 1024 * 1024 * 1024 and settings.timeout_s == 3600
    conf = render_nginx_conf(settings, RunDir(tmp_path), 2)
    assert f"client_max_body_size {1024**3};" in conf
    assert "proxy_read_timeout 3610s;" in conf and "proxy_send_timeout 3610s;" in conf
    assert gunicorn_options(settings, RunDir(tmp_path))["timeout"] == 3605


def test_multi_model_settings() -> None:
    settings = ServeSettings.from_env({"SAGEMAKER_MULTI_MODEL": "true", "MASKRCNN_MAX_MODELS": "3"}, cpu_count=2)
    assert settings.multi_model and settings.max_models == 3
    assert not ServeSettings.from_env({}, cpu_count=2).multi_model


def test_timeouts_agree() -> None:
    settings = ServeSettings.from_env({"SAGEMAKER_MODEL_SERVER_TIMEOUT": "30"}, cpu_count=2)
    assert settings.nginx_timeout_s >= settings.gunicorn_timeout_s >= settings.timeout_s == 30


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "two"),
        ("SAGEMAKER_BIND_TO_PORT", "70000"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "1025"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "3601"),
        ("SAGEMAKER_MULTI_MODEL", "maybe"),
        ("MASKRCNN_MAX_MODELS", "-1"),
        ("SAGEMAKER_BATCH", "maybe"),
        ("SAGEMAKER_BATCH_STRATEGY", "ALL"),
        ("MASKRCNN_DEVICE", "tpu"),
        ("MASKRCNN_DEVICE", "cuda"),
        ("MASKRCNN_INFERENCE_DTYPE", "int8"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "-1"),
    ],
)
def test_bad_values_fail_with_the_variable_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        ServeSettings.from_env({name: value}, cpu_count=2)


def test_nginx_choice() -> None:
    assert ServeSettings.from_env({}, cpu_count=2, nginx="/usr/sbin/nginx").nginx == "/usr/sbin/nginx"
    assert ServeSettings.from_env({"MASKRCNN_NGINX": "off"}, cpu_count=2, nginx="/usr/sbin/nginx").nginx is None
    assert ServeSettings.from_env({}, cpu_count=2, nginx=None).nginx is None


def test_settings_survive_json() -> None:
    settings = ServeSettings.from_env({"SAGEMAKER_BASE_DIR": "/x", "SAGEMAKER_BATCH": "1"}, cpu_count=4, nginx="n")
    assert ServeSettings.from_json(settings.to_json()) == settings


def test_gunicorn_binds_sockets_behind_nginx_and_the_port_without() -> None:
    run_dir = RunDir(Path("/tmp/run"))
    behind = gunicorn_options(ServeSettings(nginx="/usr/sbin/nginx", workers=3), run_dir)
    assert behind["bind"] == ["unix:/tmp/run/control.sock", "unix:/tmp/run/inference.sock"]
    assert behind["workers"] == 3 and behind["accesslog"] is None
    alone = gunicorn_options(ServeSettings(nginx=None, port=9999), run_dir)
    assert alone["bind"] == ["0.0.0.0:9999"] and alone["accesslog"] == "-"
    assert alone["timeout"] > ServeSettings().timeout_s


def test_device_slots_are_reused_after_a_worker_dies() -> None:
    arbiter = SimpleNamespace(WORKERS={})
    for pid in (11, 12, 13):
        worker = SimpleNamespace()
        assign_device_slot(arbiter, worker)
        arbiter.WORKERS[pid] = worker
    assert [w.device_slot for w in arbiter.WORKERS.values()] == [0, 1, 2]
    del arbiter.WORKERS[12]
    replacement = SimpleNamespace()
    assign_device_slot(arbiter, replacement)
    assert replacement.device_slot == 1


def test_nginx_conf_is_fully_rendered() -> None:
    settings = ServeSettings(nginx="/usr/sbin/nginx", port=8123, max_payload_mb=6, timeout_s=60)
    text = render_nginx_conf(settings, RunDir(Path("/tmp/run")), cpus=8)
    assert "@@" not in text
    assert "listen 8123" in text and "server_tokens off;" in text and "daemon off;" in text
    assert "client_max_body_size 6291456;" in text
    assert f"proxy_read_timeout {settings.nginx_timeout_s}s;" in text
    assert "unix:/tmp/run/inference.sock" in text and "error_log stderr" in text


def test_saved_model_check(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"pickle")
    with pytest.raises(ModelError, match=r"model.json and model.safetensors missing \(found: model.pth\).*loaded"):
        check_saved_model(tmp_path)
    (tmp_path / "model.json").write_text("[1]")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match=f"{tmp_path}: model.json is not a JSON object"):
        check_saved_model(tmp_path)
    no_sizes = {"arch": "lite", "format_version": FORMAT_VERSION, "class_names": ["a"]}
    (tmp_path / "model.json").write_text(json.dumps(no_sizes))
    with pytest.raises(ModelError, match=r"malformed: TypeError: .*min_size"):
        check_saved_model(tmp_path)
    (tmp_path / "model.json").write_text(ModelSpec("lite", ("a",), 128, 256).to_json())
    with pytest.raises(ModelError, match=f"{tmp_path / 'model.safetensors'} is not a safetensors file"):
        check_saved_model(tmp_path)
