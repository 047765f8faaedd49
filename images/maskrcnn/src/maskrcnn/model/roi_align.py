"""RoIAlign whose backward pass is fast on CPU, for training.

torchvision's CPU ``roi_align`` backward scatters every sample of every channel one at a time on one
thread; at the small image sizes of the CPU preset it is a third of a training step. With a fixed
``sampling_ratio`` RoIAlign is separable: each pooled value is a weighted sum over rows times a
weighted sum over columns (bilinear interpolation and the average over the sampling grid both
factor), so a region's output is ``Ay @ F @ Ax.T`` per channel, with ``Ay`` (pooled_h x H) and ``Ax``
(pooled_w x W) holding the interpolation weights. Written as matrix products, autograd's backward is
matrix products too: dense, vectorised and multi-threaded.

The weights reproduce torchvision's kernel exactly (``aligned=False`` and ``True``, samples outside
the map contribute nothing, clamping at the border), so forward values agree to float rounding;
``tests/model/test_roi_align.py`` checks outputs and gradients against ``torchvision.ops.roi_align``.
Inference, CUDA and adaptive sampling (``sampling_ratio <= 0``) keep torchvision's kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _axis_weights(start: Tensor, bin_size: Tensor, pooled: int, samples: int, length: int) -> Tensor:
    """(K, pooled, length): the averaged bilinear weights of every pooled cell along one axis."""
    device, dtype = start.device, start.dtype
    cell = torch.arange(pooled, device=device, dtype=dtype)
    sample = torch.arange(samples, device=device, dtype=dtype) + 0.5
    # (K, pooled, samples): sample coordinates, as the CUDA/CPU kernels compute them
    pos = (
        start[:, None, None]
        + cell[None, :, None] * bin_size[:, None, None]
        + sample[None, None, :] * (bin_size / samples)[:, None, None]
    )
    inside = (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.floor().to(torch.int64)
    at_edge = low >= length - 1
    low = torch.where(at_edge, length - 1, low)
    high = torch.where(at_edge, length - 1, low + 1)
    pos = torch.where(at_edge, low.to(dtype), pos)
    frac = pos - low.to(dtype)
    scale = inside.to(dtype) / samples
    weights = torch.zeros(start.shape[0], pooled, length, device=device, dtype=dtype)
    weights.scatter_add_(2, low, (1.0 - frac) * scale)
    weights.scatter_add_(2, high, frac * scale)
    return weights


def separable_roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` for ``sampling_ratio > 0`` as matrix products (see module doc)."""
    if sampling_ratio <= 0:
        raise ValueError("separable_roi_align needs a fixed sampling_ratio > 0")
    pooled_h, pooled_w = output_size
    _, channels, height, width = features.shape
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].to(features.dtype) * spatial_scale - offset
    roi_w = boxes[:, 2] - boxes[:, 0]
    roi_h = boxes[:, 3] - boxes[:, 1]
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    wy = _axis_weights(boxes[:, 1], roi_h / pooled_h, pooled_h, sampling_ratio, height)  # (K, PH, H)
    wx = _axis_weights(boxes[:, 0], roi_w / pooled_w, pooled_w, sampling_ratio, width)  # (K, PW, W)
    output = features.new_empty(rois.shape[0], channels, pooled_h, pooled_w)
    batch_index = rois[:, 0].to(torch.int64)
    for image in torch.unique(batch_index).tolist():
        index = torch.nonzero(batch_index == image).squeeze(1)
        # columns first for all of this image's regions in one product, then rows region by region
        cols = torch.einsum("chw,kqw->kchq", features[image], wx[index])
        output[index] = torch.einsum("kph,kchq->kcpq", wy[index], cols)
    return output


class TrainingRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` that pools with :func:`separable_roi_align` when training on CPU."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if not (torch.is_grad_enabled() and features[0].device.type == "cpu" and self.sampling_ratio > 0):
            return super().forward(x, boxes, image_shapes)
        scales: list[float] | None = self.scales  # type: ignore[has-type]  # torchvision leaves it untyped
        mapper: Any = self.map_levels  # type: ignore[has-type]
        if scales is None or mapper is None:
            scales, mapper = _setup_scales(features, image_shapes, self.canonical_scale, self.canonical_level)
            self.scales, self.map_levels = scales, mapper
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return separable_roi_align(features[0], rois, self.output_size, scales[0], self.sampling_ratio)
        levels = mapper(boxes)
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel():
                result[index] = separable_roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio)
            else:
                # A level with no regions still joins the graph (a zero-size read of its features, as
                # torchvision's roi_align on an empty set does): the FPN convolutions that feed only this
                # level then get a zero gradient, not none, which DDP (without find_unused_parameters)
                # requires of every parameter every step.
                result = result + feature.flatten()[:0].sum()
        return result


__all__ = ["TrainingRoIAlign", "separable_roi_align"]
