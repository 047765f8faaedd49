"""Fine-tuning from pretrained weights through the real `train` entrypoint, then serving the result.

The weights files are shaped exactly like the ones torchvision publishes (COCO ``maskrcnn_resnet50_fpn`` /
``_v2`` checkpoints, an ImageNet ResNet-18 / ResNet-50), made here from torchvision's constructors with
random values: nothing is downloaded. A user fine-tuning expects the frozen part of the network (conv1,
layer1, every BatchNorm of the backbone) to come out exactly as the file had it, the rest to have learned,
and the saved model to serve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from maskrcnn.serve.predictor import Predictor
from safetensors.torch import load_file, save_file
from test_train_job import failure_reason, run_train
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.ops import FrozenBatchNorm2d

pytestmark = pytest.mark.integration

# One step (a ResNet-50 step is seconds on CPU) at the full learning rate (warmup_steps 0), so that every
# trainable tensor visibly moves
FINETUNE_HP = {"max_steps": "1", "batch_size": "1", "warmup_steps": "0", "amp": "false"}
BODY = "backbone.body."


@pytest.fixture(scope="module")
def channels(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic training set and a one-image validation set: the evaluation is not what is tested."""
    from maskrcnn.train.synthetic import write_coco_dataset

    validation = tmp_path_factory.mktemp("validation")
    write_coco_dataset(validation, num_images=1, seed=4, size=128)
    return {"training": synthetic_dir, "validation": validation}


def write_weights(directory: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    """The file a download would be: torch.save's .pth, or .safetensors."""
    directory.mkdir(parents=True)
    path = directory / name
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def frozen_names(saved: dict[str, torch.Tensor]) -> list[str]:
    """The body's tensors that fine-tuning must leave as the file had them: conv1, layer1, every BatchNorm."""
    batch_norms = {k.rsplit(".", 1)[0] for k in saved if k.startswith(BODY) and k.endswith(".running_mean")}
    return [k for k in saved if k.startswith((BODY + "conv1.", BODY + "layer1.")) or k.rsplit(".", 1)[0] in batch_norms]


def check_finetuned_and_served(base: Path, source: dict[str, torch.Tensor], batch_norms: int) -> None:
    """``source``: the file's tensors under the model's names."""
    spec = json.loads((base / "model" / "model.json").read_text())
    assert spec["backbone_norm"] == "frozen_batch_norm"
    saved = load_file(base / "model" / "model.safetensors")
    frozen = frozen_names(saved)
    assert len({k.rsplit(".", 1)[0] for k in frozen if k.endswith(".running_var")}) == batch_norms
    changed = [k for k in frozen if not torch.equal(saved[k], source[k])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"
    trainable = [k for k in saved if k.startswith((BODY + "layer2.", BODY + "layer3.")) and "conv" in k]
    assert trainable and all(not torch.equal(saved[k], source[k]) for k in trainable)

    predictor = Predictor.load(base / "model")
    assert all(type(m) is not torch.nn.BatchNorm2d for m in predictor.model.backbone.body.modules())
    assert isinstance(predictor.model.backbone.body.bn1, FrozenBatchNorm2d)
    detections = predictor(
        np.random.default_rng(0).integers(0, 255, (128, 160, 3), dtype=np.uint8), score_threshold=0.0
    )
    assert detections.boxes.shape[1:] == (4,) and len(detections.scores) == len(detections.boxes)


@pytest.mark.parametrize(
    ("arch", "factory", "filename"),
    [
        ("resnet50_fpn", maskrcnn_resnet50_fpn, "maskrcnn_resnet50_fpn_coco.pth"),
        ("resnet50_fpn_v2", maskrcnn_resnet50_fpn_v2, "maskrcnn_resnet50_fpn_v2_coco.safetensors"),
    ],
)
def test_resnet50_fine_tunes_a_coco_checkpoint_and_serves(
    make_job, channels: dict[str, Path], tmp_path: Path, arch: str, factory, filename: str
) -> None:
    torch.manual_seed(0)
    state = factory(weights=None, weights_backbone=None).state_dict()  # 91 COCO classes, as published
    weights = write_weights(tmp_path / "weights", filename, state)
    base = make_job({**FINETUNE_HP, "arch": arch}, channels={**channels, "pretrained": weights.parent})
    result = run_train(base, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_finetuned_and_served(base, state, batch_norms=53)


def test_lite_fine_tunes_a_resnet18_backbone_and_serves(make_job, channels: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    weights = write_weights(tmp_path / "weights", "resnet18-f37072fd.pth", state)
    base = make_job({**FINETUNE_HP, "arch": "lite"}, channels={**channels, "pretrained": weights.parent})
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # ResNet-18 without layer4: bn1, two BatchNorms in each of 6 blocks, the downsamples of layer2 and layer3
    check_finetuned_and_served(base, {BODY + k: v for k, v in state.items()}, batch_norms=15)


@pytest.fixture(scope="module")
def resnet50_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return write_weights(tmp_path_factory.mktemp("r50") / "weights", "resnet50-0676ba61.pth", resnet50().state_dict())


def test_lite_refuses_a_resnet50_backbone_from_the_channel(
    make_job, channels: dict[str, Path], resnet50_backbone: Path
) -> None:
    base = make_job({"arch": "lite"}, channels={**channels, "pretrained": resnet50_backbone.parent})
    result = run_train(base)
    assert result.returncode != 0
    reason = failure_reason(base)
    assert "do not fit arch 'lite'" in reason and "resnet50_fpn / resnet50_fpn_v2" in reason
    assert not (base / "model" / "model.safetensors").exists()


def test_lite_on_an_image_with_resnet50_weights_trains_from_scratch_and_serves(make_job, resnet50_backbone) -> None:
    base = make_job({"arch": "lite", "max_steps": "1"})
    result = run_train(base, MASKRCNN_PRETRAINED_PATH=str(resnet50_backbone))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "not using the image's weights, training from scratch" in result.stdout + result.stderr
    assert json.loads((base / "model" / "model.json").read_text())["backbone_norm"] == "group_norm"
    Predictor.load(base / "model")
