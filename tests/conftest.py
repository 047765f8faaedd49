"""Shared fixtures, and the one rule of the test tree: a marker per layer, a folder per area.

Layers are pytest markers (registered in pyproject.toml), and only markers: ``unit``, ``integration``,
``container``, ``gpu``. Every test carries exactly one; a module whose tests are all of one layer says so once
(``pytestmark = pytest.mark.unit``, or a list holding it beside e.g. a ``skipif``), a module that mixes layers
marks each test. A test with no layer marker, or with two, is a collection error naming it: no folder and no
default gives a layer. Select a layer with ``-m`` (``pytest -m unit``), never with a path.

Folders are areas, what the tests are about, and only areas: ``train/``, ``model/``, ``serving/``, ``image/``,
``local/``, ``pipeline/`` (tests/README.md). ``pytest tests/serving -m unit`` is one area's unit tests.

A layer whose prerequisite is missing is skipped with the reason printed (-ra); set
``MASKRCNN_REQUIRE_LAYERS=container,gpu`` (CI does for the layers it provides) to turn such a skip
into a failure, so CI never silently skips a layer it can run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import write_job_tree
from tiny import TINY_HP

LAYERS = ("unit", "integration", "container", "gpu")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: an unmarked test must not just vanish from `-m unit`
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every collected test has exactly one layer marker; otherwise collection stops, naming the tests."""
    wrong = []
    for item in items:
        layers = sorted({m.name for m in item.iter_markers() if m.name in LAYERS})
        if len(layers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(layers) if layers else 'no layer marker'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) without exactly one layer marker ({', '.join(LAYERS)}); declare it with "
            "`pytestmark = pytest.mark.<layer>` in the module, or on each test of a module that mixes layers "
            "(tests/README.md):\n" + "\n".join(wrong)
        )


REQUIRED_LAYERS = frozenset(  # read at import, before any test fixture edits the environment
    x.strip() for x in os.environ.get("MASKRCNN_REQUIRE_LAYERS", "").split(",") if x.strip()
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A skip in a layer this run requires is a failure: CI never silently skips a layer it can run."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    demanded = {m.name for m in item.iter_markers()} & REQUIRED_LAYERS
    if demanded:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"layer {sorted(demanded)} is required (MASKRCNN_REQUIRE_LAYERS) but was skipped: {reason}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SageMaker or project variable leaks from the developer's shell into a test."""
    for name in list(os.environ):
        if name.startswith(("SAGEMAKER_", "SM_", "MASKRCNN_")) or name == "TRAINING_JOB_NAME":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic COCO dataset (16 images, 128 px), written once per session."""
    from maskrcnn.train.synthetic import write_coco_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_coco_dataset(out, num_images=16, seed=3, size=128)
    return out


@pytest.fixture
def make_job(tmp_path: Path, synthetic_dir: Path) -> Callable[..., Path]:
    """``make_job(hyperparameters, channels, host=, hosts=, distribution=, name=)``: one host's /opt/ml tree
    under the test's tmp dir, laid out as SageMaker and the harness do (``support.write_job_tree``); returns its
    base directory. The tiny job (four steps) with ``hyperparameters`` over it; the session's synthetic dataset
    as ``training`` unless ``channels`` says otherwise."""

    def make(
        hyperparameters: dict[str, Any] | None = None,
        channels: dict[str, Path] | None = None,
        *,
        host: str = "algo-1",
        hosts: int = 1,
        distribution: str = "replicated",
        name: str = "job",
    ) -> Path:
        # Four steps: the fault tests stop, checkpoint and resume inside a job, which two steps leave no room for.
        hp = {**TINY_HP, "max_steps": "4", **(hyperparameters or {})}
        channels = {"training": synthetic_dir} if channels is None else channels
        return write_job_tree(tmp_path / name, hp, channels, host=host, hosts=hosts, distribution=distribution)

    return make


@pytest.fixture(scope="session")  # session: set up, and skipping, before any module fixture builds a model
def need_cuda() -> None:
    """Skip (the gpu layer's prerequisite) where torch sees no CUDA device: every gpu test that needs one uses it."""
    import torch  # here, not at the top: areas that need no torch (pipeline, local unit) do not pay its import

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
