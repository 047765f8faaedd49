"""Process-group setup from resourceconfig.json, the way SageMaker's toolkits launch it.

One process per GPU on each host (one per host on CPU); the master is the first host of
``hosts`` (or ``MASKRCNN_MASTER_ADDR``, which lets two emulated hosts share one machine); a
host's node rank is its index in ``hosts``. NCCL on CUDA, gloo on CPU. Hostnames of other hosts
may resolve only some seconds after start, so resolution is retried.

Between hosts NCCL takes the best network it can load: on p4d/p5 that is EFA, through libfabric and the
aws-ofi-nccl plugin, and without them plain TCP sockets (several times slower for the gradients'
all_reduce). Neither ships with torch: the image gets them from its base (``BASE_IMAGE``). A base with EFA
(AWS's Deep Learning Containers are such bases, or a CUDA base with AWS's EFA installer run as
``efa_installer.sh -y -g -d --skip-kmod --skip-limit-conf --no-verify``) holds libfabric under
``/opt/amazon/efa`` and the plugin (``libnccl-net*.so``) under ``/opt/amazon/ofi-nccl`` (older builds:
``/opt/aws-ofi-nccl``); both ``lib`` folders must be on ``LD_LIBRARY_PATH`` (NCCL loads the plugin by name),
and ``FI_PROVIDER=efa`` (with ``FI_EFA_USE_DEVICE_RDMA=1`` on p4d/p5) picks EFA. The instance must also pass
the EFA devices (``/dev/infiniband/uverbs*``) into the container. A multi-host CUDA job logs what it found
(:func:`network_stack`) and the network NCCL then chose (:func:`nccl_network`, read from NCCL's own INIT/NET
lines, which go to a file, not the job's log, unless ``NCCL_DEBUG`` is set).

Every collective waits at most ``collective_timeout`` seconds (a hyperparameter, default 10 minutes,
not torch's 30): a peer that hangs or died fails the job within it. A collective that fails because a
peer went away becomes a :class:`~maskrcnn.errors.PeerLostError` whose message says which host, at
which step, and where to look (:func:`describe_failure`), instead of the backend's raw text.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
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
    nccl_log: Path | None = None
    if world_size > 1:
        if config.resources.network_interface_name and device.type == "cuda" and len(hosts) > 1:
            # NCCL must use the interface SageMaker names (the only one routed between hosts). One host's
            # processes need no route: pinning an interface there would fail where it has another name.
            os.environ.setdefault("NCCL_SOCKET_IFNAME", config.resources.network_interface_name)
        if device.type == "cuda" and len(hosts) > 1:
            environ = {**config.network_env, "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", "")}
            if local_rank == 0:
                log.info("network between hosts: %s", network_stack(environ))
            nccl_log = Path(tempfile.mkdtemp(prefix="maskrcnn-nccl-"))
            os.environ.update(nccl_debug_to_file(environ, nccl_log))
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
        if nccl_log is not None:
            dist.all_reduce(torch.zeros(1, device=device))  # NCCL opens its communicator (and picks the network)
            if local_rank == 0:
                report_nccl_network(nccl_log)
    return DistContext(rank, local_rank, world_size, device)


# Where EFA's user space lives when a base image installed it (AWS's EFA installer, Deep Learning Containers)
NETWORK_LIBRARY_DIRS = (
    "/opt/amazon/ofi-nccl/lib",
    "/opt/amazon/ofi-nccl/lib64",
    "/opt/aws-ofi-nccl/lib",
    "/opt/amazon/efa/lib",
    "/opt/amazon/efa/lib64",
    "/usr/local/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
)


def _find_library(pattern: str, dirs: Sequence[str], root: Path) -> str | None:
    for directory in dirs:
        found = sorted((root / directory.lstrip("/")).glob(pattern)) if directory else []
        if found:
            return str(Path("/") / found[0].relative_to(root))
    return None


def network_stack(environ: Mapping[str, str], root: Path = Path("/")) -> str:
    """What NCCL can use between hosts, as one log line: the socket interface, the aws-ofi-nccl plugin and
    libfabric (searched on ``LD_LIBRARY_PATH`` and where EFA's installer puts them), EFA devices, FI_PROVIDER.
    ``root`` is the file system's root (tests lay out a fake one)."""
    dirs = [*environ.get("LD_LIBRARY_PATH", "").split(":"), *NETWORK_LIBRARY_DIRS]
    plugin = _find_library("libnccl-net*.so*", dirs, root)
    fabric = _find_library("libfabric.so*", dirs, root)
    devices = len(list((root / "dev" / "infiniband").glob("uverbs*")))
    parts = [
        f"NCCL_SOCKET_IFNAME={environ.get('NCCL_SOCKET_IFNAME') or '(unset)'}",
        f"aws-ofi-nccl plugin {plugin or 'not found'}",
        f"libfabric {fabric or 'not found'}",
        f"{devices} EFA/RDMA device(s)",
        f"FI_PROVIDER={environ.get('FI_PROVIDER') or '(unset)'}",
    ]
    if not (plugin and fabric and devices):
        parts.append("NCCL will use TCP sockets: on p4d/p5 build on a BASE_IMAGE with EFA (maskrcnn.train.distributed)")
    return ", ".join(parts)


def nccl_debug_to_file(environ: Mapping[str, str], directory: Path) -> dict[str, str]:
    """The variables that send NCCL's INIT and NET lines to files in ``directory`` (one per process), to read
    the network it chose from; none when ``NCCL_DEBUG`` is set (the user then reads them in the log)."""
    if environ.get("NCCL_DEBUG"):
        return {}
    return {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET", "NCCL_DEBUG_FILE": str(directory / "nccl.%h.%p.log")}


_USING_NETWORK = re.compile(r"NCCL INFO Using network (.+?)\s*$", re.M)
_DETAIL = re.compile(r"NCCL INFO (NET/OFI Selected Provider is \S+|NET/Socket : Using \S+|NET/IB : Using \S+)")


def nccl_network(text: str) -> str | None:
    """The network NCCL chose, from its INIT/NET lines: "Libfabric (NET/OFI Selected Provider is efa)",
    "Socket (NET/Socket : Using [0]eth0:10.0.0.1<0>)", ...; None when no line says."""
    chosen = _USING_NETWORK.search(text)
    if chosen is None:
        return None
    detail = _DETAIL.search(text)
    return f"{chosen.group(1)} ({detail.group(1)})" if detail else chosen.group(1)


def report_nccl_network(directory: Path) -> None:
    text = "".join(path.read_text(errors="replace") for path in sorted(directory.glob("nccl.*.log")))
    network = nccl_network(text)
    if network is None:
        log.info("NCCL network: not reported (NCCL_DEBUG is set: see NCCL's own lines)")
    elif network.startswith("Socket"):
        log.warning("NCCL network: %s: TCP between hosts; EFA needs libfabric and aws-ofi-nccl in the image", network)
    else:
        log.info("NCCL network: %s", network)


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
