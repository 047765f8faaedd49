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
