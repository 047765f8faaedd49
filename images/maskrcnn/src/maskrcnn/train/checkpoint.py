"""Checkpoints for stop and spot safety, in ``/opt/ml/checkpoints``.

SageMaker syncs that folder to S3 and restores it when a job restarts (spot interruption), so a
job that finds ``last.pt`` there resumes from it by itself. The file holds tensors and plain
Python values only and is read back with ``torch.load(weights_only=True)``: no code runs. Writes
are atomic (serialised in memory, written to a temporary file in the same folder, fsync'd, renamed),
so a SIGKILL mid-write leaves the previous checkpoint intact, and a failed write (a full disk) leaves
no temporary file behind (SageMaker would sync it to S3) and says what happened, naming the path.
A checkpoint that cannot be read is never retried with unpickling: the job fails, saying to remove it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from maskrcnn.errors import StorageError, storage_error
from maskrcnn.train.engine import LoopState

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
    rng: list[dict[str, torch.Tensor]] | None = None,
    job: tuple[str, float] = ("", 0.0),
    budget: dict[str, float] | None = None,
) -> Path:
    """Write ``last.pt``; ``rng`` holds every rank's :func:`rng_state`, in rank order (default: this process's);
    ``job`` is the training job's name and the seconds it has run so far, every attempt together (a restart of
    the same job counts them against its ``max_runtime``); ``budget``, the time budget's measurements
    (:meth:`~maskrcnn.train.budget.BudgetPlanner.measurements`), which a restart plans with at once."""
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
        "rng": rng if rng is not None else [rng_state()],
        "job_name": job[0],
        "runtime": float(job[1]),
        "budget": {k: float(v) for k, v in (budget or {}).items()},
    }
    path = directory / FILENAME
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory first: torch's writer reports a full disk as "unexpected pos"
    write_atomic(path, buffer.getbuffer())
    log.info("checkpoint saved: %s (epoch %d, step %d)", path, state.epoch, state.global_step)
    return path


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random state: the CPU generator and, on a GPU rank, its own device's generator."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: each rank set its own
    return state


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """``data`` to ``path`` via a temporary file in the same folder, fsync'd and renamed; on failure none is left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(exc, path, "writing") from exc


def load(directory: Path) -> dict[str, Any] | None:
    """The checkpoint's payload, None when there is none; a damaged or foreign file fails, naming it."""
    path = directory / FILENAME
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        payload["history"] = json.loads(payload["history"])
        payload["fingerprint"] = json.loads(payload["fingerprint"])
        missing = [
            k for k in ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step") if k not in payload
        ]
        if missing:  # not one of our checkpoints
            raise KeyError(f"no {', '.join(missing)}")
    except OSError as exc:
        raise storage_error(exc, path, "reading") from exc
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as exc:
        # Never retry with weights_only=False, as torch's own message suggests: that would run code from the file.
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            first = "it holds Python objects, which a safe load does not unpickle"
        raise StorageError(
            f"the checkpoint {path} cannot be read ({type(exc).__name__}: {first}); it is damaged or not a checkpoint "
            f"of this job: remove it to start from scratch, or restore an intact copy"
        ) from exc
    return payload


def restore(
    payload: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
) -> LoopState:
    """Load the saved state into the given objects; ``rank`` gets back its own random state, not rank 0's."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    states = payload.get("rng") or [{"cpu": payload["rng_cpu"]}]  # before per-rank states: rank 0's only
    own = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(own["cpu"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])
    return LoopState(payload["epoch"], payload["step_in_epoch"], payload["global_step"], payload["history"])
