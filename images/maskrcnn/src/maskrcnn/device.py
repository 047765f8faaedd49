"""Refuse to run on CPU when the host has a GPU that CUDA cannot use.

torch falls back to the CPU by itself when CUDA cannot start (a driver older than the wheel's CUDA
needs, a compute capability the wheel has no kernels for), and a training job then "succeeds" dozens of
times slower. ``train`` and ``serve`` call :func:`require_usable_gpu` first and fail at once instead,
naming the driver, the CUDA version the image needs and what to do (docs/image.md, "GPU drivers").

A GPU counts as present when ``/proc/driver/nvidia`` exists (the NVIDIA container runtime mounts it
when it gives the container a GPU) or ``nvidia-smi`` runs. ``NVIDIA_VISIBLE_DEVICES`` alone does not
count: the image sets it to ``all`` for every host, CPU ones too; but ``none`` or ``void`` there
hides the GPUs on purpose, and then the CPU is what was asked for.

:func:`probe` reads the host once, at the edge; ``MASKRCNN_NVIDIA_PROC`` replaces ``/proc/driver/nvidia``
(a test seam: a folder with a ``version`` file makes any host look like a GPU host).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maskrcnn.errors import ConfigError

NVIDIA_PROC = Path("/proc/driver/nvidia")
HIDDEN = ("none", "void")  # NVIDIA_VISIBLE_DEVICES values that give the container no GPU
# What the image's CUDA needs; docs/image.md, "GPU drivers", says where each number comes from.
MIN_DRIVER = {"13": 580, "12": 525, "11": 450}


class GpuUnusableError(ConfigError):
    """The host has a GPU, but this image's CUDA cannot use it."""


@dataclass(frozen=True)
class GpuHost:
    """What the host says about its GPUs, and what torch makes of them."""

    present: bool  # /proc/driver/nvidia exists or nvidia-smi ran, and the GPUs are not hidden
    driver: str | None  # the driver version, e.g. "535.104.05"
    cuda_available: bool  # torch.cuda.is_available()
    cuda_version: str | None  # torch.version.cuda: what the wheel was built for
    capabilities: tuple[tuple[int, int], ...] = ()  # each visible device's compute capability
    arch_list: Sequence[str] = field(default_factory=tuple)  # torch.cuda.get_arch_list()
    torch_version: str = ""


def probe(environ: Mapping[str, str]) -> GpuHost:
    """Read the host and torch once (the edge); everything after works on the returned values.

    torch is imported only where a GPU is present: on a CPU host ``serve`` refuses a bad model in well
    under a second, and this check must not change that."""
    proc = Path(environ.get("MASKRCNN_NVIDIA_PROC") or NVIDIA_PROC)
    hidden = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower() in HIDDEN
    driver = read_driver_version(proc)
    smi_driver = None if proc.exists() else nvidia_smi_driver(shutil.which("nvidia-smi"))
    present = not hidden and (proc.exists() or smi_driver is not None)
    if not present:
        return GpuHost(present=False, driver=driver or smi_driver, cuda_available=False, cuda_version=None)
    import torch

    available = torch.cuda.is_available()
    capabilities: tuple[tuple[int, int], ...] = ()
    arch_list: list[str] = []
    if available:
        capabilities = tuple(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        arch_list = torch.cuda.get_arch_list()
    return GpuHost(
        present=present,
        driver=driver or smi_driver,
        cuda_available=available,
        cuda_version=torch.version.cuda,
        capabilities=capabilities,
        arch_list=tuple(arch_list),
        torch_version=torch.__version__,
    )


def read_driver_version(proc: Path) -> str | None:
    """The kernel module's version from ``<proc>/version`` ("NVRM version: ... Kernel Module  535.104.05 ...")."""
    try:
        text = (proc / "version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    found = found or re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def nvidia_smi_driver(executable: str | None) -> str | None:
    """The driver version nvidia-smi reports; None when it is not there or does not run (no GPU)."""
    if executable is None:
        return None
    try:
        done = subprocess.run(
            [executable, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """True when the wheel has kernels that run on ``capability``.

    A cubin for sm_XY runs on the same major version with a minor >= Y; PTX (compute_XY) is compiled
    by the driver for any device >= XY (CUDA C programming guide, "Binary Compatibility").
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def require_usable_gpu(host: GpuHost) -> None:
    """Raise :class:`GpuUnusableError` when a GPU is present but CUDA cannot use it (else return)."""
    if not host.present:
        return
    needed = host.cuda_version or "none (a CPU-only torch build)"
    major = (host.cuda_version or "").split(".")[0]
    driver_need = f"driver >= {MIN_DRIVER[major]}" if major in MIN_DRIVER else "a matching driver"
    what = f"torch {host.torch_version} is built for CUDA {needed}"
    if not host.cuda_available:
        raise GpuUnusableError(
            f"a GPU is present (NVIDIA driver {host.driver or 'version unknown'}) but CUDA cannot start: "
            f"{what}, which needs {driver_need}; not falling back to the CPU. Run on a host whose driver is "
            f"new enough (SageMaker: an instance/AMI with that driver), or use an image built with CUDA's "
            f"forward-compatibility libraries or a torch build for the host's CUDA (docs/image.md, "
            f"'GPU drivers'); to use the CPU on purpose, set NVIDIA_VISIBLE_DEVICES=none"
        )
    unsupported = sorted({c for c in host.capabilities if not supported(c, host.arch_list)})
    if unsupported:
        caps = ", ".join(f"sm_{a}{b}" for a, b in unsupported)
        raise GpuUnusableError(
            f"the GPU's compute capability ({caps}) is not among the kernels of this image's torch "
            f"({what}, driver {host.driver or 'unknown'}; kernels for {', '.join(host.arch_list) or 'none'}); "
            f"not falling back to the CPU. Use an instance with a newer GPU (docs/image.md, 'GPU drivers'), "
            f"or set NVIDIA_VISIBLE_DEVICES=none to use the CPU on purpose"
        )


__all__ = ["GpuHost", "GpuUnusableError", "probe", "require_usable_gpu", "supported"]
