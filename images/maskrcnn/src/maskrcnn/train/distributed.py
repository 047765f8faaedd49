"""Process-group setup from resourceconfig.json, the way SageMaker's toolkits launch it.

One process per GPU on each host (one per host on CPU); the master is the first host of
``hosts`` (or ``MASKRCNN_MASTER_ADDR``, which lets two emulated hosts share one machine); a
host's node rank is its index in ``hosts``. NCCL on CUDA, gloo on CPU. Hostnames of other hosts
may resolve only some seconds after start, so resolution is retried.

Every collective waits at most ``collective_timeout`` seconds (a hyperparameter, default 10 minutes,
not torch's 30): a peer that hangs or died fails the job within it. A collective that fails because a
peer went away becomes a :class:`~maskrcnn.errors.PeerLostError` whose message says which host, at
which step, and where to look (:func:`describe_failure`), instead of the backend's raw text.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from maskrcnn.errors import ConfigError, DataError, PeerLostError
from maskrcnn.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def processes_per_host() -> int:
    return max(torch.cuda.device_count(), 1)


def resolve(host: str, timeout_s: float = 300.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.gethostbyname(host)
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise ConfigError(f"master host {host!r} did not resolve within {timeout_s:.0f}s") from None
            time.sleep(1.0)


def init(config: TrainConfig, local_rank: int, nprocs: int) -> DistContext:
    """Join the job's process group (when there is more than one process) and pick the device."""
    hosts = config.resources.hosts
    world_size = len(hosts) * nprocs
    rank = config.resources.host_rank * nprocs + local_rank
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        if config.resources.network_interface_name and device.type == "cuda":
            # NCCL must use the interface SageMaker names (the only one routed between hosts).
            os.environ.setdefault("NCCL_SOCKET_IFNAME", config.resources.network_interface_name)
        # One host: its processes meet on loopback; several: on the first host (or the override).
        master = config.master_addr or ("127.0.0.1" if len(hosts) == 1 else resolve(hosts[0]))
        backend = "nccl" if device.type == "cuda" else "gloo"
        log.info(
            "joining %s process group: rank %d of %d, master %s:%d",
            backend,
            rank,
            world_size,
            master,
            config.master_port,
        )
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master}:{config.master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=config.hp.collective_timeout),
        )
    return DistContext(rank, local_rank, world_size, device)


def sync_batch_norm(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``model`` with every BatchNorm layer that trains as SyncBatchNorm, when the job has several CUDA processes.

    Trainable BatchNorm (resnet50 from scratch; v2's FPN and heads) would otherwise normalise with each GPU's
    own 4 images (and the few regions the heads see of them): poor statistics, and running averages that
    differ from rank to rank while only rank 0's are saved. Synchronised, each layer normalises over the
    whole step's batch. The frozen BatchNorm of a pretrained body (FrozenBatchNorm2d) and GroupNorm are not
    BatchNorm layers and stay as they are; the state dict is the same, so the saved model is plain BatchNorm2d.
    CPU jobs (gloo) keep per-process statistics: torch's SyncBatchNorm runs on GPUs only ("SyncBatchNorm
    expected input tensor to be on GPU"), and a CPU process trains lite (GroupNorm) or few resnet steps.
    """
    if not (ctx.distributed and ctx.device.type == "cuda"):
        return model
    count = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if count:
        log.info("SyncBatchNorm: %d BatchNorm layers normalise over all %d processes' images", count, ctx.world_size)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` is true on any rank: every rank stops at the same step."""
    if not ctx.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


NO_PLAN = -(2**63)  # the flag of a rank that made no budget plan this step: below every plan's negative


@dataclass(frozen=True)
class StepFlags:
    """What every rank must agree on after a step, so that all stop, fail or re-plan at the same one."""

    nonfinite: bool  # the loss was NaN or infinite on some rank
    stop: bool  # some rank was asked to stop (SIGTERM)
    out_of_time: bool  # the time budget: no further step fits, on some rank
    plan: int | None  # the budget's new last step, the smallest any rank planned; None: no plan this step


def agree(
    finite: torch.Tensor, stop: bool, ctx: DistContext, *, out_of_time: bool = False, plan: int | None = None
) -> StepFlags:
    """The step's flags of every rank, in ONE all_reduce (MAX; the plan as its negative, so that the MAX is the
    smallest plan), read by the host once: the only wait for the device a training step has.

    ``finite`` (this rank's loss, a bool tensor on the device) is not read before: the flags go to the device
    from pinned memory without waiting, and the one read of the reduced flags waits for the step's work.
    """
    host = torch.tensor([int(stop), int(out_of_time), NO_PLAN if plan is None else -plan], dtype=torch.int64)
    if finite.device.type == "cuda":
        host = host.pin_memory()
    flags = torch.cat([(~finite).reshape(1).to(torch.int64), host.to(finite.device, non_blocking=True)])
    if ctx.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stopping, late, negative_plan = flags.tolist()
    return StepFlags(bool(nonfinite), bool(stopping), bool(late), None if negative_plan == NO_PLAN else -negative_plan)


def agreed_min(value: int, ctx: DistContext) -> int:
    """The smallest ``value`` over all ranks: hosts holding different amounts of data run the same steps."""
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], device=ctx.device, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def check_same_classes(class_names: list[str], ctx: DistContext, config: TrainConfig) -> None:
    """Every rank must train the same class list (label ids are positions in it); else all fail, naming both."""
    if not ctx.distributed:
        return
    gathered: list[list[str] | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, list(class_names))
    nprocs = ctx.world_size // len(config.resources.hosts)
    for rank, names in enumerate(gathered):
        if names != gathered[0]:
            first, other = config.resources.hosts[0], config.resources.hosts[rank // nprocs]
            raise DataError(
                f"the hosts' datasets have different classes: {first} has {gathered[0]}, {other} has {names}; "
                "every host's training data must list the same categories"
            )


def gather_to_main(items: list[Any], ctx: DistContext) -> list[Any] | None:
    """Every rank's ``items`` concatenated on rank 0 (None on the others)."""
    if not ctx.distributed:
        return list(items)
    parts: list[list[Any] | None] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(items, parts, dst=0)
    if parts is None:
        return None
    return [item for part in parts for item in (part or [])]


def gather_to_all(item: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``item``, in rank order, on every rank."""
    if not ctx.distributed:
        return [item]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, item)
    return gathered


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


# Texts of torch's gloo / NCCL / store errors when a peer went away or stopped answering.
_LOST_PEER = (
    ("timed out", "no answer within the collective timeout"),
    ("timeout", "no answer within the collective timeout"),
    ("connection reset", "connection reset"),
    ("connection closed", "connection closed"),
    ("broken pipe", "connection closed"),
    ("connection refused", "connection refused"),
    ("size doesn't match", "the hosts ran different collectives (a data or step mismatch)"),
    ("collective mismatch", "the hosts ran different collectives (a data or step mismatch)"),
)


def describe_failure(exc: BaseException, ctx: DistContext, config: TrainConfig, where: str) -> PeerLostError | None:
    """A failed collective as a person should read it, or None when ``exc`` is not a lost peer.

    ``where`` says what the job was doing ("epoch 0 step 12"). The other hosts are named: with two
    hosts that is exactly the one that went away; its own log and failure file say why.
    """
    if not ctx.distributed or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    backend_error = isinstance(exc, dist.DistError) or any(k in text for k in ("gloo", "nccl", "pair.cc", "store"))
    condition = next((why for needle, why in _LOST_PEER if needle in text), None)
    if condition is None or (not backend_error and "connection" not in text):
        return None
    hosts = config.resources.hosts
    nprocs = ctx.world_size // len(hosts)
    others = [h for h in hosts if h != config.resources.current_host]
    if len(others) == 1 and nprocs == 1:
        peer = f"{others[0]} (rank {hosts.index(others[0])})"
        look = f"see {others[0]}'s own log and failure"
    elif others:
        peer = "another process of the job (hosts " + ", ".join(others) + ")"
        look = "see the other hosts' logs and failures"
    else:
        peer = f"another process on {config.resources.current_host}"
        look = "see the other ranks' lines in this log"
    return PeerLostError(f"lost contact with {peer} at {where}: {condition}; {look}")
