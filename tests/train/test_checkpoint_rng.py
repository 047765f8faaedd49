"""A resumed rank continues with its own random state, not rank 0's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from maskrcnn.train import checkpoint
from maskrcnn.train.engine import LoopState

pytestmark = pytest.mark.unit


def parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def test_each_rank_gets_back_its_own_rng_state(tmp_path: Path) -> None:
    torch.manual_seed(1)
    rank0 = checkpoint.rng_state()
    torch.manual_seed(2)
    rank1 = checkpoint.rng_state()
    checkpoint.save(tmp_path, *parts(), None, LoopState(global_step=3), {"job": 1}, rng=[rank0, rank1])
    payload = checkpoint.load(tmp_path)
    assert payload is not None and len(payload["rng"]) == 2

    expected = {}
    for rank, state in enumerate((rank0, rank1)):
        torch.set_rng_state(state["cpu"])
        expected[rank] = torch.rand(4)
    torch.manual_seed(99)
    for rank in (1, 0):
        checkpoint.restore(payload, *parts(), None, rank=rank)
        assert torch.equal(torch.rand(4), expected[rank])
    assert not torch.equal(expected[0], expected[1])
