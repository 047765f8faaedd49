"""The saved model's description, without torch: model.json (:class:`ModelSpec`) and the file checks.

A saved model (``/opt/ml/model``) is ``model.safetensors`` (the state dict) and ``model.json``. This
module is what ``serve`` reads before it starts anything (:func:`check_saved_model`, well under a
second: no torch import), and what :func:`maskrcnn.model.architectures.load_model` reads before it builds the
network. Only the tensors' names and shapes against the architecture need torch; load_model checks them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from maskrcnn.errors import ModelError

ARCHS = ("lite", "resnet50_fpn", "resnet50_fpn_v2")  # what this image builds and loads

# 2: lite's box head has two convolutions; 3: lite classifies from the mask head too; 4: lite pools masks
# from finer features (MASK_CANONICAL_SCALE); 5: lite's RPN proposes from strides 8-32 (LevelsRPN); 6: lite's
# mask predictor upsamples to 32 channels
FORMAT_VERSION = 6
# The oldest model.json each architecture still loads from: only lite's network changed since.
OLDEST_FORMAT = {"lite": 6, "resnet50_fpn": 2, "resnet50_fpn_v2": 2}
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
# The ResNet body's normalisation, as model.json's ``backbone_norm`` names it (maskrcnn.model.architectures builds each)
FROZEN_BATCH_NORM, BATCH_NORM, GROUP_NORM = "frozen_batch_norm", "batch_norm", "group_norm"
BACKBONE_NORMS = (FROZEN_BATCH_NORM, BATCH_NORM, GROUP_NORM)
RETRAIN = "retrain the model with this image (its training job writes model.json and model.safetensors)"


@dataclass(frozen=True)
class ModelSpec:
    """model.json: how to rebuild the network and the defaults serving answers with."""

    arch: str
    class_names: tuple[str, ...]  # label 1 is class_names[0]; label 0 is background
    min_size: int
    max_size: int
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_detections: int = 100
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # resolved hyperparameters, job name
    format_version: int = FORMAT_VERSION
    # The backbone body's normalisation (one of BACKBONE_NORMS), set by save_model from the network itself;
    # None (models saved before it was recorded): what that arch is built with from scratch.
    backbone_norm: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names)
        data["num_classes"] = self.num_classes
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ModelError(f"{SPEC_FILE} is not a JSON object")
            data.pop("num_classes", None)
            arch = data.get("arch")
            if arch not in ARCHS:
                raise ModelError(f"{SPEC_FILE} arch {arch!r} is not one this image builds ({', '.join(ARCHS)})")
            version, oldest = data.get("format_version"), OLDEST_FORMAT[arch]
            if not isinstance(version, int) or not oldest <= version <= FORMAT_VERSION:
                raise ModelError(
                    f"{SPEC_FILE} format_version {version} is not one this image loads for arch "
                    f"{arch!r} ({oldest}-{FORMAT_VERSION}); {RETRAIN}"
                )
            if data.get("backbone_norm") not in (None, *BACKBONE_NORMS):
                raise ModelError(
                    f"{SPEC_FILE} backbone_norm {data['backbone_norm']!r} is not one of {list(BACKBONE_NORMS)}"
                )
            data["class_names"] = tuple(data["class_names"])
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in names})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelError(f"{SPEC_FILE} is malformed: {type(exc).__name__}: {exc}") from None


def check_saved_model(model_dir: Path) -> ModelSpec:
    """The model's description, once both files are there, model.json is one this image loads and
    model.safetensors has a readable safetensors header; else a ModelError naming the path and the fix."""
    spec_path, weights_path = model_dir / SPEC_FILE, model_dir / WEIGHTS_FILE
    missing = [p.name for p in (spec_path, weights_path) if not p.is_file()]
    if missing:
        present = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
        raise ModelError(
            f"{model_dir} holds no saved model: {' and '.join(missing)} missing "
            f"(found: {', '.join(present) or 'nothing'}); pickled weights are never loaded (.pth, .pt, .pkl); "
            f"put a model this image trained there (model.tar.gz unpacked) or {RETRAIN}"
        )
    try:
        spec = ModelSpec.from_json(spec_path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{spec_path} cannot be read: {exc}") from None
    except ModelError as exc:
        raise ModelError(f"{model_dir}: {exc}") from None
    try:
        with safe_open(str(weights_path), framework="numpy"):  # parses the header only; no torch, no tensors
            pass
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights_path} is not a safetensors file ({exc}); {RETRAIN}") from None
    return spec
