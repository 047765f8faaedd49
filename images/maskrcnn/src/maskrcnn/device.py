"""The GPU route: choose how CUDA reaches the host's driver before torch loads, and refuse a GPU no route reaches.

torch's wheel is built for one CUDA major (13.0 for the image's torch 2.14.1), which needs a driver of its
branch or newer (R580). SageMaker's hosts run older ones (R470, R535, R550; docs/image.md, "GPU drivers").
``train`` and ``serve`` call :func:`prepare_device` first; it reads the host once, without torch, and takes
one of these routes (:func:`choose_route`, a pure function):

* ``cpu``: no GPU (``/proc/driver/nvidia`` absent and no ``nvidia-smi``, or ``NVIDIA_VISIBLE_DEVICES`` set to
  ``none``/``void``; the image sets ``all`` on every host, CPU ones too, so ``all`` alone does not count);
* ``native``: the driver is new enough for torch's CUDA (or its version is unknown: torch decides);
* ``forward-compat``: the driver is older, but on a branch NVIDIA's forward-compatibility package for that
  CUDA supports (:data:`FORWARD_COMPAT_BRANCHES`), and the package's user-mode driver is in the image
  (``/usr/local/cuda/compat`` on the ``nvidia/cuda`` bases; ``MASKRCNN_CUDA_COMPAT_DIR`` replaces it):
  its ``libcuda.so.1`` is loaded before torch (:func:`use_route`), so torch's CUDA runtime binds to it,
  and the folder goes first on ``LD_LIBRARY_PATH`` for every child (gunicorn, distributed ranks,
  data-loader workers started afresh);
* ``refused``: anything else raises :class:`GpuUnusableError` naming the driver, its branch, the CUDA torch
  needs and what to choose instead (a SageMaker AMI version with a newer driver). Torch falling back to the
  CPU by itself would make a job "succeed" dozens of times slower.

Then torch is imported and checked (:func:`probe`, :func:`require_usable_gpu`: CUDA must start and each
GPU's compute capability must have kernels), and one line is logged with the driver, torch's CUDA, the GPUs
and the route, on CPU hosts too.

Why a preload and not the shell entrypoint: the decision (version parsing, the branch table) stays in one
tested function; ``train`` and ``serve`` started without the image's entrypoint (the local harness, a
``--entrypoint`` override) take the same route; and the glibc loader returns an already loaded library
for a later ``dlopen`` of the same soname, so the CUDA runtime's ``dlopen("libcuda.so.1")`` gets the compat
one. ``LD_LIBRARY_PATH`` changed inside a running process reaches only processes started afterwards (the
loader reads it once), which is what the export is for.

The CPU's side: :func:`cpu_amx_usable` says whether bfloat16 autocast may use AMX tiles here (the training
job's mixed precision on CPU).

Test seams: ``MASKRCNN_NVIDIA_PROC`` replaces ``/proc/driver/nvidia`` (a folder with a ``version`` file makes
any host look like a GPU host), ``MASKRCNN_CUDA_COMPAT_DIR`` replaces ``/usr/local/cuda/compat``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from maskrcnn.errors import ConfigError

log = logging.getLogger(__name__)

NVIDIA_PROC = Path("/proc/driver/nvidia")
CUDA_COMPAT_DIR = Path("/usr/local/cuda/compat")  # where cuda-compat-<major>-<minor> installs on the CUDA bases
HIDDEN = ("none", "void")  # NVIDIA_VISIBLE_DEVICES values that give the container no GPU
# The oldest driver branch each CUDA major runs on without forward compatibility (NVIDIA, CUDA Toolkit release
# notes / "Supported Drivers and CUDA Toolkit Versions"; docs/image.md, "GPU drivers", cites each).
MIN_DRIVER = {"13": 580, "12": 525, "11": 450}
# Older branches NVIDIA's forward-compatibility package supports for that CUDA major, data-centre GPUs only: a
# long-term or production branch still in support when that CUDA release shipped. CUDA 13.0 (August 2025):
# R535 (LTS, to June 2026) and R570 (production, to February 2026); not R470 (ended July 2024, and no longer
# supported from CUDA 12.8) nor R550 (ended June 2025). docs/image.md, "GPU drivers", has the sources.
FORWARD_COMPAT_BRANCHES: dict[str, tuple[int, ...]] = {"13": (535, 570)}
# Libraries of the compat folder loaded before torch, helpers first: libcuda opens the PTX JIT compiler and
# NVVM by soname, and must get the copies of its own version.
COMPAT_LIBRARIES = ("libnvidia-ptxjitcompiler.so.1", "libnvidia-nvvm.so.4", "libcuda.so.1")

# SageMaker host images that choose the driver (botocore's sagemaker service model: ProductionVariant
# InferenceAmiVersion, TransformResources TransformAmiVersion; AWS, "Best practices to minimize interruptions
# during GPU driver upgrades"). The values are the driver branch each one runs.
INFERENCE_AMI_DRIVERS = {
    "al2-ami-sagemaker-inference-gpu-2": 535,
    "al2-ami-sagemaker-inference-gpu-2-1": 535,  # NVIDIA Container Toolkit with CUDA-compat mounting disabled
    "al2-ami-sagemaker-inference-gpu-3-1": 550,  # likewise
    "al2023-ami-sagemaker-inference-gpu-4-1": 580,  # likewise
}
TRANSFORM_AMI_DRIVERS = {"al2-ami-sagemaker-batch-gpu-470": 470, "al2-ami-sagemaker-batch-gpu-535": 535}
INFERENCE_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"  # endpoints: R580, CUDA 13 natively
TRANSFORM_AMI = "al2-ami-sagemaker-batch-gpu-535"  # batch transform: the newest there is, R535 (forward-compat)

Route = Literal["cpu", "native", "forward-compat", "refused"]


class GpuUnusableError(ConfigError):
    """The host has a GPU, but this image's CUDA cannot use it."""


@dataclass(frozen=True)
class DriverHost:
    """What the host and the installed torch say, read without importing torch (:func:`read_driver_host`)."""

    present: bool  # /proc/driver/nvidia exists or nvidia-smi ran, and the GPUs are not hidden
    driver: str | None  # the kernel module's version, e.g. "535.104.05"
    cuda: str | None  # what torch is built for (torch/version.py's ``cuda``), None: a CPU-only build
    torch_version: str = ""
    compat_dir: Path = CUDA_COMPAT_DIR
    compat_driver: str | None = None  # the forward-compatibility libcuda's version; None: not in the image


@dataclass(frozen=True)
class CudaRoute:
    """How CUDA reaches the driver, and why; ``reason`` is the refusal when ``route`` is "refused"."""

    route: Route
    host: DriverHost
    reason: str = ""

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Variables to export so child processes take the same route (empty unless forward-compat)."""
        if self.route != "forward-compat":
            return {}
        first = str(self.host.compat_dir)
        rest = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != first]
        return {"LD_LIBRARY_PATH": ":".join([first, *rest])}


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
    names: tuple[str, ...] = ()  # each visible device's name

    @property
    def count(self) -> int:
        """CUDA devices torch sees (0 where none is present or CUDA cannot start)."""
        return len(self.capabilities)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def branch(driver: str) -> int:
    """The driver branch: 535 for "535.104.05"."""
    return version_tuple(driver)[0]


def gpus_present(environ: Mapping[str, str]) -> tuple[bool, str | None]:
    """(a GPU is visible, the driver version) from ``/proc/driver/nvidia`` or else ``nvidia-smi``; no torch.

    The one test of presence (:func:`probe`, ``serve``'s GPU count and the route all ask it). ``environ`` is the
    whole environment: ``nvidia-smi`` is looked for on its ``PATH`` only (none: not looked for)."""
    proc = Path(environ.get("MASKRCNN_NVIDIA_PROC") or NVIDIA_PROC)
    hidden = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower() in HIDDEN
    driver = read_driver_version(proc)
    smi_driver = None if proc.exists() else nvidia_smi_driver(shutil.which("nvidia-smi", path=environ.get("PATH", "")))
    return not hidden and (proc.exists() or smi_driver is not None), driver or smi_driver


def read_driver_host(
    environ: Mapping[str, str], find_spec: Callable[[str], object | None] = importlib.util.find_spec
) -> DriverHost:
    """Read the host once (the edge): driver, torch's CUDA and the compat libraries, importing no torch."""
    present, driver = gpus_present(environ)
    cuda, torch_version = torch_build(find_spec)
    compat_dir = Path(environ.get("MASKRCNN_CUDA_COMPAT_DIR") or CUDA_COMPAT_DIR)
    return DriverHost(
        present=present,
        driver=driver,
        cuda=cuda,
        torch_version=torch_version,
        compat_dir=compat_dir,
        compat_driver=compat_driver_version(compat_dir),
    )


def torch_build(find_spec: Callable[[str], object | None] = importlib.util.find_spec) -> tuple[str | None, str]:
    """(torch's CUDA version or None, torch's version) from ``torch/version.py``, without importing torch:
    the import takes seconds, loads the CUDA libraries, and must come after the route is taken."""
    spec = find_spec("torch")
    locations = getattr(spec, "submodule_search_locations", None) or []
    for location in locations:
        try:
            text = (Path(location) / "version.py").read_text()
        except OSError:
            continue
        cuda = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        version = re.search(r"^__version__\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        return (cuda.group(1) if cuda else None), (version.group(1) if version else "")
    return None, ""


def compat_driver_version(compat_dir: Path) -> str | None:
    """The forward-compatibility user-mode driver's version: ``libcuda.so.1`` points at ``libcuda.so.580.95.05``
    (as AWS's Deep Learning Containers read it); None when the folder or the library is missing."""
    library = compat_dir / "libcuda.so.1"
    if not library.exists():
        return None
    names = [os.readlink(library)] if library.is_symlink() else []
    names += sorted(p.name for p in compat_dir.glob("libcuda.so.*.*"))
    for name in names:
        found = re.fullmatch(r"libcuda\.so\.(\d+\.\d+(?:\.\d+)?)", Path(name).name)
        if found:
            return found.group(1)
    return None


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


def what_to_choose() -> str:
    """The advice every refusal ends with: hosts whose driver a route reaches, and the CPU on purpose."""
    return (
        f"Choose a host with a newer driver: on a SageMaker endpoint, InferenceAmiVersion {INFERENCE_AMI} "
        f"(R{INFERENCE_AMI_DRIVERS[INFERENCE_AMI]}) or al2-ami-sagemaker-inference-gpu-2-1 (R535); in batch "
        f"transform, TransformAmiVersion {TRANSFORM_AMI} (docs/image.md, 'GPU drivers'); to use the CPU on "
        f"purpose, set NVIDIA_VISIBLE_DEVICES=none"
    )


def choose_route(host: DriverHost) -> CudaRoute:
    """The route for this host (module docstring); pure, so every branch is tested with faked hosts."""
    if not host.present:
        return CudaRoute("cpu", host, "no GPU")
    torch_is = f"torch {host.torch_version or '(version unknown)'} is built for CUDA {host.cuda}"
    if host.cuda is None:
        return CudaRoute(
            "refused",
            host,
            f"a GPU is present (NVIDIA driver {host.driver or 'version unknown'}) but torch "
            f"{host.torch_version or ''} is a CPU-only build (CUDA none); not falling back to the CPU. Use the "
            f"image's torch; to use the CPU on purpose, set NVIDIA_VISIBLE_DEVICES=none",
        )
    major = host.cuda.split(".")[0]
    if host.driver is None or major not in MIN_DRIVER:
        return CudaRoute("native", host, "driver version unknown: torch decides" if host.driver is None else "")
    driver_branch, needed = branch(host.driver), MIN_DRIVER[major]
    if driver_branch >= needed:
        return CudaRoute("native", host, f"R{driver_branch} >= R{needed}")
    compat_branches = FORWARD_COMPAT_BRANCHES.get(major, ())
    names = " / ".join(f"R{b}" for b in compat_branches)
    if driver_branch in compat_branches:
        if host.compat_driver is not None and version_tuple(host.compat_driver) > version_tuple(host.driver):
            return CudaRoute(
                "forward-compat", host, f"libcuda {host.compat_driver} from {host.compat_dir} on R{driver_branch}"
            )
        found = f"libcuda {host.compat_driver}, not newer" if host.compat_driver else "none"
        return CudaRoute(
            "refused",
            host,
            f"the host's NVIDIA driver {host.driver} (branch R{driver_branch}) runs {torch_is} only with CUDA's "
            f"forward-compatibility libraries, and {host.compat_dir} has {found} (an image built on a base "
            f"without cuda-compat-{major}-*: build it on the CUDA base, docs/image.md 'Bases'); CUDA {host.cuda} "
            f"needs driver >= {needed} otherwise; not falling back to the CPU. {what_to_choose()}",
        )
    reachable = f"driver >= {needed}" + (f", or {names} with CUDA's forward-compatibility libraries" if names else "")
    return CudaRoute(
        "refused",
        host,
        f"the host's NVIDIA driver {host.driver} (branch R{driver_branch}) cannot run {torch_is}, which needs "
        f"{reachable}; not falling back to the CPU. {what_to_choose()}",
    )


def load_global(path: str) -> object:
    """dlopen with RTLD_GLOBAL: the library's symbols and soname serve every later load in this process."""
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def use_route(route: CudaRoute, environ: MutableMapping[str, str], load: Callable[[str], object] = load_global) -> None:
    """Take the route before torch loads: refuse, or for forward-compat load the compat libraries and export
    ``LD_LIBRARY_PATH`` into ``environ`` (what child processes inherit)."""
    if route.route == "refused":
        raise GpuUnusableError(route.reason)
    if route.route != "forward-compat":
        return
    for name in COMPAT_LIBRARIES:
        path = route.host.compat_dir / name
        if not path.exists():
            continue
        try:
            load(str(path))
        except OSError as exc:
            raise GpuUnusableError(
                f"the host's NVIDIA driver {route.host.driver} needs CUDA's forward-compatibility libraries, and "
                f"{path} does not load: {exc}; not falling back to the CPU. {what_to_choose()}"
            ) from None
    environ.update(route.environment(environ))


def probe(environ: Mapping[str, str]) -> GpuHost:
    """Read the host and torch once (the edge); everything after works on the returned values.

    torch is imported only where a GPU is present: on a CPU host ``serve`` refuses a bad model in well
    under a second, and this check must not change that."""
    present, driver = gpus_present(environ)
    if not present:
        return GpuHost(present=False, driver=driver, cuda_available=False, cuda_version=None)
    import torch

    available = torch.cuda.is_available()
    capabilities: tuple[tuple[int, int], ...] = ()
    arch_list: list[str] = []
    names: tuple[str, ...] = ()
    if available:
        count = torch.cuda.device_count()
        capabilities = tuple(torch.cuda.get_device_capability(i) for i in range(count))
        names = tuple(torch.cuda.get_device_name(i) for i in range(count))
        arch_list = torch.cuda.get_arch_list()
    return GpuHost(
        present=present,
        driver=driver,
        cuda_available=available,
        cuda_version=torch.version.cuda,
        capabilities=capabilities,
        arch_list=tuple(arch_list),
        torch_version=torch.__version__,
        names=names,
    )


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


def require_usable_gpu(host: GpuHost, route: CudaRoute | None = None) -> None:
    """Raise :class:`GpuUnusableError` when a GPU is present but CUDA cannot use it (else return)."""
    if not host.present:
        return
    needed = host.cuda_version or "none (a CPU-only torch build)"
    major = (host.cuda_version or "").split(".")[0]
    driver_need = f"driver >= {MIN_DRIVER[major]}" if major in MIN_DRIVER else "a matching driver"
    what = f"torch {host.torch_version} is built for CUDA {needed}"
    taken = f" (route {route.route}: {route.reason})" if route is not None and route.reason else ""
    if not host.cuda_available:
        raise GpuUnusableError(
            f"a GPU is present (NVIDIA driver {host.driver or 'version unknown'}) but CUDA cannot start{taken}: "
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


def describe(route: CudaRoute, gpu: GpuHost | None) -> str:
    """The one line ``train`` and ``serve`` log: driver, torch's CUDA runtime, the GPUs, the route."""
    host = route.host
    driver = f"NVIDIA driver {host.driver}" if host.driver else "NVIDIA driver none"
    torch_is = f"torch {host.torch_version or '?'} (CUDA {host.cuda or 'none'} runtime)"
    if not host.present:
        gpus = "no GPU"
    elif gpu is not None and gpu.names:
        caps = [f"sm_{a}{b}" for a, b in gpu.capabilities]
        gpus = f"{len(gpu.names)} GPU(s): " + ", ".join(f"{n} ({c})" for n, c in zip(gpu.names, caps, strict=False))
    else:
        gpus = "GPU(s) present"
    why = f" ({route.reason})" if route.reason and route.route not in ("cpu", "refused") else ""
    return f"device: {driver}, {torch_is}, {gpus}, route {route.route}{why}"


def prepare_device(environ: MutableMapping[str, str]) -> GpuHost:
    """``train``'s and ``serve``'s first step, before torch loads: choose and take the route, check that
    CUDA works, log the line; raises :class:`GpuUnusableError` (the line is logged first)."""
    route = choose_route(read_driver_host(environ))
    try:
        use_route(route, environ)
        gpu = probe(environ)
        require_usable_gpu(gpu, route)
    except GpuUnusableError:
        log.error("%s", describe(route, None))
        raise
    log.info("%s", describe(route, gpu))
    return gpu


__all__ = [
    "CudaRoute",
    "DriverHost",
    "GpuHost",
    "GpuUnusableError",
    "choose_route",
    "prepare_device",
    "probe",
    "read_driver_host",
    "require_usable_gpu",
    "supported",
    "use_route",
]


# oneDNN's ISA cap, under its name and its old one: the CPU features torch's CPU kernels may use.
CPU_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_amx_usable(environ: Mapping[str, str], capability: str | None = None, tiles: bool | None = None) -> bool:
    """Whether torch's CPU kernels may use AMX tiles here: the CPU has them (``tiles``, else asked), ATen runs
    its AVX-512 kernels (``capability``, else ``torch.backends.cpu.get_cpu_capability()``), and oneDNN's ISA cap
    (:data:`CPU_ISA_CAPS` in ``environ``) admits AMX.

    The CPU's flags alone are not enough: the AVX2 class emulated on a Xeon with AMX
    (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, docs/local.md) still reports the tiles, and there
    bfloat16 runs on oneDNN's reference kernels, many times slower than float32 (docs/benchmarks.md).
    """
    if capability is None or tiles is None:
        import torch  # only here: the GPU route above is chosen before torch loads

        capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if capability.upper() != "AVX512":
        return False
    cap = next((environ[name] for name in CPU_ISA_CAPS if environ.get(name)), "").strip().upper()
    if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    return torch.cpu._is_amx_tile_supported() if tiles is None else tiles
