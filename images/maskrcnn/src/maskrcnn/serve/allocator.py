"""Keep the memory an inference frees inside the process, for the next inference.

glibc's malloc serves a block above its mmap threshold (128 KiB, raised as blocks are freed, but never
past 32 MiB) with a fresh mmap, and gives it back with munmap when it is freed; a freed heap top above
the trim threshold goes back to the kernel too. Mask R-CNN's forward allocates and frees feature maps of
megabytes to tens of megabytes per image, so every call maps fresh pages and the kernel zeroes each one
on first touch: measured with bench/bench_serving.py (docs/serving.md, "bench_serving now") at ~6,400 minor
page faults per 256-px image on the lite model, and a forward pass 10-16 % slower than with the memory
kept.

:func:`keep_freed_memory` raises both thresholds with ``mallopt(3)`` to :data:`KEEP_BYTES`, so blocks
up to that size come from (and go back to) the heap, which stays mapped. The price is resident memory:
a worker keeps its largest inference's working set (+50 MB on the lite model at 256 px). Blocks above
``KEEP_BYTES`` (a very large image) are still mapped and unmapped per call, so memory stays bounded.

It changes nothing where the C library is not glibc, or where the process was started with its own
malloc settings (``GLIBC_TUNABLES`` naming ``glibc.malloc``, or ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``): whoever set those chose already.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

KEEP_BYTES = 256 * 1024 * 1024  # a 1333 x 800 image's largest feature map is ~70 MB
# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory(environ: Mapping[str, str] | None = None, keep_bytes: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``keep_bytes``; True when it did."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in USER_SETTINGS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        log.debug("malloc settings come from the environment; left as they are")
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only: musl has a mallopt that does nothing)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either value also turns off glibc's dynamic threshold.
    kept = bool(mallopt(M_MMAP_THRESHOLD, keep_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, keep_bytes))
    if kept:
        log.debug("malloc keeps freed blocks up to %d MiB mapped", keep_bytes >> 20)
    return kept
