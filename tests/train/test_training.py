"""Choices the training job makes from the machine it finds."""

from __future__ import annotations

import pytest
import torch
from maskrcnn.train.job import autocast_dtype, grad_scaler

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("amx", "expected"),
    [
        (True, torch.bfloat16),  # AMX tiles: bfloat16 is the fast path
        (False, None),  # AVX512-BF16 alone was slower than float32 (396 against 283 ms a step); none: emulated
    ],
)
def test_cpu_mixed_precision_only_where_it_is_faster(amx: bool, expected: torch.dtype | None) -> None:
    assert autocast_dtype(torch.device("cpu"), amx=amx) == expected


@pytest.mark.parametrize(
    ("bf16_supported", "expected", "scaled"),
    [
        (True, torch.bfloat16, False),  # Ampere, Hopper: bfloat16, no GradScaler
        (False, torch.float16, True),  # Turing (T4) and older: float16 with loss scaling
    ],
)
def test_cuda_mixed_precision_bfloat16_where_the_gpu_has_it(
    bf16_supported: bool, expected: torch.dtype, scaled: bool
) -> None:
    dtype = autocast_dtype(torch.device("cuda", 0), bf16_supported=bf16_supported)
    assert dtype == expected
    assert (grad_scaler(dtype) is not None) is scaled
    assert grad_scaler(None) is None
