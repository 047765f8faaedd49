"""Architectures, pretrained weights from files, and the saved-model format.

Architectures (``arch``):

* ``resnet50_fpn`` / ``resnet50_fpn_v2``: torchvision's Mask R-CNN, for GPUs.
* ``lite``: a CPU-sized preset for laptops and CI: ResNet-18 body without its last stage, a 96-channel
  FPN on strides 4-16 whose RPN proposes from strides 8-32 only (:class:`LevelsRPN`), a box head of two
  GroupNorm convolutions and one LayerNorm'd 256-wide layer (:class:`BoxHead`), a narrow two-layer mask
  head predicting one mask for all classes from features pooled one FPN level finer than the box head's,
  fewer proposals, and :class:`MaskClassifyingRoIHeads` (a second class opinion from the mask head's
  features). At small image sizes the heads dominate the cost, so they shrink the most; training pools
  regions with :class:`maskrcnn.model.roi_align.TrainingRoIAlign` (same values, fast backward).

Pretrained weights come only from a file (the ``pretrained`` channel, or a path baked into the
image): a detection checkpoint of the same architecture or a backbone (ImageNet) state dict, as
``.safetensors`` or a tensor-only ``.pth`` read with ``weights_only=True``. Nothing is downloaded. A file
is applied whole or refused (:func:`check_pretrained`); only the class-specific predictor layers of a
checkpoint with other classes start afresh. With pretrained weights the backbone is fine-tuned as
torchvision's builders do it: its BatchNorm frozen (:class:`FrozenBatchNorm2d`: the file's statistics, not
a small batch's) and only its last ``trainable_backbone_layers`` stages trained (docs/image.md).

The saved model (``/opt/ml/model``) is ``model.safetensors`` (the state dict; loading it runs no
code) and ``model.json`` (:class:`~maskrcnn.model.format.ModelSpec`, in a module of its own so that
``serve`` checks a saved model without importing torch: everything serving needs to rebuild the network
and answer requests). :func:`load_model` refuses any other weights file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _resnet_fpn_extractor,
    _validate_trainable_layers,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import Conv2dNormActivation
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from maskrcnn.errors import ModelError
from maskrcnn.model.format import (
    BATCH_NORM,
    FORMAT_VERSION,
    FROZEN_BATCH_NORM,
    GROUP_NORM,
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelSpec,
    check_saved_model,
)
from maskrcnn.model.roi_align import TrainingRoIAlign

log = logging.getLogger(__name__)

# (min_size, max_size) used when the hyperparameters leave them at 0
CANONICAL_SCALE = 64  # lite: box side pooled from the deepest level (torchvision's default: 224)
MASK_CANONICAL_SCALE = 128  # lite's masks: the same rule one level finer (docs/benchmarks.md)
DEFAULT_SIZES = {"lite": (256, 512), "resnet50_fpn": (800, 1333), "resnet50_fpn_v2": (800, 1333)}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: normalises the same way in training and inference, at any batch size."""
    return nn.GroupNorm(16, channels)


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same state dict) computed in the input's dtype.

    torchvision's multiplies the input by a float32 scale: under autocast a bfloat16 activation times a
    float32 tensor promotes to float32 (``mul`` and ``add`` are on no autocast list), so every frozen layer of
    the ResNet body would hand float32 to the next ReLU and convolution (twice the memory traffic, and a cast
    back before each convolution). Here the scale and shift are computed in float32 from the buffers and cast
    to the input's dtype; a float32 input gives exactly torchvision's result.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)


# The ResNet body's normalisation, by its name in model.json (``backbone_norm``), and its module type
NORM_LAYERS: dict[str, tuple[Callable[[int], nn.Module], type[nn.Module]]] = {
    FROZEN_BATCH_NORM: (FrozenBatchNorm2d, FrozenBatchNorm2d),
    BATCH_NORM: (nn.BatchNorm2d, nn.BatchNorm2d),
    GROUP_NORM: (group_norm, nn.GroupNorm),
}
# ... when trained from scratch, and for models saved before model.json recorded it
SCRATCH_NORM = {"lite": GROUP_NORM, "resnet50_fpn": BATCH_NORM, "resnet50_fpn_v2": BATCH_NORM}
# The files each architecture takes (docs/image.md says the same)
ACCEPTS = {
    "lite": "a ResNet-18 backbone state dict (e.g. torchvision's ResNet18_Weights.IMAGENET1K_V1; its layer4 and "
    "fc are not used) or a lite checkpoint (a model.safetensors trained by this image)",
    "resnet50_fpn": "a ResNet-50 backbone state dict (e.g. ResNet50_Weights.IMAGENET1K_V1/V2; fc is not used) or a "
    "maskrcnn_resnet50_fpn checkpoint (MaskRCNN_ResNet50_FPN_Weights.COCO_V1, or a model this image trained)",
    "resnet50_fpn_v2": "a ResNet-50 backbone state dict (e.g. ResNet50_Weights.IMAGENET1K_V1/V2; fc is not used) or "
    "a maskrcnn_resnet50_fpn_v2 checkpoint (MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, or a model this image "
    "trained)",
}
# Layers whose shape follows the number of classes: a checkpoint's are used only when the classes agree
CLASS_LAYERS = (
    "roi_heads.box_predictor.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
    "roi_heads.mask_classifier.fc.",
)


def build_model(
    arch: str,
    num_classes: int,
    min_size: int = 0,
    max_size: int = 0,
    *,
    pretrained: Path | None = None,
    trainable_backbone_layers: int = 3,
    max_detections: int = 100,
    backbone_norm: str | None = None,
) -> nn.Module:
    """A Mask R-CNN for ``num_classes`` (background included), optionally initialised from a file.

    ``backbone_norm`` (serving: model.json's) overrides the body's normalisation; by default it is frozen
    BatchNorm with pretrained weights that carry BatchNorm statistics, else the architecture's own.
    """
    state = read_state_dict(pretrained) if pretrained is not None else None
    if backbone_norm is None:
        backbone_norm = _pretrained_norm(arch, state) if state is not None else SCRATCH_NORM[arch]
    # torchvision's rule: every backbone stage trains from scratch; with pretrained weights only the last few
    from_file = state is not None
    trainable = _validate_trainable_layers(from_file, trainable_backbone_layers if from_file else None, 5, 3)
    model = _build(arch, num_classes, min_size, max_size, backbone_norm, trainable, max_detections)
    if state is not None and pretrained is not None:  # (both or neither: mypy cannot tell)
        _load_whole(model, state, arch, pretrained.name)
    return model


def _build(
    arch: str, num_classes: int, min_size: int, max_size: int, norm: str, trainable: int, max_detections: int
) -> MaskRCNN:
    default_min, default_max = DEFAULT_SIZES[arch]
    sizes = {"min_size": min_size or default_min, "max_size": max_size or default_max}
    if arch == "lite":
        return _lite(num_classes, sizes, NORM_LAYERS[norm][0], trainable, max_detections)
    factory = maskrcnn_resnet50_fpn if arch == "resnet50_fpn" else maskrcnn_resnet50_fpn_v2
    model = factory(
        weights=None, weights_backbone=None, num_classes=num_classes, box_detections_per_img=max_detections, **sizes
    )
    # torchvision's builders choose the body's norm and frozen stages only for weights they download; the
    # backbone is built here as they build it then (v1: FrozenBatchNorm2d in the body; v2: BatchNorm2d in
    # its FPN, which the v2 builder keeps, and here frozen BatchNorm in the body too, as for v1).
    body = resnet50(weights=None, norm_layer=NORM_LAYERS[norm][0])
    fpn_norm = nn.BatchNorm2d if arch == "resnet50_fpn_v2" else None
    model.backbone = _resnet_fpn_extractor(body, trainable, norm_layer=fpn_norm)
    for name in ("box_roi_pool", "mask_roi_pool"):  # same pooling, a backward pass fast on CPU
        pool = getattr(model.roi_heads, name)
        setattr(
            model.roi_heads,
            name,
            TrainingRoIAlign(
                pool.featmap_names,
                pool.output_size,
                pool.sampling_ratio,
                canonical_scale=pool.canonical_scale,
                canonical_level=pool.canonical_level,
            ),
        )
    return model


LITE_CHANNELS = 96  # the FPN's width, and so the RPN's and both heads' input
LITE_LEVELS = ["0", "1", "2"]  # the FPN's outputs (strides 4, 8, 16), which both heads pool from
LITE_RPN_LEVELS = ["1", "2", "pool"]  # strides 8 to 32 (see _lite_rpn)


def _lite(
    num_classes: int,
    sizes: dict[str, int],
    norm: Callable[[int], nn.Module],
    trainable_layers: int,
    max_detections: int,
) -> MaskRCNN:
    """lite (module docstring): a small ResNet-18 FPN, an RPN on three levels, and narrow heads.

    The parts are built in one fixed order, so a seed gives the same initial weights.
    """
    model = MaskRCNN(
        _lite_backbone(norm, trainable_layers),
        num_classes=None,  # the predictors carry it
        **_lite_rpn(),
        **_lite_box_branch(num_classes),
        **_lite_mask_branch(num_classes),
        **sizes,
    )
    model.rpn = LevelsRPN.from_rpn(model.rpn, LITE_RPN_LEVELS)
    model.roi_heads = _lite_roi_heads(model.roi_heads, num_classes, max_detections)
    return model


def _lite_backbone(norm: Callable[[int], nn.Module], trainable_layers: int) -> BackboneWithFPN:
    """ResNet-18 without layer4, its first ``5 - trainable_layers`` stages frozen, under a GroupNorm FPN."""
    # Pretrained ImageNet statistics stay frozen; from scratch, GroupNorm: BatchNorm's running averages
    # lag far behind weights that change this fast, so evaluation would see other features than training.
    body = resnet18(weights=None, norm_layer=norm)
    # layer4 holds 8 of ResNet-18's 11M parameters and sees objects at stride 32, which small images
    # barely have; without it the network is 4x smaller, faster, and learns far quicker from scratch.
    del body.layer4
    stages = ["layer3", "layer2", "layer1", "conv1"][: max(trainable_layers - 1, 0)]
    if trainable_layers == 5:
        stages.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(stage) for stage in stages):
            parameter.requires_grad_(False)
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
        in_channels_list=[64, 128, 256],
        out_channels=LITE_CHANNELS,
        norm_layer=group_norm,
    )


def _lite_rpn() -> dict[str, Any]:
    """MaskRCNN's RPN arguments: anchors for strides 8 to 32 and fewer proposals."""
    # Proposals from strides 8 to 32 only (LITE_RPN_LEVELS): the stride-4 level held most of the anchors and
    # much of a step's time, for 12-16 px anchors that small images rarely need (docs/benchmarks.md, session 5).
    anchors = AnchorGenerator(sizes=((16, 24), (32, 48), (64, 128)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    return {
        "rpn_anchor_generator": anchors,
        "rpn_head": RPNHead(LITE_CHANNELS, anchors.num_anchors_per_location()[0]),
        # 300 candidates per level and 150 regions per image still cover the few objects of a small image,
        # and the region NMS over more was a sizeable part of a late training step (docs/benchmarks.md).
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
        "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_test": 300,
    }


def _lite_box_branch(num_classes: int) -> dict[str, Any]:
    """MaskRCNN's box arguments: 7x7 pooling by lite's level rule, a convolutional head, the class predictor."""
    # FPN's level rule sends a 224-px box to stride 16; at lite's small image sizes nearly every object
    # would land on the shallowest level, whose features barely tell a circle from a square. Sending a
    # 64-px box to stride 16 (CANONICAL_SCALE; 32 px to stride 8) pools every object from features with some depth.
    return {
        "box_roi_pool": TrainingRoIAlign(LITE_LEVELS, output_size=7, sampling_ratio=2, canonical_scale=CANONICAL_SCALE),
        # Two 3x3 convolutions before the FC layer: telling a circle from a rotated square in a 7x7 pool is a
        # spatial question, which a flat MLP learns far more slowly (docs/benchmarks.md).
        "box_head": BoxHead(LITE_CHANNELS, 7, 256),
        "box_predictor": FastRCNNPredictor(256, num_classes),
    }


def _lite_mask_branch(num_classes: int) -> dict[str, Any]:
    """MaskRCNN's mask arguments: 14x14 pooling one level finer than the box's, a narrow head, one mask for all."""
    # Masks pool one level finer than the class: a 40-px object covers 10x10 cells at stride 4 but only 5x5
    # at stride 8, too coarse to see where a shape in front cuts it off (with the box head's rule the
    # model painted partly hidden shapes whole; docs/benchmarks.md).
    pool = TrainingRoIAlign(LITE_LEVELS, output_size=14, sampling_ratio=2, canonical_scale=MASK_CANONICAL_SCALE)
    return {
        "mask_roi_pool": pool,
        "mask_head": MaskRCNNHeads(LITE_CHANNELS, [64, 64], 1, norm_layer=group_norm),
        # The predictor's 2x2 transposed convolution upsamples to 32 channels, not 64: its 28x28 map for each
        # region is memory traffic more than arithmetic, so the narrower layer makes a step cheaper for no
        # loss of held-out AP (docs/benchmarks.md, "Fewer repeats and a narrower mask predictor").
        "mask_predictor": ClassAgnosticMaskPredictor(64, 32, num_classes),
    }


def _lite_roi_heads(heads: RoIHeads, num_classes: int, max_detections: int) -> MaskClassifyingRoIHeads:
    """torchvision's RoI heads (``heads``' modules) with lite's sampling and NMS, and a mask classifier."""
    return MaskClassifyingRoIHeads(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        # 48 sampled regions per image, up to half of them objects: the positives train the box classifier,
        # the masks and the mask classifier; more regions learn more per step but cost more per step (the
        # mask head runs on every positive), and within the demo's budget 48 learned most (docs/benchmarks.md).
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=48,
        positive_fraction=0.5,
        # NMS at IoU 0.4: the boxes that survive 0.5 are mostly fragments of an object (a third to half of its
        # box) or two objects at once, which 0.4 removes; held-out AP rose on every model tried (docs/benchmarks.md).
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.4,
        detections_per_img=max_detections,
        mask_roi_pool=heads.mask_roi_pool,
        mask_head=heads.mask_head,
        mask_predictor=heads.mask_predictor,
        mask_classifier=MaskClassifier(64, num_classes, width=32),
    )


class LevelsRPN(RegionProposalNetwork):
    """torchvision's RPN on a subset of the feature levels (``levels``, in order); the others are ignored."""

    def __init__(self, levels: list[str], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.levels = levels

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork, levels: list[str]) -> LevelsRPN:
        """The same RPN (its modules and every setting) restricted to ``levels``."""
        return cls(
            levels,
            rpn.anchor_generator,
            rpn.head,
            fg_iou_thresh=rpn.proposal_matcher.high_threshold,
            bg_iou_thresh=rpn.proposal_matcher.low_threshold,
            batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
            positive_fraction=rpn.fg_bg_sampler.positive_fraction,
            pre_nms_top_n=rpn._pre_nms_top_n,
            post_nms_top_n=rpn._post_nms_top_n,
            nms_thresh=rpn.nms_thresh,
            score_thresh=rpn.score_thresh,
        )

    def forward(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        return super().forward(images, {name: features[name] for name in self.levels}, targets)


class BoxHead(nn.Sequential):
    """torchvision's FastRCNNConvFCHead (two 3x3 GroupNorm convolutions, one wide layer) with the wide layer
    normalised before its ReLU. Without it, three quarters of the 256 units stop firing for good early in
    training from scratch (measured on two trained models: 59 and 60 of 256 ever active)."""

    def __init__(self, channels: int, pooled: int, width: int):
        super().__init__(
            Conv2dNormActivation(channels, channels, 3, norm_layer=group_norm),
            Conv2dNormActivation(channels, channels, 3, norm_layer=group_norm),
            nn.Flatten(),
            nn.Linear(channels * pooled * pooled, width, bias=False),
            nn.LayerNorm(width),
            nn.ReLU(inplace=True),
        )


class ClassAgnosticMaskPredictor(MaskRCNNPredictor):
    """One mask per region whatever its class, presented as the same mask for every class.

    torchvision's loss and inference pick the channel of the region's class; here every channel is one
    and the same (an expanded view), so each object trains it, three times the signal per weight with three
    classes, and a region given the wrong class still gets the right outline.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__(in_channels, dim_reduced, 1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits.expand(-1, self.num_classes, -1, -1)


class MaskClassifier(nn.Module):
    """Class logits (foreground classes only) from the mask head's 14x14 features of a region.

    Two GroupNorm convolutions (the first halves the grid) and one linear layer. No ReLU sits between
    unnormalised linear layers: a first version with a 128-wide hidden layer lost 124 of its 128 units
    to ReLUs that never fire again within a few hundred steps (all 128 with another seed), and the
    classifier never learned (held-out AP50 0.73 against 0.85).
    """

    def __init__(self, in_channels: int, num_classes: int, pooled: int = 14, width: int = 32):
        super().__init__()
        reduced = (pooled + 1) // 2
        self.conv = nn.Sequential(
            Conv2dNormActivation(in_channels, width, 3, stride=2, norm_layer=group_norm),
            Conv2dNormActivation(width, width, 3, norm_layer=group_norm),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(width * reduced * reduced, num_classes - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


class MaskClassifyingRoIHeads(RoIHeads):
    """torchvision's RoIHeads plus a second opinion on each region's class from the mask head's features.

    The box head sees a 7x7 pool of every sampled region, background included; telling a circle from a
    rotated square there is slow to learn from scratch (the lite model's largest error: a rectangle read as
    a circle a quarter of the time). The mask head already learns each object's outline at 14x14, so a small
    classifier over its features (:class:`MaskClassifier`) learns the class from the outline.

    Training: cross-entropy of that classifier on the regions the mask head trains on (``loss_mask_class``);
    its gradient also shapes the shared features. Inference: each detection's score becomes the geometric
    mean of the box head's score for its class and the mask classifier's probability of the same class,
    so that of the two answers the box head hedges between ("circle 0.60", "rectangle 0.56") the one the
    outline contradicts drops; that is then multiplied by the mask's own confidence (:func:`mask_quality`).
    ``score_thresh`` and ``detections_per_img`` apply to the final scores: the box head's candidates are
    taken down to ``score_thresh ** 2`` (the lowest box score that can still pass, as the probability is at
    most 1) and up to twice ``detections_per_img``, then rescored; only those still above ``score_thresh``
    go on to the mask predictor, whose masks rescore them once more before the cut and the sort. With a
    single foreground class there is nothing to tell apart: torchvision's path (box scores as they are), and
    the loss is zero.
    """

    def __init__(self, *args: Any, mask_classifier: nn.Module, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mask_classifier = mask_classifier
        self._sampled_labels: list[torch.Tensor] = []

    def select_training_samples(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None
    ) -> Any:
        sampled = super().select_training_samples(proposals, targets)
        self._sampled_labels = sampled[2]  # per image, in the order the mask head will see the positives
        return sampled

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        several = self.box_predictor.cls_score.out_features > 2  # more than one foreground class to tell apart
        if not self.training:
            return (
                self._detect(features, proposals, image_shapes)
                if several
                else super().forward(features, proposals, image_shapes)
            )
        captured: list[torch.Tensor] = []
        hook = self.mask_head.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
            sampled, self._sampled_labels = self._sampled_labels, []
        logits = self.mask_classifier(captured[0]).float()
        labels = torch.cat([image_labels[image_labels > 0] for image_labels in sampled]) - 1
        losses["loss_mask_class"] = (
            nn.functional.cross_entropy(logits, labels) if several and len(labels) else logits.sum() * 0.0
        )
        return result, losses

    def _detect(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Inference: the box head's candidates, rescored by the mask classifier and cut; only the detections
        that survive get a mask (the predictor's transposed convolution on every candidate was 4.7 s of a
        17 s evaluation profile)."""
        threshold: float = self.score_thresh  # type: ignore[has-type]  # torchvision sets it untyped
        limit: int = self.detections_per_img  # type: ignore[has-type]
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        self.score_thresh, self.detections_per_img = threshold**2, 2 * limit
        try:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        finally:
            self.score_thresh, self.detections_per_img = threshold, limit
        mask_features = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        probabilities = self.mask_classifier(mask_features).float().softmax(dim=1)
        # The outline's opinion: candidates that can still pass (the mask factor is at most 1) get a mask.
        candidates: list[torch.Tensor] = []
        rescored_all: list[torch.Tensor] = []
        offset = 0
        for image_scores, image_labels in zip(scores, labels, strict=True):
            agree = probabilities[offset : offset + len(image_labels)].gather(1, (image_labels - 1)[:, None])[:, 0]
            rescored = (image_scores.float() * agree).sqrt()
            candidates.append(torch.where(rescored > threshold)[0] + offset)
            rescored_all.append(rescored)
            offset += len(image_labels)
        chosen = torch.cat(candidates)
        mask_logits = self.mask_predictor(mask_features[chosen])
        quality = mask_quality(mask_logits, torch.cat(labels)[chosen])
        result: list[dict[str, torch.Tensor]] = []
        kept: list[torch.Tensor] = []
        offset, start = 0, 0
        for image_boxes, image_scores, image_labels, rescored, picked in zip(
            boxes, scores, labels, rescored_all, candidates, strict=True
        ):
            final = rescored[picked - offset] * quality[start : start + len(picked)]
            keep = torch.where(final > threshold)[0]
            keep = keep[final[keep].argsort(descending=True)][:limit]
            index = picked[keep] - offset
            result.append(
                {
                    "boxes": image_boxes[index],
                    "labels": image_labels[index],
                    "scores": final[keep].to(image_scores.dtype),
                }
            )
            kept.append(keep + start)
            offset += len(image_boxes)
            start += len(picked)
        masks = maskrcnn_inference(mask_logits[torch.cat(kept)], [r["labels"] for r in result])
        for detections, image_masks in zip(result, masks, strict=True):
            detections["masks"] = image_masks
        return result, {}


def mask_quality(mask_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each region's mean mask probability over the pixels its mask keeps (> 0.5), from its class's
    channel of ``mask_logits`` (N, classes, M, M); 0 for an empty mask.

    A confident outline (probabilities near 1 inside) scores near 1, a hesitant one (a fragment, two objects
    at once, a shape hidden behind another) lower: the score then ranks how good the *mask* is likely to
    be, not only the box's class, which is what segm AP ranks (the idea of Mask Scoring R-CNN, Huang et al.
    2019, without its learned head). On trained lite models: held-out segm AP50 +0.009 to +0.015
    (docs/benchmarks.md, "Scoring detections by their masks").
    """
    probs = mask_logits[torch.arange(len(labels), device=labels.device), labels].float().sigmoid()
    inside = probs > 0.5
    return (probs * inside).sum((1, 2)) / inside.sum((1, 2)).clamp_min(1)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt read with ``weights_only=True`` (no code runs)."""
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise ModelError(f"{path.name} is not a tensor-only weights file ({type(exc).__name__}): {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision reference checkpoints nest the weights
    if not isinstance(state, dict):
        raise ModelError(f"{path.name} does not hold a state dict")
    return state


def _pretrained_norm(arch: str, state: dict[str, torch.Tensor]) -> str:
    """Frozen BatchNorm for a file that carries BatchNorm statistics (ImageNet and COCO weights, resnet models
    this image trained); else the architecture's own (a lite model trained from scratch: GroupNorm)."""
    has_statistics = "bn1.running_mean" in state or "backbone.body.bn1.running_mean" in state
    return FROZEN_BATCH_NORM if has_statistics else SCRATCH_NORM[arch]


def _is_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")  # BatchNorm's step counter: FrozenBatchNorm2d has none


def _fit(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """What of ``state`` to load into a network whose state dict is ``target``, or why it does not fit.

    A detection checkpoint (``backbone.body.*`` names) must hold every tensor of the network and no other,
    in the same shapes, except the class-specific layers (CLASS_LAYERS), which start afresh when the
    classes differ. A backbone state dict must hold every tensor of the backbone's body; it may hold layers
    the body does not use (the classifier ``fc``; ``layer4``, which lite drops), nothing else.
    """
    detection = any(name.startswith("backbone.body.") for name in state)
    if detection:
        wanted = {k: v for k, v in target.items() if not _is_counter(k)}
        unused: tuple[str, ...] = ()
    else:
        state = {"backbone.body." + k: v for k, v in state.items()}
        wanted = {k: v for k, v in target.items() if k.startswith("backbone.body.") and not _is_counter(k)}
        unused = ("backbone.body.fc.", "backbone.body.layer4.")
    missing = [k for k in wanted if k not in state]
    unknown = [k for k in state if k not in target and not _is_counter(k) and not k.startswith(unused)]
    other_shape = [
        f"{k} {list(state[k].shape)} (needs {list(v.shape)})"
        for k, v in wanted.items()
        if k in state and state[k].shape != v.shape and not k.startswith(CLASS_LAYERS)
    ]
    problems = [
        f"{len(items)} {what} (e.g. {', '.join(items[:2])})"
        for items, what in (
            (missing, "tensors missing"),
            (unknown, "tensors the network does not have"),
            (other_shape, "tensors of another shape"),
        )
        if items
    ]
    fitting = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    return fitting, "; ".join(problems)


@cache
def _meta_state(arch: str, norm: str) -> dict[str, torch.Tensor]:
    """The state dict of ``arch`` built with ``norm``, on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return _build(arch, 2, 0, 0, norm, 5, 1).state_dict()


def _misfit(arch: str, state: dict[str, torch.Tensor], name: str, reason: str) -> ModelError:
    """The refusal, naming the architectures that would take the file."""
    takers = [
        other
        for other in DEFAULT_SIZES
        if other != arch and not _fit(_meta_state(other, _pretrained_norm(other, state)), state)[1]
    ]
    kind = "detection checkpoint" if any(k.startswith("backbone.body.") for k in state) else "backbone state dict"
    hint = f"it is a {kind} for {' / '.join(takers)}" if takers else f"it is a {kind} that fits no architecture"
    return ModelError(
        f"pretrained weights {name} do not fit arch {arch!r}: {hint} ({reason}); {arch} takes {ACCEPTS[arch]}"
    )


def check_pretrained(arch: str, path: Path) -> None:
    """Raise :class:`ModelError` unless ``path`` initialises ``arch`` whole (what build_model would do)."""
    state = read_state_dict(path)
    reason = _fit(_meta_state(arch, _pretrained_norm(arch, state)), state)[1]
    if reason:
        raise _misfit(arch, state, path.name, reason)


def _load_whole(model: nn.Module, state: dict[str, torch.Tensor], arch: str, name: str) -> None:
    fitting, reason = _fit(model.state_dict(), state)
    if reason:
        raise _misfit(arch, state, name, reason)
    result = model.load_state_dict(fitting, strict=False)
    fresh = [k for k in result.missing_keys if not _is_counter(k)]
    log.info(
        "pretrained %s: loaded %d tensors%s",
        name,
        len(fitting),
        f"; {', '.join(sorted({k.rsplit('.', 1)[0] for k in fresh}))} start afresh" if fresh else "",
    )


def load_pretrained(model: nn.Module, path: Path, arch: str) -> None:
    """Initialise ``model`` (an ``arch``) from every tensor of ``path``, or refuse it whole."""
    _load_whole(model, read_state_dict(path), arch, path.name)


def backbone_norm(model: nn.Module) -> str:
    """The NORM_LAYERS name of the backbone body's normalisation."""
    backbone: Any = _unwrap(model).backbone  # typed as Tensor | Module by nn.Module.__getattr__
    layer = type(backbone.body.bn1)
    if issubclass(layer, nn.SyncBatchNorm):  # BatchNorm2d as a multi-GPU job trains it: the same state dict
        return BATCH_NORM
    return next(name for name, (_, kind) in NORM_LAYERS.items() if kind is layer)


def save_model(model_dir: Path, model: nn.Module, spec: ModelSpec) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.replace(spec, backbone_norm=backbone_norm(model))  # serving rebuilds the trained network
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"arch": spec.arch})
    (model_dir / SPEC_FILE).write_text(spec.to_json())


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the network from model.json and fill it from model.safetensors; eval mode."""
    spec = check_saved_model(model_dir)
    model = build_model(
        spec.arch,
        spec.num_classes,
        spec.min_size,
        spec.max_size,
        max_detections=spec.max_detections,
        backbone_norm=spec.backbone_norm,
    )
    try:
        state = load_file(str(model_dir / WEIGHTS_FILE))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"{WEIGHTS_FILE} does not match model.json ({spec.arch}): {exc}") from None
    model.eval().to(device)
    return model, spec


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the real model
    return inner if isinstance(inner, nn.Module) else model


__all__ = [  # FORMAT_VERSION, ModelSpec ... live in maskrcnn.model.format (no torch); re-exported here
    "FORMAT_VERSION",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "ModelSpec",
    "backbone_norm",
    "build_model",
    "check_pretrained",
    "load_model",
    "load_pretrained",
    "save_model",
]
