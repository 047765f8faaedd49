"""Predicted overlays: what a person sees in TensorBoard's image tab."""

from __future__ import annotations

import pytest
import torch
from maskrcnn.train.summaries import draw_predictions

pytestmark = pytest.mark.unit


def test_a_confident_detection_is_drawn_and_a_doubtful_one_is_not() -> None:
    image = torch.zeros(3, 32, 32)
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, 0, 4:12, 4:12] = 1.0  # confident
    masks[1, 0, 20:28, 20:28] = 1.0  # below the score threshold
    output = {
        "boxes": torch.tensor([[4.0, 4.0, 12.0, 12.0], [20.0, 20.0, 28.0, 28.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.2]),
        "masks": masks,
    }
    drawn = draw_predictions(image, output, ["circle", "square"], score_threshold=0.5)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 32, 32)
    assert drawn[:, 6:10, 6:10].sum() > 0  # the mask is tinted
    assert drawn[:, 21:27, 21:27].sum() == 0  # the doubtful one left alone


def test_the_history_is_drawn_to_a_png(tmp_path) -> None:
    from maskrcnn.train.summaries import plot_history

    history = [
        {"phase": "train", "epoch": 0, "step": 1, "loss": 2.0},
        {"phase": "train", "epoch": 0, "step": 2, "loss": 1.5},
        {"phase": "eval", "epoch": 1, "step": 2, "bbox_mAP": 0.1, "segm_mAP": 0.2, "segm_AP50": 0.4},
    ]
    plot_history(history, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"
