"""The training RoIAlign pools and back-propagates exactly as torchvision's kernel does."""

from __future__ import annotations

import pytest
import torch
from maskrcnn.model.roi_align import TrainingRoIAlign, separable_roi_align
from torchvision.ops import MultiScaleRoIAlign, roi_align

pytestmark = pytest.mark.unit


def _rois(count: int, extent: float, generator: torch.Generator) -> torch.Tensor:
    # corners partly outside the map, tiny and huge boxes: every branch of the kernel
    xy = torch.rand(count, 2, generator=generator) * extent * 1.4 - extent * 0.2
    wh = torch.rand(count, 2, generator=generator) * extent + 0.05
    batch = torch.randint(0, 3, (count, 1), generator=generator).float()
    return torch.cat([batch, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    ("height", "width", "pooled", "scale", "samples"),
    [(20, 20, 7, 0.25, 2), (13, 9, 14, 0.125, 2), (6, 11, (5, 3), 0.5, 3)],
)
def test_outputs_and_gradients_match_torchvision(aligned, height, width, pooled, scale, samples) -> None:
    generator = torch.Generator().manual_seed(height * width)
    features = torch.randn(3, 8, height, width, generator=generator, dtype=torch.float64)
    rois = _rois(40, max(height, width) / scale, generator).double()
    size = pooled if isinstance(pooled, tuple) else (pooled, pooled)
    upstream = torch.randn(40, 8, *size, generator=generator, dtype=torch.float64)

    results = []
    for pool in (roi_align, separable_roi_align):
        leaf = features.clone().requires_grad_(True)
        out = pool(leaf, rois, size, scale, samples, aligned)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf.grad))
    (expected, expected_grad), (actual, actual_grad) = results
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-9, atol=1e-9)


def test_adaptive_sampling_is_refused() -> None:
    with pytest.raises(ValueError, match="sampling_ratio"):
        separable_roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (2, 2), 1.0, 0)


def test_multiscale_pooler_matches_torchvision_across_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    features = {
        name: torch.randn(2, 4, 64 // 2**i, 64 // 2**i, generator=generator) for i, name in enumerate(["0", "1", "2"])
    }
    boxes = []
    for _ in range(2):  # small boxes land on the fine level, large ones on the coarse level
        xy = torch.rand(30, 2, generator=generator) * 200
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(30, 2, generator=generator) * 150], dim=1))
    shapes = [(256, 256)] * 2
    reference = MultiScaleRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=64)
    ours = TrainingRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=64)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape[0])
        return separable_roi_align(*args, **kwargs)

    monkeypatch.setattr("maskrcnn.model.roi_align.separable_roi_align", counted)
    leaves = {k: v.clone().requires_grad_(True) for k, v in features.items()}
    out = ours(leaves, boxes, shapes)
    assert len(calls) == 3 and sum(calls) == 60  # training: the separable form, once per level, every region
    torch.testing.assert_close(out, reference(features, boxes, shapes), rtol=1e-5, atol=1e-5)
    calls.clear()
    with torch.no_grad():  # inference keeps torchvision's kernel
        torch.testing.assert_close(ours(features, boxes, shapes), reference(features, boxes, shapes))
    assert calls == []


def test_a_level_without_regions_still_gives_its_parameters_a_gradient() -> None:
    """DDP without find_unused_parameters fails a step where a parameter gets no gradient."""
    weights = {name: torch.nn.Parameter(torch.ones(())) for name in ["0", "1", "2"]}
    generator = torch.Generator().manual_seed(0)
    features = {
        name: torch.randn(1, 4, 64 // 2**i, 64 // 2**i, generator=generator) * weights[name]
        for i, name in enumerate(["0", "1", "2"])
    }
    boxes = [torch.tensor([[0.0, 0.0, 250.0, 250.0], [10.0, 10.0, 240.0, 200.0]])]  # all on the coarse level
    pooled = TrainingRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=64)(features, boxes, [(256, 256)])
    pooled.sum().backward()
    assert all(w.grad is not None for w in weights.values()), {k: w.grad for k, w in weights.items()}
    assert float(weights["0"].grad) == 0.0 and float(weights["2"].grad) != 0.0
