"""Choices the training job makes from the machine it finds."""

from __future__ import annotations

import pytest
import torch
from maskrcnn.training import autocast_dtype


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [
        (True, True, torch.bfloat16),  # AMX tiles: bfloat16 is the fast path
        (False, True, None),  # AVX512-BF16 alone: float32 was faster (396 against 283 ms a step)
        (False, False, None),  # bfloat16 would be emulated
    ],
)
def test_cpu_mixed_precision_only_where_it_is_faster(monkeypatch: pytest.MonkeyPatch, amx: bool,
                                                     avx512_bf16: bool, expected: torch.dtype | None) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert autocast_dtype(torch.device("cpu")) == expected


def test_cuda_trains_in_float16() -> None:
    assert autocast_dtype(torch.device("cuda")) == torch.float16
