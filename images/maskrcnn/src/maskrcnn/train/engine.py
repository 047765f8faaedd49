"""The training step loop and COCO evaluation, as plain functions.

``train_steps`` runs optimizer steps over one pass of a loader and yields each :class:`Step` with its loss
parts still on the device; how a loss becomes an update is one :class:`Optimization` (optimizer, scheduler,
autocast, loss scaling, clipping: :func:`make_optimizer`, :func:`make_scheduler`, :func:`autocast_dtype`,
:func:`grad_scaler`); :class:`TrainMetrics` sums the loss parts on the device and reads them only when it
writes a metrics line (every ``log_every`` steps). ``train_one_epoch`` is the two together for one process, raising
:class:`~maskrcnn.errors.NonFiniteLossError` at a NaN or infinite loss (the job's loop in
``maskrcnn.train.job`` adds what every rank must agree on between steps). ``evaluate`` predicts a loader and
scores bbox and segm mAP with faster-coco-eval (measured against pycocotools on the same predictions in
``bench/bench_coco_eval.py``; it agrees to 1e-4 and is faster).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from maskrcnn.device import cpu_amx_usable
from maskrcnn.errors import NonFiniteLossError
from maskrcnn.train.config import Hyperparameters
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
class Step:
    """One optimizer step as its loop sees it. The tensors stay on the device: reading one is a host sync,
    which the job does once a step for every flag together (``maskrcnn.train.distributed.agree``)."""

    losses: torch.Tensor  # float64 [*parts, total], detached, on the device
    names: tuple[str, ...]  # the model's loss parts, then "loss"
    finite: torch.Tensor  # bool scalar on the device: the total loss is finite
    images: int  # images this process trained
    data_wait: float  # seconds this step waited for its batch


@dataclass
class Optimization:
    """How a loss becomes an update: the optimizer at the scheduler's rate, autocast to ``amp_dtype`` (None:
    float32), float16's loss scaling (``scaler``) and gradient clipping (0: none). Built once by the job
    (:func:`make_optimizer`, :func:`make_scheduler`, :func:`autocast_dtype`, :func:`grad_scaler`)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad_norm: float = 0.0

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


def move_to(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


def make_optimizer(model: torch.nn.Module, hp: Hyperparameters, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer of the trainable parameters at peak ``lr`` (default ``hp.lr``: one process's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = hp.lr if lr is None else lr
    if hp.optimizer == "adamw":
        # one fused kernel instead of a dozen ops per tensor (docs/benchmarks.md: the optimizer's share of a step)
        return torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, hp: Hyperparameters, steps_per_epoch: int, total: int | Callable[[], int]
):
    """Warm-up, then the schedule over ``total`` steps; a callable ``total`` is read at every step, so a time
    budget can re-plan the length after the job started (multistep's epochs then shrink in proportion).
    The warm-up takes at most half the planned steps: a plan shorter than ``warmup_steps`` (a tight budget, a
    small ``max_steps``) would otherwise end still warming up, never annealed.
    A LambdaLR, not torchvision's LinearLR + SequentialLR + CosineAnnealingLR: those fix their lengths when
    built (CosineAnnealingLR steps recursively from a fixed ``T_max``), and a budget moves the end later."""
    planned = total if callable(total) else (lambda: total)
    # multistep's epochs are the first plan's (the job's without a budget: it plans before it builds this; a
    # callable still at 0 waits for the first length above 0), and the budget's re-plans scale them.
    first_plan = [planned()] if planned() > 0 else []

    def factor(step: int) -> float:
        end = planned()
        if not first_plan and end > 0:
            first_plan.append(end)
        warmup = min(hp.warmup_steps, end // 2)
        if step < warmup:
            alpha = step / warmup
            return hp.warmup_factor * (1 - alpha) + alpha
        if hp.lr_schedule == "cosine":
            progress = (step - warmup) / max(end - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if hp.lr_schedule == "multistep":
            unbudgeted = first_plan[0] if first_plan else 1
            epoch = step // max(steps_per_epoch, 1) / (max(end, 1) / unbudgeted)
            return hp.lr_gamma ** sum(epoch >= m for m in hp.lr_steps)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(
    device: torch.device,
    cpu_env: Mapping[str, str] | None = None,
    *,
    bf16_supported: bool | None = None,
    amx: bool | None = None,
) -> torch.dtype | None:
    """bfloat16 on CUDA devices that have it (Ampere and newer), float16 on older GPUs; bfloat16 on CPUs
    whose kernels may use AMX tiles (:func:`maskrcnn.device.cpu_amx_usable` under ``cpu_env``, the job's
    oneDNN cap); else none (float32). ``bf16_supported`` and ``amx`` override what the machine says.

    bfloat16 has float32's exponent range, so it needs no GradScaler (torchvision's reference and torch's
    AMP recipe use the scaler for float16 only); the caller makes one only for float16.

    On a CPU only AMX makes bfloat16 pay: with AVX512-BF16 alone the casts around every op cost more than the
    narrower dot products save, and AMX is what tells those CPUs apart from inside (docs/benchmarks.md).
    """
    if device.type == "cuda":
        if bf16_supported is None:
            with torch.cuda.device(device):
                bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16_supported else torch.float16
    if device.type == "cpu":
        if amx is None:
            amx = cpu_amx_usable(cpu_env or {})
        return torch.bfloat16 if amx else None
    return None


def grad_scaler(amp_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """float16 needs loss scaling (its small range underflows gradients); bfloat16 and float32 do not."""
    return torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None


def train_steps(
    model: nn.Module,
    optimization: Optimization,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    device: torch.device,
    state: LoopState,
    epoch_steps: int = 0,
) -> Iterator[Step]:
    """Optimizer steps over ``loader`` (at most ``epoch_steps`` of this epoch, when given), each yielded once
    done; ``state`` is advanced before the yield. Nothing here waits for the device: what to do with a step
    (check its loss, log, stop, checkpoint) is the caller's, between steps."""
    model.train()
    if epoch_steps and state.step_in_epoch >= epoch_steps:
        return
    amp_dtype = optimization.amp_dtype
    start = time.perf_counter()
    for images, targets in loader:
        data_wait = time.perf_counter() - start
        images, targets = move_to(images, targets, device)
        autocast = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            losses = model(images, targets)
            loss = sum(losses.values())
        assert isinstance(loss, torch.Tensor)
        update(model, optimization, loss)
        optimization.scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        detached = loss.detach()
        yield Step(
            losses=torch.stack([v.detach().double() for v in (*losses.values(), detached)]),
            names=(*losses, "loss"),
            finite=torch.isfinite(detached),
            images=len(images),
            data_wait=data_wait,
        )
        if epoch_steps and state.step_in_epoch >= epoch_steps:
            return
        start = time.perf_counter()


class TrainMetrics:
    """The training metrics lines of one epoch: the loss parts summed on the device between lines and read
    once per line, the images this process trained per wall second (``images_per_sec``: per GPU on a GPU
    host) and the job's (``job_images_per_sec``: that times the processes, which all train the same steps),
    and the share of the time spent waiting for data.

    A line is written for the epoch's first step, every ``log_every`` steps and the job's planned last step
    (``state.last_step``), so any job, however short, reports its loss; each is also appended to
    ``state.history``.
    """

    def __init__(self, log_every: int, world_size: int = 1):
        self.log_every, self.world_size = log_every, world_size
        self.first = True
        self._reset()

    def _reset(self) -> None:
        self.sums: torch.Tensor | None = None
        self.steps = self.images = 0
        self.data_wait = 0.0
        self.since = time.perf_counter()

    def add(self, step: Step, state: LoopState, lr: float) -> None:
        """Count ``step`` (already in ``state``); write a line if one is due."""
        self.sums = step.losses if self.sums is None else self.sums + step.losses
        self.steps += 1
        self.images += step.images
        self.data_wait += step.data_wait
        if self.first or state.global_step % self.log_every == 0 or state.global_step == state.last_step:
            self._write(step.names, state, lr)
        self.first = False

    def _write(self, names: tuple[str, ...], state: LoopState, lr: float) -> None:
        assert self.sums is not None
        values: dict[str, float | int] = {"epoch": state.epoch, "step": state.global_step}
        values.update(zip(names, (total / self.steps for total in self.sums.tolist()), strict=True))
        values["lr"] = lr
        seconds = time.perf_counter() - self.since
        if seconds > 0:
            values["images_per_sec"] = self.images / seconds
            values["job_images_per_sec"] = self.images * self.world_size / seconds
            values["data_wait"] = min(self.data_wait / seconds, 1.0)
        log.info(format_metrics("train", values))
        state.history.append({"phase": "train", **values})
        self._reset()


def non_finite_loss(step: Step, state: LoopState, lr: float, *, here: bool = True) -> NonFiniteLossError:
    """The failure for a step whose loss was not finite (``here``: on this rank; else on another one)."""
    if not here:
        return NonFiniteLossError(
            f"loss became non-finite on another rank at epoch {state.epoch} step {state.global_step - 1}; "
            f"see that rank's log; lower lr (now {lr:.4g}) or keep clip_grad_norm > 0"
        )
    values = dict(zip(step.names, step.losses.tolist(), strict=True))
    total = values.pop("loss")
    parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    return NonFiniteLossError(
        f"loss became {total} at epoch {state.epoch} step {state.global_step - 1} ({parts}); "
        f"lower lr (now {lr:.4g}) or keep clip_grad_norm > 0"
    )


def train_one_epoch(
    model: nn.Module,
    optimization: Optimization,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    device: torch.device,
    state: LoopState,
    *,
    max_steps: int = 0,
    log_every: int = 10,
    epoch_steps: int = 0,
) -> bool:
    """One process's epoch, as torchvision's reference runs it: :func:`train_steps` with a metrics line every
    ``log_every`` steps, :class:`~maskrcnn.errors.NonFiniteLossError` at a non-finite loss; False when it
    stopped at ``max_steps``. The job's own loop (``maskrcnn.train.job``) is this, with the ranks' agreement,
    stop requests, checkpoints and the time budget between steps."""
    metrics = TrainMetrics(log_every)
    for step in train_steps(model, optimization, loader, device, state, epoch_steps):
        lr = optimization.lr()
        if not bool(step.finite):
            raise non_finite_loss(step, state, lr)
        metrics.add(step, state, lr)
        if max_steps and state.global_step >= max_steps:
            return False
    return True


def update(model: nn.Module, optimization: Optimization, loss: torch.Tensor) -> None:
    """One optimizer step from ``loss``: backward (scaled for float16), gradient clipping, step."""
    optimizer, scaler, clip_grad_norm = optimization.optimizer, optimization.scaler, optimization.clip_grad_norm
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
    ground_truth: dict[str, Any] | None,
    device: torch.device,
    epoch: int = 0,
    should_stop: Callable[[], bool] | None = None,
    gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None] | None = None,
) -> dict[str, float]:
    """Predict ``loader`` and score it; logs one metrics line.

    With ``gather`` (distributed evaluation: each rank predicts its part), the predictions of every rank
    are merged on the main rank, which scores them against ``ground_truth``; the other ranks get None from it
    (and need no ground truth) and return {}.
    """
    started = time.perf_counter()
    log.info("evaluating epoch %d", epoch)
    results = predict_coco(model, loader, device, should_stop=should_stop)
    if gather is not None:
        merged = gather(results)
        if merged is None:
            return {}
        results = merged
    assert ground_truth is not None, "the rank that scores needs the ground truth"
    scores = coco_scores(ground_truth, results)
    log.info(format_metrics("eval", {"epoch": epoch, **scores}))
    log.info("evaluation took %.1fs for %d detections", time.perf_counter() - started, len(results))
    return scores
