"""Faults injected for real into the `train` entrypoint: SIGTERM during evaluation, damaged checkpoints, full disks.

Each test runs `images/maskrcnn/train` on a hand-made /opt/ml tree and checks what a person sees: the exit code,
the first line of output/failure, and that no training is lost. The full-disk tests mount a tmpfs of a few KiB
(root only; skipped with the reason elsewhere).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_job import TRAIN, env_for, failure_reason, run_train, wait_for_line

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def validation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 held-out synthetic images: an evaluation long enough to be interrupted."""
    from maskrcnn.train.synthetic import write_coco_dataset

    out = tmp_path_factory.mktemp("validation")
    write_coco_dataset(out, num_images=40, seed=11, size=128)
    return out


def test_sigterm_during_evaluation_stops_at_once_with_the_steps_checkpoint(
    make_job, synthetic_dir: Path, validation_dir: Path
) -> None:
    channels = {"training": synthetic_dir, "validation": validation_dir}
    base = make_job({"max_steps": "4"}, channels=channels, name="stopped")
    process = subprocess.Popen(TRAIN, env=env_for(base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(process, "evaluating epoch", timeout=240)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=60)[0]
        elapsed = time.monotonic() - signalled
    finally:
        process.kill()
    assert process.returncode == 143, rest[-3000:]
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    payload = torch.load(base / "checkpoints" / "last.pt", weights_only=True)
    assert payload["global_step"] == 4
    assert not (base / "model" / "model.safetensors").exists(), "a stopped job must not look finished"

    # The restart evaluates and writes the model from the checkpoint: the same weights as a run never stopped.
    resumed = run_train(base)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from checkpoint" in resumed.stdout
    uninterrupted = make_job({"max_steps": "4"}, channels=channels, name="uninterrupted")
    assert run_train(uninterrupted).returncode == 0
    a = load_file(base / "model" / "model.safetensors")
    b = load_file(uninterrupted / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda good: good[: len(good) // 2], id="truncated"),
        pytest.param(lambda good: b"", id="empty"),
        pytest.param(lambda good: b"not a checkpoint at all", id="garbage"),
    ],
)
def test_a_damaged_checkpoint_is_named_and_never_unpickled(make_job, tmp_path: Path, content) -> None:
    base = make_job({"max_steps": "2"})
    assert run_train(base).returncode == 0
    path = base / "checkpoints" / "last.pt"
    path.write_bytes(content(path.read_bytes()))
    result = run_train(base)
    assert result.returncode == 1
    reason = failure_reason(base)
    assert reason.startswith(f"the checkpoint {path} cannot be read"), reason
    assert "remove it" in reason and "weights_only" not in reason


def test_a_foreign_pickle_checkpoint_is_refused_without_running_it(make_job, tmp_path: Path) -> None:
    base = make_job({"max_steps": "2"})
    marker = tmp_path / "ran"
    torch.save({"evil": Evil(str(marker))}, base / "checkpoints" / "last.pt")
    result = run_train(base)
    assert result.returncode == 1
    assert not marker.exists(), "code from the checkpoint ran"
    reason = failure_reason(base)
    assert "cannot be read" in reason and "remove it" in reason and "weights_only" not in reason


class Evil:
    """Pickles to a call of os.system: what a hostile checkpoint would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """``tiny_disk(folder, kib)``: mount a tmpfs of ``kib`` KiB on ``folder`` (unmounted afterwards)."""
    mounted: list[Path] = []

    def mount(folder: Path, kib: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_model_disk_names_the_path_and_loses_no_training(make_job, tiny_disk) -> None:
    base = make_job({"max_steps": "3"})
    tiny_disk(base / "model", 64)
    result = run_train(base)
    assert result.returncode == 1
    reason = failure_reason(base)
    assert reason.startswith(f"no space left on device writing the model to {base / 'model'}"), reason
    # The final checkpoint was written before the model: a rerun with space resumes at the end, not earlier.
    assert torch.load(base / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 3


def test_a_full_checkpoint_disk_names_the_path_and_leaves_no_temporary_file(make_job, tiny_disk) -> None:
    base = make_job({"max_steps": "3"})
    checkpoints = tiny_disk(base / "checkpoints", 64)
    result = run_train(base)
    assert result.returncode == 1
    reason = failure_reason(base)
    assert reason.startswith(f"no space left on device writing {checkpoints / 'last.pt'}"), reason
    assert list(checkpoints.iterdir()) == []
