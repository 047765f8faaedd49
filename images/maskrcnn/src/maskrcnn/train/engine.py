"""The training step loop and COCO evaluation, as plain functions.

``train_one_epoch`` runs optimizer steps over one pass of a loader, logging a metrics line every
``log_every`` steps, stopping early when asked (max_steps reached, SIGTERM) and raising
:class:`~maskrcnn.errors.NonFiniteLossError` the moment the loss is NaN or infinite. ``evaluate``
predicts a loader and scores bbox and segm mAP with faster-coco-eval (measured against pycocotools
on the same predictions in ``bench/bench_coco_eval.py``; it agrees to 1e-4 and is faster).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from maskrcnn.errors import NonFiniteLossError
from maskrcnn.train.metrics import format_metrics

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the job is; saved in checkpoints so a restart continues from the same place."""

    epoch: int = 0
    step_in_epoch: int = 0  # batches of ``epoch`` already trained
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_step: int = 0  # the step the job plans to end at (not saved: each start plans anew; a budget moves it)


@dataclass
class StepTimer:
    """Splits wall time into waiting for data and computing, for the images/s report."""

    data_wait: float = 0.0
    total: float = 0.0
    images: int = 0

    def reset(self) -> None:
        self.data_wait = self.total = 0.0
        self.images = 0


def move_to(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    device: torch.device,
    state: LoopState,
    *,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad_norm: float = 0.0,
    max_steps: int = 0,
    log_every: int = 10,
    world_size: int = 1,
    after_step: Callable[[LoopState], bool] | None = None,
    epoch_steps: int = 0,
    any_rank: Callable[[bool], bool] | None = None,
) -> bool:
    """Train until the loader ends or the epoch has ``epoch_steps`` steps; False when stopped early.

    Stopped early means ``max_steps`` reached or ``after_step(state)`` returned False; that hook runs
    after every optimizer step (checkpointing, stop signals). A metrics line is logged every
    ``log_every`` steps and always for the first step of the run and for ``state.last_step`` (the
    job's last), so any job, however short, reports its loss. ``any_rank(flag)`` is True when ``flag`` is true
    on any rank: with it, a non-finite loss on one rank stops every rank at the same step. ``state`` is
    advanced in place.
    """
    model.train()
    timer = StepTimer()
    running: dict[str, float] = {}
    counted = 0
    first = True
    start = time.perf_counter()
    for images, targets in loader:
        if epoch_steps and state.step_in_epoch >= epoch_steps:
            break
        fetched = time.perf_counter()
        timer.data_wait += fetched - start
        images, targets = move_to(images, targets, device)
        autocast = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            losses = model(images, targets)
            loss = sum(losses.values())
        loss_value = check_finite(loss, losses, state, scheduler, any_rank)
        update(model, optimizer, loss, scaler, clip_grad_norm)
        scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        for key, value in losses.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        running["loss"] = running.get("loss", 0.0) + loss_value
        timer.images += len(images) * world_size
        counted += 1
        now = time.perf_counter()
        timer.total += now - start
        start = now
        if first or state.global_step % log_every == 0 or state.global_step == state.last_step:
            _log_train(state, running, timer, scheduler, counted)
            running.clear()
            timer.reset()
            counted = 0
        first = False
        if max_steps and state.global_step >= max_steps:
            return False
        if after_step is not None and not after_step(state):
            return False
    return True


def check_finite(
    loss: torch.Tensor,
    losses: dict[str, torch.Tensor],
    state: LoopState,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    any_rank: Callable[[bool], bool] | None,
) -> float:
    """The loss as a float; raises NonFiniteLossError when it (or, with ``any_rank``, another rank's) is not finite."""
    loss_value = float(loss.detach())
    finite = math.isfinite(loss_value)
    if any_rank is not None and any_rank(not finite) and finite:
        raise NonFiniteLossError(
            f"loss became non-finite on another rank at epoch {state.epoch} step {state.global_step}; "
            f"see that rank's log; lower lr (now {scheduler.get_last_lr()[0]:.4g}) or keep clip_grad_norm > 0"
        )
    if not finite:
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"loss became {loss_value} at epoch {state.epoch} step {state.global_step} ({parts}); "
            f"lower lr (now {scheduler.get_last_lr()[0]:.4g}) or keep clip_grad_norm > 0"
        )
    return loss_value


def update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    scaler: torch.amp.GradScaler | None,
    clip_grad_norm: float,
) -> None:
    """One optimizer step from ``loss``: backward (scaled for float16), gradient clipping, step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()


def _log_train(state: LoopState, running: dict[str, float], timer: StepTimer, scheduler, steps: int) -> None:
    values: dict[str, float | int] = {"epoch": state.epoch, "step": state.global_step}
    values.update({k: v / steps for k, v in running.items()})
    values["lr"] = scheduler.get_last_lr()[0]
    if timer.total > 0:
        values["images_per_sec"] = timer.images / timer.total
        values["data_wait"] = timer.data_wait / timer.total
    log.info(format_metrics("train", values))
    state.history.append({"phase": "train", **values})


@torch.inference_mode()
def predict_coco(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    device: torch.device,
    mask_threshold: float = 0.5,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Detections in COCO results format (masks as compressed RLE) for every image of ``loader``."""
    from pycocotools import mask as mask_utils

    model.eval()
    results: list[dict[str, Any]] = []
    for images, targets in loader:
        if should_stop is not None and should_stop():
            break
        outputs = model([im.to(device) for im in images])
        for output, target in zip(outputs, targets, strict=True):
            masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            boxes = output["boxes"].cpu().numpy()
            for k in range(len(boxes)):
                rle = mask_utils.encode(np.asfortranarray(masks[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                x0, y0, x1, y1 = (float(v) for v in boxes[k])
                results.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": int(output["labels"][k]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(output["scores"][k]),
                        "segmentation": rle,
                    }
                )
    return results


def coco_scores(
    ground_truth: dict[str, Any], results: list[dict[str, Any]], backend: str = "faster"
) -> dict[str, float]:
    """bbox and segm mAP and AP50 of ``results`` against a COCO ground-truth dict."""
    if backend == "faster":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    scores: dict[str, float] = {}
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it logs the summary table at INFO
    with contextlib.redirect_stdout(_Discard()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        for iou_type in ("bbox", "segm"):
            if not results:
                scores[f"{iou_type}_mAP"] = scores[f"{iou_type}_AP50"] = 0.0
                continue
            dt = gt.loadRes([dict(r) for r in results])
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            scores[f"{iou_type}_mAP"] = max(float(evaluator.stats[0]), 0.0)
            scores[f"{iou_type}_AP50"] = max(float(evaluator.stats[1]), 0.0)
    return scores


class _Discard:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    ground_truth: dict[str, Any],
    device: torch.device,
    epoch: int = 0,
    should_stop: Callable[[], bool] | None = None,
    gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None] | None = None,
) -> dict[str, float]:
    """Predict ``loader`` and score it; logs one metrics line.

    With ``gather`` (distributed evaluation: each rank predicts its part), the predictions of every rank
    are merged on the main rank, which scores them; the other ranks get None from it and return {}.
    """
    started = time.perf_counter()
    log.info("evaluating epoch %d", epoch)
    results = predict_coco(model, loader, device, should_stop=should_stop)
    if gather is not None:
        merged = gather(results)
        if merged is None:
            return {}
        results = merged
    scores = coco_scores(ground_truth, results)
    log.info(format_metrics("eval", {"epoch": epoch, **scores}))
    log.info("evaluation took %.1fs for %d detections", time.perf_counter() - started, len(results))
    return scores
