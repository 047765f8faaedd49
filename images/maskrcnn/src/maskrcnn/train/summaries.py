"""TensorBoard event files of a training job, in ``output/tensorboard`` (rank 0 only).

That folder is where SageMaker's ``TensorBoardOutputConfig`` uploads from (its default ``LocalPath``);
the local harness prints it (``tensorboard --logdir <job>/algo-1/output/tensorboard``). Written: every
metrics line of the job as scalars (``train/loss``, ``train/lr``, ``train/images_per_sec``, each loss
part, ``validation/segm_AP50`` and every other mAP), and at each evaluation a few validation images with
the model's predicted masks and boxes drawn on them (``predictions/0`` ...). Beside the model, the job's
history as a picture: ``output/data/metrics.png`` (:func:`plot_history`).

The writer is tensorboardX: it writes the same event files as ``torch.utils.tensorboard`` with protobuf
and numpy alone (~3 MB installed), where ``torch.utils.tensorboard`` needs the ``tensorboard`` package (~52 MB
with grpcio and its data server), which only viewing needs. The tests read the files back with
tensorboard's own reader (a dev dependency).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

log = logging.getLogger(__name__)

OVERLAY_IMAGES = 3  # validation images drawn at each evaluation
_NOT_SCALARS = ("phase", "epoch", "step")
# One colour per class (torchvision's default palette starts at black, invisible on dark images).
_PALETTE = ("red", "lime", "dodgerblue", "yellow", "magenta", "cyan", "orange", "white")


class Summaries:
    """Writes history entries and prediction overlays; with ``directory=None`` (ranks but 0) does nothing."""

    def __init__(self, directory: Path | None, written: int = 0):
        self.writer: Any = None
        self.written = written  # entries of the job's history already in the files (a resumed job's earlier ones)
        if directory is not None:
            from tensorboardX import SummaryWriter

            directory.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(logdir=str(directory), flush_secs=10)
            log.info("TensorBoard event files: %s", directory)

    def history(self, entries: Iterable[dict[str, Any]]) -> None:
        """Each ``state.history`` entry (a metrics line) as scalars at its step: ``train/*`` or ``validation/*``."""
        if self.writer is None:
            return
        for entry in entries:
            group = "validation" if entry.get("phase") == "eval" else "train"
            for key, value in entry.items():
                if key not in _NOT_SCALARS and isinstance(value, int | float):
                    self.writer.add_scalar(f"{group}/{key}", float(value), int(entry["step"]))

    def catch_up(self, history: Sequence[dict[str, Any]]) -> None:
        """The entries of ``history`` not yet written."""
        self.history(history[self.written :])
        self.written = len(history)

    def overlays(self, step: int, images: Sequence[torch.Tensor]) -> None:
        if self.writer is None:
            return
        for k, image in enumerate(images):
            self.writer.add_image(f"predictions/{k}", image, step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def draw_predictions(
    image: torch.Tensor,
    output: dict[str, torch.Tensor],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> torch.Tensor:
    """``image`` (float CHW in [0, 1]) with the detections above ``score_threshold`` drawn: uint8 CHW."""
    keep = output["scores"] >= score_threshold
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
    if keep.any():
        masks = output["masks"][keep][:, 0].cpu() > mask_threshold
        colors = [_PALETTE[int(c) % len(_PALETTE)] for c in output["labels"][keep]]
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.5, colors=colors)
        labels = [  # label k is class_names[k - 1] (0 is the background)
            f"{class_names[int(c) - 1] if 1 <= int(c) <= len(class_names) else int(c)} {float(s):.2f}"
            for c, s in zip(output["labels"][keep], output["scores"][keep], strict=True)
        ]
        canvas = draw_bounding_boxes(canvas, output["boxes"][keep].cpu(), labels=labels, colors=colors)
    return canvas


@torch.inference_mode()
def predicted_overlays(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    device: torch.device,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> list[torch.Tensor]:
    """The model's predictions on ``images``, drawn (the model is left in eval mode, as evaluation leaves it)."""
    model.eval()
    images = [im.as_subclass(torch.Tensor) for im in images]  # plain tensors, not tv_tensors.Image
    outputs = model([im.to(device) for im in images])
    return [
        draw_predictions(im, out, class_names, score_threshold, mask_threshold)
        for im, out in zip(images, outputs, strict=True)
    ]


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """``output/data/metrics.png``: the training loss and the validation mAPs over the steps."""
    import matplotlib  # only here: the job draws one figure, at its end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["phase"] == "train"]
    evals = [h for h in history if h["phase"] == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([h["step"] for h in train], [h["loss"] for h in train], label="loss")
    left.set_xlabel("step")
    left.set_title("training loss")
    for key in ("bbox_mAP", "segm_mAP", "segm_AP50"):
        right.plot([h["step"] for h in evals], [h.get(key, 0.0) for h in evals], marker="o", label=key)
    right.set_xlabel("step")
    right.set_ylim(0, 1)
    right.set_title("validation")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
