"""Shared by the local harness's tests: the tiny job's settings (a unique module name, unlike conftest)."""

from __future__ import annotations

from pathlib import Path

from local.layout import JobSpec

REPO = Path(__file__).resolve().parents[2]

# Tiny and quick on 2 CPU cores; strings, as SageMaker writes them. num_workers=0: no loader processes.
TINY_HP = {
    "arch": "lite",
    "max_steps": "2",
    "batch_size": "2",
    "min_size": "128",
    "max_size": "128",
    "num_workers": "0",
    "log_every": "1",
}


def tiny_spec(dataset: Path, name: str = "tiny-job", **changes: object) -> JobSpec:
    values: dict = {"name": name, "channels": {"training": dataset}, "hyperparameters": dict(TINY_HP)}
    values.update(changes)
    return JobSpec(**values)
