"""Choices the training job makes from the machine it finds."""

from __future__ import annotations

import pytest
import torch
from maskrcnn.device import cpu_amx_usable
from maskrcnn.train.engine import autocast_dtype, grad_scaler

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
    ("environ", "capability", "usable"),
    [
        ({}, "AVX512", True),  # a Xeon with AMX, nothing capped: bfloat16
        ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "AVX2", False),  # the AVX2 class emulated
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX512", False),  # oneDNN capped below AMX: its bf16 kernels are reference
        ({"DNNL_MAX_CPU_ISA": "avx512_core_bf16"}, "AVX512", False),  # the old name, lower case: still capped
        ({}, "AVX2", False),  # ATen capped (ATEN_CPU_CAPABILITY=avx2 alone)
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "AVX512", True),  # a cap that still admits AMX
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "AVX512", True),
    ],
)
def test_amx_counts_only_where_the_kernels_may_use_it(environ: dict[str, str], capability: str, usable: bool) -> None:
    # The tiles are there in every case (a Sapphire Rapids); what torch may run on them decides.
    assert cpu_amx_usable(environ, capability, tiles=True) is usable
    assert cpu_amx_usable(environ, capability, tiles=False) is False


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


def test_the_config_carries_onednns_cap_and_nothing_else_of_the_environment(tmp_path) -> None:
    from maskrcnn.train.config import TrainConfig

    environ = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "HOME": "/root"}
    config = TrainConfig.from_dicts(tmp_path, {}, {"training": {}}, {}, environ)
    assert config.cpu_env == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert autocast_dtype(torch.device("cpu"), config.cpu_env) is None  # capped below AMX: float32
