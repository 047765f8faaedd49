"""The CUDA route per driver branch (native, forward-compat, refused) with faked hosts and compat folders; a GPU
that CUDA cannot use is refused, naming the driver and the CUDA version; no GPU means the CPU."""

from __future__ import annotations

import _ctypes
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from maskrcnn import device
from maskrcnn.device import (
    FORWARD_COMPAT_BRANCHES,
    INFERENCE_AMI,
    INFERENCE_AMI_DRIVERS,
    TRANSFORM_AMI,
    TRANSFORM_AMI_DRIVERS,
    CudaRoute,
    DriverHost,
    GpuHost,
    GpuUnusableError,
    choose_route,
    compat_driver_version,
    describe,
    prepare_device,
    probe,
    read_driver_host,
    read_driver_version,
    require_usable_gpu,
    supported,
    torch_build,
    use_route,
)

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


def test_nvidia_smi_is_sought_on_the_given_path_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 580.65.06\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(smi.parent))  # the process's PATH: not the mapping's
    absent = str(tmp_path / "absent")
    assert device.gpus_present({"MASKRCNN_NVIDIA_PROC": absent}) == (False, None)
    assert device.gpus_present({"MASKRCNN_NVIDIA_PROC": absent, "PATH": str(smi.parent)}) == (True, "580.65.06")
    assert probe({"MASKRCNN_NVIDIA_PROC": absent}).count == 0


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


# One kernel-module version per branch SageMaker runs (docs/image.md's matrix), as /proc/driver/nvidia/version says it.
BRANCHES = {
    470: "470.256.02",
    535: "535.104.05",
    550: "550.163.01",
    570: "570.172.08",
    580: "580.95.05",
    595: "595.45.04",
}
COMPAT = "580.95.05"  # cuda-compat-13-0's user-mode driver in the nvidia/cuda:13.0.2 bases


def proc_text(driver: str) -> str:
    return f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Release Build  (dvs-builder@U16)\n"


def fake_compat(tmp_path: Path, version: str = COMPAT) -> Path:
    """A compat folder laid out as cuda-compat-13-0 installs it: libcuda.so.1 -> libcuda.so.<driver version>."""
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / f"libcuda.so.{version}").write_bytes(b"")
    (compat / "libcuda.so.1").symlink_to(f"libcuda.so.{version}")
    (compat / f"libnvidia-ptxjitcompiler.so.{version}").write_bytes(b"")
    (compat / "libnvidia-ptxjitcompiler.so.1").symlink_to(f"libnvidia-ptxjitcompiler.so.{version}")
    return compat


def host_on(tmp_path: Path, driver: str, compat: Path | None, cuda: str | None = "13.0") -> DriverHost:
    """What read_driver_host sees on a host with that driver, with or without compat libraries."""
    environ = {
        "MASKRCNN_NVIDIA_PROC": str(fake_proc(tmp_path, proc_text(driver))),
        "MASKRCNN_CUDA_COMPAT_DIR": str(compat or tmp_path / "no-compat"),
        "PATH": "",
    }
    read = read_driver_host(environ)
    assert read.present and read.driver == driver
    return DriverHost(
        present=True,
        driver=read.driver,
        cuda=cuda,
        torch_version="2.14.1+cu130",
        compat_dir=read.compat_dir,
        compat_driver=read.compat_driver,
    )


@pytest.mark.parametrize(
    ("branch", "with_compat", "route"),
    [
        (470, True, "refused"),  # past end of life, not among cuda-compat-13-0's branches
        (470, False, "refused"),
        (535, True, "forward-compat"),
        (535, False, "refused"),  # the branch is reachable, but not by an image without compat libraries
        (550, True, "refused"),  # ended June 2025, before CUDA 13.0: not supported by its compat package
        (570, True, "forward-compat"),
        (570, False, "refused"),
        (580, True, "native"),  # the compat libcuda is never used where the driver is as new
        (580, False, "native"),
        (595, True, "native"),
    ],
)
def test_each_driver_branch_takes_its_route(tmp_path: Path, branch: int, with_compat: bool, route: str) -> None:
    host = host_on(tmp_path, BRANCHES[branch], fake_compat(tmp_path) if with_compat else None)
    assert choose_route(host).route == route


def test_forward_compat_needs_a_compat_driver_newer_than_the_host(tmp_path: Path) -> None:
    host = host_on(tmp_path, BRANCHES[570], fake_compat(tmp_path, version="570.100.01"))
    chosen = choose_route(host)
    assert chosen.route == "refused"
    assert "libcuda 570.100.01, not newer" in chosen.reason


@pytest.mark.parametrize("branch", [470, 550])
def test_an_unreachable_branch_is_refused_naming_it_and_what_to_choose(tmp_path: Path, branch: int) -> None:
    chosen = choose_route(host_on(tmp_path, BRANCHES[branch], fake_compat(tmp_path)))
    with pytest.raises(GpuUnusableError) as caught:
        use_route(chosen, {}, load=lambda path: pytest.fail(f"loaded {path}"))
    message = str(caught.value)
    assert f"driver {BRANCHES[branch]} (branch R{branch})" in message and "CUDA 13.0" in message
    assert "driver >= 580, or R535 / R570 with CUDA's forward-compatibility libraries" in message
    assert f"InferenceAmiVersion {INFERENCE_AMI} (R580)" in message
    assert "al2-ami-sagemaker-inference-gpu-2-1 (R535)" in message
    assert f"TransformAmiVersion {TRANSFORM_AMI}" in message
    assert "not falling back to the CPU" in message and "NVIDIA_VISIBLE_DEVICES=none" in message
    assert len(message) < 1024  # the failure file's first line, SageMaker's FailureReason


def test_a_reachable_branch_without_compat_libraries_says_so(tmp_path: Path) -> None:
    chosen = choose_route(host_on(tmp_path, BRANCHES[535], None))
    assert chosen.route == "refused"
    assert "only with CUDA's forward-compatibility libraries" in chosen.reason
    assert f"{tmp_path / 'no-compat'} has none" in chosen.reason and "CUDA base" in chosen.reason


def test_forward_compat_loads_the_compat_libcuda_before_torch_and_exports_the_path(tmp_path: Path) -> None:
    compat = fake_compat(tmp_path)
    chosen = choose_route(host_on(tmp_path, BRANCHES[535], compat))
    loaded: list[str] = []
    environ = {"LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"}

    use_route(chosen, environ, load=loaded.append)

    # The JIT helper first, libcuda last: libcuda opens the helper by soname and must find its own version.
    assert loaded == [str(compat / "libnvidia-ptxjitcompiler.so.1"), str(compat / "libcuda.so.1")]
    assert environ["LD_LIBRARY_PATH"] == f"{compat}:/usr/local/nvidia/lib:/usr/local/nvidia/lib64"
    use_route(chosen, environ, load=loaded.append)  # a child process running the check again adds nothing
    assert environ["LD_LIBRARY_PATH"].count(str(compat)) == 1


def test_compat_libraries_that_do_not_load_are_a_refusal(tmp_path: Path) -> None:
    chosen = choose_route(host_on(tmp_path, BRANCHES[535], fake_compat(tmp_path)))

    def broken(path: str) -> None:
        raise OSError(f"{path}: invalid ELF header")

    with pytest.raises(GpuUnusableError, match=r"does not load: .*invalid ELF header.*not falling back"):
        use_route(chosen, {}, load=broken)


@pytest.mark.parametrize("route", ["native", "cpu"])
def test_native_and_cpu_routes_load_nothing_and_export_nothing(tmp_path: Path, route: str) -> None:
    host = host_on(tmp_path, BRANCHES[580], fake_compat(tmp_path))
    environ = {"LD_LIBRARY_PATH": "/usr/local/nvidia/lib"}
    use_route(CudaRoute(route, host), environ, load=lambda path: pytest.fail(f"loaded {path}"))  # type: ignore[arg-type]
    assert environ == {"LD_LIBRARY_PATH": "/usr/local/nvidia/lib"}


def test_no_gpu_is_the_cpu_route_and_an_unknown_driver_lets_torch_decide(tmp_path: Path) -> None:
    cpu = read_driver_host({"MASKRCNN_NVIDIA_PROC": str(tmp_path / "absent"), "PATH": ""})
    assert choose_route(cpu).route == "cpu"
    unknown = DriverHost(present=True, driver=None, cuda="13.0", torch_version="2.14.1")
    assert choose_route(unknown).route == "native"


def test_a_cpu_only_torch_on_a_gpu_host_is_refused(tmp_path: Path) -> None:
    chosen = choose_route(host_on(tmp_path, BRANCHES[580], None, cuda=None))
    assert chosen.route == "refused" and "CPU-only build" in chosen.reason


def test_torch_cuda_is_read_without_importing_torch(tmp_path: Path) -> None:
    package = tmp_path / "torch"
    package.mkdir()
    (package / "version.py").write_text(
        "from typing import Optional\n__version__ = '2.14.1+cu130'\ncuda: Optional[str] = '13.0'\n"
    )

    class Spec:
        submodule_search_locations = [str(package)]

    assert torch_build(lambda name: Spec()) == ("13.0", "2.14.1+cu130")
    (package / "version.py").write_text("__version__ = '2.14.1+cpu'\ncuda: Optional[str] = None\n")
    assert torch_build(lambda name: Spec()) == (None, "2.14.1+cpu")
    assert torch_build(lambda name: None) == (None, "")


def test_compat_driver_version_from_the_libcuda_link(tmp_path: Path) -> None:
    assert compat_driver_version(fake_compat(tmp_path)) == COMPAT
    assert compat_driver_version(tmp_path / "missing") is None
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "libcuda.so.1").write_bytes(b"")  # a copy, not a link: the versioned file names it
    (plain / "libcuda.so.575.57.08").write_bytes(b"")
    assert compat_driver_version(plain) == "575.57.08"


def test_the_log_line_names_driver_runtime_gpus_and_route(tmp_path: Path) -> None:
    host = host_on(tmp_path, BRANCHES[535], fake_compat(tmp_path))
    chosen = choose_route(host)
    gpu = GpuHost(
        present=True,
        driver=host.driver,
        cuda_available=True,
        cuda_version="13.0",
        capabilities=((8, 6),),
        names=("NVIDIA A10G",),
    )
    line = describe(chosen, gpu)
    assert line.startswith("device: NVIDIA driver 535.104.05, torch 2.14.1+cu130 (CUDA 13.0 runtime)")
    assert "1 GPU(s): NVIDIA A10G (sm_86)" in line and f"route forward-compat (libcuda {COMPAT} from" in line
    cpu = choose_route(DriverHost(present=False, driver=None, cuda="13.0", torch_version="2.14.1+cu130"))
    expected = "device: NVIDIA driver none, torch 2.14.1+cu130 (CUDA 13.0 runtime), no GPU, route cpu"
    assert describe(cpu, None) == expected


def test_the_ami_tables_name_a_route_for_their_defaults() -> None:
    """The AMIs the refusal and the pipeline recommend run a driver this image reaches."""
    for driver in (INFERENCE_AMI_DRIVERS[INFERENCE_AMI], TRANSFORM_AMI_DRIVERS[TRANSFORM_AMI]):
        assert driver >= 580 or driver in FORWARD_COMPAT_BRANCHES["13"]


def test_the_route_seen_by_a_child_keeps_the_parent_path(tmp_path: Path) -> None:
    compat = fake_compat(tmp_path)
    chosen = choose_route(host_on(tmp_path, BRANCHES[570], compat))
    assert chosen.environment({}) == {"LD_LIBRARY_PATH": str(compat)}
    assert chosen.environment({"LD_LIBRARY_PATH": f"/a{os.pathsep}/b"}) == {"LD_LIBRARY_PATH": f"{compat}:/a:/b"}


def test_prepare_device_takes_the_route_and_hands_it_to_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole start-up step on a faked R535 host whose CUDA works (torch's probe faked): a real shared object
    preloaded from the compat folder, the path exported, a child process started afterwards sees it."""
    compat = tmp_path / "compat"
    compat.mkdir()
    shutil.copy(_ctypes.__file__, compat / f"libcuda.so.{COMPAT}")  # loads and runs nothing
    (compat / "libcuda.so.1").symlink_to(f"libcuda.so.{COMPAT}")
    environ = {
        "MASKRCNN_NVIDIA_PROC": str(fake_proc(tmp_path)),
        "MASKRCNN_CUDA_COMPAT_DIR": str(compat),
        "PATH": os.environ["PATH"],
    }
    working = GpuHost(
        present=True,
        driver="535.104.05",
        cuda_available=True,
        cuda_version="13.0",
        capabilities=((8, 9),),
        arch_list=("sm_80", "sm_86", "sm_90"),
        torch_version="2.14.1+cu130",
        names=("NVIDIA L4",),
    )
    monkeypatch.setattr(device, "probe", lambda environ: working)

    with caplog.at_level(logging.INFO, logger="maskrcnn.device"):
        assert prepare_device(environ) is working

    assert environ["LD_LIBRARY_PATH"] == str(compat)
    assert "1 GPU(s): NVIDIA L4 (sm_89), route forward-compat" in caplog.text
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['LD_LIBRARY_PATH'])"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.split(":")[0].strip() == str(compat)


def test_prepare_device_logs_the_line_before_refusing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    environ = {"MASKRCNN_NVIDIA_PROC": str(fake_proc(tmp_path, proc_text(BRANCHES[550]))), "PATH": ""}
    with caplog.at_level(logging.INFO, logger="maskrcnn.device"), pytest.raises(GpuUnusableError, match="R550"):
        prepare_device(environ)
    assert "device: NVIDIA driver 550.163.01" in caplog.text and "route refused" in caplog.text
    assert "LD_LIBRARY_PATH" not in environ
