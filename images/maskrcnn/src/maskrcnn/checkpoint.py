"""Checkpoints for stop and spot safety, in ``/opt/ml/checkpoints``.

SageMaker syncs that folder to S3 and restores it when a job restarts (spot interruption), so a
job that finds ``last.pt`` there resumes from it by itself. The file holds tensors and plain
Python values only and is read back with ``torch.load(weights_only=True)``: no code runs. Writes
are atomic (temp file, then rename), so a SIGKILL mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from maskrcnn.engine import LoopState

log = logging.getLogger(__name__)

FILENAME = "last.pt"


def save(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    state: LoopState,
    fingerprint: dict[str, Any],
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "history": json.dumps(state.history),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path = directory / FILENAME
    tmp = directory / (FILENAME + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    log.info("checkpoint saved: %s (epoch %d, step %d)", path, state.epoch, state.global_step)
    return path


def load(directory: Path) -> dict[str, Any] | None:
    path = directory / FILENAME
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["history"] = json.loads(payload["history"])
    payload["fingerprint"] = json.loads(payload["fingerprint"])
    return payload


def restore(
    payload: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> LoopState:
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng_cpu"])
    if torch.cuda.is_available() and payload["rng_cuda"]:
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return LoopState(payload["epoch"], payload["step_in_epoch"], payload["global_step"], payload["history"])
