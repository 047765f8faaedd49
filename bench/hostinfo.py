"""The machine a benchmark ran on, as its first output line: CPU model, cores, and torch's kernel class.

CPU figures differ about 2x between x86 classes (AVX-512/AMX Xeons against AVX2-only EPYCs), so every
figure names the class it was measured on. ``torch.backends.cpu.get_cpu_capability()`` is what torch
actually dispatches to; ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` emulates the AVX2 class on a
newer machine, and this line shows that too.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from local.runtime import CPU_KERNEL_VARIABLES as EMULATION_VARIABLES


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """``host: <model>, <n> CPUs, torch <version> capability <cap>[, emulated with ...]``."""
    import torch

    emulated = [f"{name}={os.environ[name]}" for name in EMULATION_VARIABLES if os.environ.get(name)]
    return (
        f"host: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"capability {torch.backends.cpu.get_cpu_capability()}"
        + (f" (emulated: {' '.join(emulated)})" if emulated else "")
    )
