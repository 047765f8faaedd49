"""maskrcnn.serve.allocator: a Predictor on the CPU keeps the memory its calls free, so later calls do not
page-fault their feature maps in afresh; malloc settings the process was started with are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from maskrcnn.serve.allocator import keep_freed_memory

# Faults per call of a Predictor in a fresh process: load, warm up, then time N calls on one image.
PROBE = """
import json, resource, sys
from pathlib import Path
import numpy as np
from maskrcnn.serve.predictor import Predictor
from maskrcnn.train.synthetic import make_sample

predictor = Predictor.load(Path(sys.argv[1]), "cpu", threads=1)
image = np.asarray(make_sample(np.random.default_rng(0), 256)[0])
for _ in range(3):
    predictor(image, 0.0, 10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
calls = 8
for _ in range(calls):
    predictor(image, 0.0, 10)
print(json.dumps({"faults_per_call": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls}))
"""


def faults_per_call(model_dir: Path, **env: str) -> float:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir)],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["faults_per_call"])


@pytest.mark.integration
def test_a_predictor_stops_page_faulting_its_working_memory_in_afresh(model_base: Path) -> None:
    kept = faults_per_call(model_base / "model")
    # Any glibc.malloc tunable in the environment makes keep_freed_memory leave glibc's defaults alone
    # (tcache_count=7 is itself the default).
    default = faults_per_call(model_base / "model", GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
    assert default > 500, f"glibc's defaults fault only {default:.0f} pages a call here: the probe measures nothing"
    assert kept < default / 10, f"{kept:.0f} page faults a call kept, {default:.0f} with glibc's defaults"


@pytest.mark.unit
@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
    ],
)
def test_malloc_settings_the_process_started_with_are_left_alone(environ: dict[str, str]) -> None:
    assert keep_freed_memory(environ) is False


@pytest.mark.unit
def test_other_glibc_tunables_do_not_stop_it() -> None:
    # This process runs on glibc (Debian, the image); mallopt accepts the thresholds.
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}) is True
