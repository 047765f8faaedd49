"""Process-group setup from resourceconfig.json, the way SageMaker's toolkits launch it.

One process per GPU on each host (one per host on CPU); the master is the first host of
``hosts`` (or ``MASKRCNN_MASTER_ADDR``, which lets two emulated hosts share one machine); a
host's node rank is its index in ``hosts``. NCCL on CUDA, gloo on CPU. Hostnames of other hosts
may resolve only some seconds after start, so resolution is retried.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from maskrcnn.config import TrainConfig
from maskrcnn.errors import ConfigError

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
        log.info("joining %s process group: rank %d of %d, master %s:%d", backend, rank, world_size, master,
                 config.master_port)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master}:{config.master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=30),
        )
    return DistContext(rank, local_rank, world_size, device)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` is true on any rank: every rank stops at the same step."""
    if not ctx.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
