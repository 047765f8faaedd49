"""A GPU that CUDA cannot use is refused, naming the driver and the CUDA version; no GPU means the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from maskrcnn.device import GpuHost, GpuUnusableError, probe, read_driver_version, require_usable_gpu, supported

pytestmark = pytest.mark.unit

PROC_VERSION = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 7.3.1 20180712 (Red Hat 7.3.1-15) (GCC)\n"
)


def fake_proc(tmp_path: Path, text: str = PROC_VERSION) -> Path:
    proc = tmp_path / "nvidia"
    proc.mkdir()
    (proc / "version").write_text(text)
    return proc


def test_a_gpu_cuda_cannot_start_on_is_refused_with_driver_and_cuda_version(tmp_path: Path) -> None:
    host = probe({"MASKRCNN_NVIDIA_PROC": str(fake_proc(tmp_path)), "PATH": ""})
    assert host.present and host.driver == "535.104.05"
    host = GpuHost(present=True, driver=host.driver, cuda_available=False, cuda_version="13.0", torch_version="2.14.1")
    with pytest.raises(GpuUnusableError) as caught:
        require_usable_gpu(host)
    message = str(caught.value)
    assert "driver 535.104.05" in message and "CUDA 13.0" in message and "driver >= 580" in message
    assert "not falling back to the CPU" in message and "docs/image.md" in message


@pytest.mark.parametrize(
    "environ",
    [
        {"NVIDIA_VISIBLE_DEVICES": "all", "PATH": ""},  # the image sets this on every host, CPU ones too
        {"PATH": ""},
    ],
)
def test_no_gpu_signal_allows_the_cpu(tmp_path: Path, environ: dict[str, str]) -> None:
    host = probe({**environ, "MASKRCNN_NVIDIA_PROC": str(tmp_path / "absent")})
    assert not host.present
    require_usable_gpu(host)  # no error: the CPU is the device


def test_gpus_hidden_on_purpose_allow_the_cpu(tmp_path: Path) -> None:
    host = probe({"MASKRCNN_NVIDIA_PROC": str(fake_proc(tmp_path)), "NVIDIA_VISIBLE_DEVICES": "none", "PATH": ""})
    assert not host.present
    require_usable_gpu(host)


def test_a_compute_capability_without_kernels_is_refused() -> None:
    cu130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
    v100 = GpuHost(
        present=True,
        driver="580.65.06",
        cuda_available=True,
        cuda_version="13.0",
        capabilities=((7, 0),),
        arch_list=cu130,
        torch_version="2.14.1",
    )
    with pytest.raises(GpuUnusableError, match=r"sm_70"):
        require_usable_gpu(v100)
    h200 = GpuHost(
        present=True,
        driver="580.65.06",
        cuda_available=True,
        cuda_version="13.0",
        capabilities=((9, 0),),
        arch_list=cu130,
        torch_version="2.14.1",
    )
    require_usable_gpu(h200)


@pytest.mark.parametrize(
    ("capability", "arch_list", "expected"),
    [
        ((8, 6), ("sm_80",), True),  # a cubin runs on a later minor of its major
        ((8, 0), ("sm_86",), False),
        ((7, 0), ("sm_75", "sm_80"), False),
        ((9, 0), ("sm_80", "compute_80"), True),  # PTX is compiled for any later device
        ((7, 0), ("compute_80",), False),
    ],
)
def test_supported(capability: tuple[int, int], arch_list: tuple[str, ...], expected: bool) -> None:
    assert supported(capability, arch_list) is expected


def test_driver_version_from_proc(tmp_path: Path) -> None:
    open_kernel = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n"
    assert read_driver_version(fake_proc(tmp_path, open_kernel)) == "580.65.06"
    assert read_driver_version(tmp_path / "missing") is None
