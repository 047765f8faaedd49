"""Shared by the local harness's tests: the tiny job as a JobSpec (a unique module name, unlike conftest)."""

from __future__ import annotations

from pathlib import Path

from tiny import TINY_HP

from local.layout import JobSpec


def tiny_spec(dataset: Path, name: str = "tiny-job", **changes: object) -> JobSpec:
    values: dict = {"name": name, "channels": {"training": dataset}, "hyperparameters": dict(TINY_HP)}
    values.update(changes)
    return JobSpec(**values)
