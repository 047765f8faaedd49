"""Architectures, pretrained files and the saved-model format (no pickle ever runs)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from maskrcnn.errors import ModelError
from maskrcnn.model import ModelSpec, build_model, load_model, load_pretrained, save_model


@pytest.fixture(scope="module")
def lite() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lite", 4, 96, 96).eval()


def test_lite_predicts_boxes_masks_scores_in_input_coordinates(lite: torch.nn.Module) -> None:
    with torch.inference_mode():
        (out,) = lite([torch.rand(3, 80, 120)])
    assert set(out) == {"boxes", "labels", "scores", "masks"}
    assert out["masks"].shape[1:] == (1, 80, 120)


def test_saved_model_round_trips_to_identical_predictions(lite: torch.nn.Module, tmp_path: Path) -> None:
    spec = ModelSpec(arch="lite", class_names=("a", "b", "c"), min_size=96, max_size=96, score_threshold=0.0)
    save_model(tmp_path, lite, spec)
    loaded, loaded_spec = load_model(tmp_path)
    assert loaded_spec == spec and loaded_spec.num_classes == 4
    image = torch.rand(3, 96, 96)
    with torch.inference_mode():
        a, b = lite([image])[0], loaded([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_weights_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    boom = _Boom()
    boom.marker = str(marker)  # type: ignore[attr-defined]
    (tmp_path / "model.pth").write_bytes(pickle.dumps({"model": boom}))
    with pytest.raises(ModelError, match=r"pickled weights are never loaded"):
        load_model(tmp_path)
    model = build_model("lite", 4)
    with pytest.raises(ModelError, match=r"not a tensor-only weights file"):
        load_pretrained(model, tmp_path / "model.pth")
    assert not marker.exists()


def test_detection_checkpoint_with_other_classes_fills_all_but_the_predictors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model("lite", 91)
    torch.save(source.state_dict(), tmp_path / "coco.pth")
    target = build_model("lite", 3, pretrained=tmp_path / "coco.pth")
    s, t = source.state_dict(), target.state_dict()
    assert torch.equal(s["backbone.fpn.layer_blocks.0.0.weight"], t["backbone.fpn.layer_blocks.0.0.weight"])
    assert t["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3


def test_backbone_only_weights_fill_the_backbone(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(2)
    backbone = resnet18(weights=None)
    torch.save(backbone.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("lite", 3, pretrained=tmp_path / "resnet18.pth")
    loaded = model.state_dict()["backbone.body.layer1.0.conv1.weight"]
    assert torch.equal(loaded, backbone.state_dict()["layer1.0.conv1.weight"])


def test_weights_that_fit_nothing_are_refused(tmp_path: Path) -> None:
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "w.pth")
    with pytest.raises(ModelError, match=r"no tensor of w\.pth fits"):
        build_model("lite", 3, pretrained=tmp_path / "w.pth")


def test_mismatched_weights_are_a_model_error(lite: torch.nn.Module, tmp_path: Path) -> None:
    save_model(tmp_path, lite, ModelSpec(arch="lite", class_names=("a", "b"), min_size=96, max_size=96))
    with pytest.raises(ModelError, match=r"does not match model\.json"):
        load_model(tmp_path)


class _FixedLogits(torch.nn.Module):
    """A mask classifier that always answers ``logits`` (foreground classes only)."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def _square_target(label: int) -> dict[str, torch.Tensor]:
    masks = torch.zeros(1, 96, 96, dtype=torch.uint8)
    masks[0, 20:70, 30:80] = 1
    return {"boxes": torch.tensor([[30.0, 20.0, 80.0, 70.0]]), "labels": torch.tensor([label]), "masks": masks}


def test_mask_classifier_trains_on_each_positive_regions_true_class() -> None:
    torch.manual_seed(3)
    model = build_model("lite", 4, 96, 96).train()
    model.roi_heads.mask_classifier = _FixedLogits([20.0, -20.0, -20.0])  # "class 1", certain
    image = torch.rand(3, 96, 96)
    right = model([image], [_square_target(1)])["loss_mask_class"]
    wrong = model([image], [_square_target(3)])["loss_mask_class"]
    assert float(right) < 1e-6 and float(wrong) > 30  # cross-entropy of 40 logits apart


def test_mask_classifier_gradient_reaches_the_mask_head() -> None:
    torch.manual_seed(4)
    model = build_model("lite", 4, 96, 96).train()
    model([torch.rand(3, 96, 96)], [_square_target(2)])["loss_mask_class"].backward()
    grad = model.roi_heads.mask_head[0][0].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_detection_scores_are_rescored_by_the_mask_classifier() -> None:
    from torchvision.models.detection.roi_heads import RoIHeads

    torch.manual_seed(5)
    model = build_model("lite", 4, 96, 96).eval()
    heads = model.roi_heads
    heads.score_thresh = 0.01
    heads.mask_classifier = _FixedLogits([0.0, 0.0, 40.0])  # "class 3", certain
    with torch.inference_mode():
        images, _ = model.transform([torch.rand(3, 96, 96)])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        (plain,), _ = RoIHeads.forward(heads, features, proposals, images.image_sizes)
        (rescored,), _ = heads(features, proposals, images.image_sizes)
    assert (plain["labels"] != 3).any() and (plain["labels"] == 3).any()
    threes = plain["labels"] == 3
    expected = plain["scores"][threes].sqrt()  # geometric mean with probability 1
    assert (rescored["labels"] == 3).all()  # the others' probability is 0: dropped below the threshold
    assert torch.allclose(rescored["scores"], expected.sort(descending=True).values)
    assert len(rescored["masks"]) == len(rescored["boxes"]) == len(rescored["scores"])


def test_lite_masks_do_not_depend_on_the_class() -> None:
    """One outline per region: a region given the wrong class still gets the mask every class trains."""
    torch.manual_seed(6)
    predictor = build_model("lite", 4, 96, 96).roi_heads.mask_predictor
    logits = predictor(torch.rand(5, 64, 14, 14))
    assert logits.shape == (5, 4, 28, 28)
    assert all(torch.equal(logits[:, 0], logits[:, k]) for k in range(1, 4))
    logits[:, 3].sum().backward()  # the loss of a class-3 region trains the one shared mask
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in predictor.parameters())


def test_lite_box_head_cannot_go_silent() -> None:
    """Pushed where unnormalised ReLU units die (every pre-activation negative), torchvision's conv head
    answers all zeros and learns nothing more; lite's head, normalised before its ReLU, still fires."""
    from maskrcnn.model import group_norm
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

    torch.manual_seed(7)
    ours = build_model("lite", 4, 96, 96).roi_heads.box_head
    plain = FastRCNNConvFCHead((96, 7, 7), [96, 96], [256], norm_layer=group_norm)
    regions = torch.rand(32, 96, 7, 7)
    with torch.no_grad():
        for head in (ours, plain):
            for module in head.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.sub_(0.05)
                    if module.bias is not None:
                        module.bias.fill_(-1.0)
        silent, alive = plain(regions), ours(regions)
    assert not bool((silent > 0).any())
    active = (alive > 0).float().mean(dim=1)  # per region: about half the units fire
    assert alive.shape == (32, 256) and bool(((active > 0.25) & (active < 0.75)).all())
