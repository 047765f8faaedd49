"""Fixtures of the train area's tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def need_cuda() -> None:
    """Skip (the gpu layer's prerequisite) where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
