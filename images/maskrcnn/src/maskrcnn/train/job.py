"""The training job: data -> model -> loop -> evaluation -> saved model, under the SageMaker contract.

``run(config)`` is the whole job for one host; ``images/maskrcnn/train`` calls it through
:func:`maskrcnn.cli.train_main`, which owns the failure file. One rank's job reads top to bottom in
:func:`main`: set-up, resume, the loop (an epoch's steps, checkpoint, stop, evaluation), finish. Launching:

    SAGEMAKER_BASE_DIR=/tmp/job images/maskrcnn/train     # a hand-made /opt/ml tree
    docker run -v /tmp/job:/opt/ml IMAGE train           # the image
    python -m local train --data DIR --output DIR        # the local harness

On a GPU host it starts one process per GPU (NCCL, AMP); on CPU one process (gloo when several
hosts). Every host lists the same ``hosts`` in resourceconfig.json; the first is the master. With several
processes: the launcher checks the host's data once (:func:`check_data`) and its processes reuse the image
sizes it read; ``lr`` is one process's and the job trains at ``lr`` x processes (:func:`job_lr`; the log
states the rate per image); trainable BatchNorm is synchronised on GPUs; the ranks agree on each step's
flags in one collective (:meth:`_Job.agree`); every rank predicts a part of the validation images, sharded
data included (:func:`validation_loader`), and rank 0 scores them.

Outputs (rank 0 only): ``model/model.safetensors`` and ``model/model.json``;
``output/data/metrics.json`` (history) and ``output/data/metrics.png`` (loss and mAP).
Checkpoints go to ``checkpoints/last.pt`` every ``checkpoint_every`` steps and on SIGTERM; a job
that finds one resumes from it and ends with the same weights as an uninterrupted run (CPU).
Exit codes: 0 done, 143 stopped by SIGTERM after checkpointing, 1 failed (see output/failure).
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from maskrcnn.contract import EXIT_STOPPED, setup_logging, write_failure
from maskrcnn.errors import ConfigError, DataError, JobError, ModelError, storage_error
from maskrcnn.model.architectures import (
    DEFAULT_SIZES,
    FORMAT_VERSION,
    ModelSpec,
    build_model,
    check_pretrained,
    save_model,
)
from maskrcnn.train import checkpoint, distributed
from maskrcnn.train.budget import BudgetPlanner, describe
from maskrcnn.train.config import Hyperparameters, TrainConfig
from maskrcnn.train.data import (
    DatasetIndex,
    GroupedOrder,
    ImageSizes,
    InstanceDataset,
    aspect_ratio_groups,
    collate,
    eval_transforms,
    ignore_stop_signals,
    image_sizes,
    load_index,
    merge_coco,
    split_index,
    train_transforms,
)
from maskrcnn.train.engine import (
    LoopState,
    Optimization,
    Step,
    TrainMetrics,
    autocast_dtype,
    evaluate,
    grad_scaler,
    make_optimizer,
    make_scheduler,
    non_finite_loss,
    train_steps,
)
from maskrcnn.train.metrics import Plan
from maskrcnn.train.summaries import OVERLAY_IMAGES, Summaries, plot_history, predicted_overlays

log = logging.getLogger(__name__)

DECODED_CACHE_LIMIT = 2**30  # bytes of decoded training images (uint8) worth keeping between epochs


class StopSignal:
    """Set by SIGTERM (StopTrainingJob, spot reclaim); polled between steps."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())

    def __call__(self) -> bool:
        return self.event.is_set()


class SkipSampler(Sampler[int]):
    """The epoch's sampler order, minus the first ``skip`` samples already trained before a restart."""

    def __init__(self, sampler: Sampler[int], skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)  # type: ignore[arg-type]  # ours are sized


def training_sampler(dataset: InstanceDataset, config: TrainConfig, ctx: distributed.DistContext) -> DistributedSampler:
    """Each rank's part of the training set.

    FullyReplicated (every host holds all data): split across every rank of the job. ShardedByS3Key
    (each host already holds its own part): split only among this host's processes, never across hosts.
    """
    if config.sharded("training"):
        nprocs = ctx.world_size // len(config.resources.hosts)
        return DistributedSampler(dataset, num_replicas=nprocs, rank=ctx.local_rank, shuffle=True, seed=config.hp.seed)
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.hp.seed)


def load_data(config: TrainConfig, sizes: ImageSizes | None = None) -> tuple[DatasetIndex, DatasetIndex]:
    """The training and validation sets, checked (``sizes``: the image headers as :func:`check_data` read them)."""
    hp = config.hp
    training = load_index(config.paths.channel("training"), hp.dataset_format, sizes)
    if "validation" in config.channels:
        validation = load_index(config.paths.channel("validation"), hp.dataset_format, sizes)
        if validation.class_names != training.class_names:
            raise DataError(
                f"validation classes {validation.class_names} differ from training classes {training.class_names}"
            )

        # The same file (or a hard link to it, as the local harness lays channels out) on both sides.
        def files(index: DatasetIndex) -> dict[tuple[int, int], str]:
            return {(st.st_dev, st.st_ino): im["file_name"] for im in index.images if (st := im["path"].stat())}

        train_files, val_files = files(training), files(validation)
        shared = [name for key, name in val_files.items() if key in train_files]
        if shared:
            names = ", ".join(sorted(shared)[:5])
            raise DataError(
                f"{len(shared)} image(s) are in both the training and the validation channel ({names}...); "
                "validation images must be held out of training"
            )
        return training, validation
    return split_index(training, hp.val_fraction, hp.seed)


def check_data(config: TrainConfig) -> dict[str, tuple[int, int]]:
    """Check this host's datasets once, before its training processes start, and return every image's size.

    Reading each image's header is the check's slow part (linear in the images, and under FastFile each is a
    read from S3; docs/benchmarks.md has COCO's); the processes get the sizes and read no
    header again (``load_index(..., sizes)``), while each still parses the annotations itself. Bad data fails
    here, in the launcher, before any process starts. Every host checks its own data (a sharded channel
    differs from host to host).
    """
    began = time.perf_counter()
    training, validation = load_data(config)
    sizes = {**image_sizes(training), **image_sizes(validation)}
    log.info(
        "data checked once for this host: %d image headers read in %.1f s", len(sizes), time.perf_counter() - began
    )
    return sizes


def pretrained_file(config: TrainConfig) -> Path | None:
    """The ``pretrained`` channel's single weights file, else a file baked into the image if it fits the arch."""
    if "pretrained" in config.channels:
        channel = config.paths.channel("pretrained")
        files = sorted(p for p in channel.glob("*") if p.suffix in (".pth", ".pt", ".safetensors"))
        if len(files) != 1:
            raise ConfigError(
                f"the pretrained channel must hold exactly one .pth/.pt/.safetensors file, found {len(files)}"
            )
        return files[0]
    if config.pretrained_path is not None and config.pretrained_path.is_file():
        try:  # the image's weights serve the architectures they fit; a channel's file must fit
            check_pretrained(config.hp.arch, config.pretrained_path)
        except ModelError as exc:
            log.warning("not using the image's weights, training from scratch: %s", exc)
            return None
        return config.pretrained_path
    return None


MAX_AUTO_WORKERS = 4  # torchvision's reference default; decoding and flips of a few images keep up with a GPU


def data_workers(requested: int, cpus: int, procs_per_host: int) -> int:
    """``requested`` loader workers, or for -1 the host's vCPUs shared among its training processes (at most 4)."""
    if requested >= 0:
        return requested
    return min(MAX_AUTO_WORKERS, cpus // max(procs_per_host, 1))


def loader_workers(config: TrainConfig, ctx: distributed.DistContext) -> int:
    procs = max(ctx.world_size // len(config.resources.hosts), 1)
    return data_workers(config.hp.num_workers, len(os.sched_getaffinity(0)), procs)


REFERENCE_LR = (0.02, 16)  # torchvision's detection reference: lr 0.02 for 16 images a step (8 GPUs x 2)


def job_lr(hp: Hyperparameters, world_size: int) -> float:
    """The optimizer's peak learning rate: ``lr`` times the number of training processes.

    ``lr`` and ``batch_size`` are both one process's: ``lr`` is the rate for ``batch_size`` images a step,
    and a job of N processes, which trains N x batch_size images a step, trains at N x lr (the linear scaling
    rule of Goyal et al. 2017 that torchvision's 0.02 per 16 images follows, applied as detectron2's
    ``REFERENCE_WORLD_SIZE`` applies it). So the same hyperparameters mean the same learning rate per image
    on any instance: a recipe tried on one GPU trains alike on an 8-GPU host or on several hosts, and a
    one-process job (the CPU demo) trains at ``lr`` exactly. Left unscaled, the usual move (the same
    hyperparameters, a bigger instance) would silently train at an eighth of the rate per image. Where a
    recipe gives a job-wide rate (torchvision's ``--lr 0.02`` for 8 x 2 images), divide it by the processes:
    the job's log states the rate it trains at, for how many images, and per image (:func:`describe_lr`).
    """
    return hp.lr * world_size


def describe_lr(hp: Hyperparameters, world_size: int) -> str:
    peak, images = job_lr(hp, world_size), hp.batch_size * world_size
    reference, per = REFERENCE_LR
    return (
        f"learning rate: peak {peak:.4g} for {images} images a step ({world_size} process(es) x batch_size "
        f"{hp.batch_size}; lr={hp.lr:g} is one process's, scaled by the processes): {peak / images:.4g} per image "
        f"(torchvision's reference: {reference:g} for {per} images, {reference / per:.4g} per image)"
    )


def run(config: TrainConfig, started: float | None = None) -> int:
    """Train on this host; returns the exit code (0 done, 143 stopped).

    ``started`` (``time.monotonic()``, which every process of the host shares) is when the job's process
    began: ``max_runtime`` counts from there."""
    started = time.monotonic() if started is None else started
    nprocs = config.procs_per_host or distributed.processes_per_host()
    if nprocs == 1:
        stop = StopSignal()
        stop.install()
        return worker(0, config, 1, stop, started)
    # SIGTERM stays blocked while the data is checked and the GPU processes start: they inherit the mask
    # through spawn's exec, so a stop that comes while one is still importing torch waits until its handler
    # is in place (spawned_worker unblocks it) instead of killing it, which would read as a failure.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        sizes = check_data(config)
        context = mp.start_processes(
            spawned_worker, args=(config, nprocs, started, sizes), nprocs=nprocs, join=False, start_method="spawn"
        )

        def forward(signum: int, _frame: Any) -> None:
            # SageMaker signals PID 1 only; every GPU process must hear the stop to checkpoint in step.
            for process in context.processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signum)

        signal.signal(signal.SIGTERM, forward)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a stop that came meanwhile: forwarded now
    log.info("started %d training processes", nprocs)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as exc:
        if exc.exit_code in (EXIT_STOPPED, -signal.SIGTERM):  # a process killed by SIGTERM was stopped too
            return EXIT_STOPPED
        raise
    return 0


def spawned_worker(
    local_rank: int, config: TrainConfig, nprocs: int, started: float, sizes: ImageSizes | None = None
) -> None:
    """One GPU's process: its own logging, its failure reason on disk, its exit code as the process's."""
    stop = StopSignal()
    stop.install()  # first: SIGTERM was blocked since before this process started (see run)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    setup_logging(rank=local_rank)
    try:
        code = worker(local_rank, config, nprocs, stop, started, sizes)
    except JobError as exc:
        if local_rank == 0:
            write_failure(config.paths, str(exc))
        raise
    finally:
        gc.freeze()  # a quick exit, as the entrypoint's (maskrcnn.cli.exit_process)
    if code:
        raise SystemExit(code)


def worker(
    local_rank: int,
    config: TrainConfig,
    nprocs: int,
    stop: StopSignal,
    started: float,
    sizes: ImageSizes | None = None,
) -> int:
    """One training process: join the job, train, leave; ``sizes``: the image headers the launcher read."""
    ctx = distributed.init(config, local_rank, nprocs)
    if not ctx.is_main:
        logging.getLogger("maskrcnn.train.engine").setLevel(logging.WARNING)  # one metrics stream per job
    state = LoopState()
    try:
        return main(config, ctx, stop, state, started, sizes)
    except RuntimeError as exc:
        where = f"epoch {state.epoch} step {state.global_step}"
        lost = distributed.describe_failure(exc, ctx, config, where)
        if lost is None:
            raise
        raise lost from exc
    finally:
        distributed.shutdown(ctx)


def main(
    config: TrainConfig,
    ctx: distributed.DistContext,
    stop: StopSignal,
    state: LoopState,
    job_started: float,
    sizes: ImageSizes | None = None,
) -> int:
    """The job on one rank, in the order it happens; ``state`` is advanced in place, so a failure can say where.

    Every rank runs the same collectives in the same order: set-up (the agreed step count), resume (the
    checkpoint broadcast), the loop (each step's flags, checkpoints' random states, evaluation), the outputs.
    """
    hp = config.hp
    job = _Job(config, ctx, stop, state, job_started, sizes)  # set-up: data, model, plan, optimization
    job.resume()  # a checkpoint, when there is one
    job.prepare_loop()  # DDP, the time budget, TensorBoard, the validation loader
    job.tell_plan("start")
    scores: dict[str, float] = {}
    evaluated = False
    while state.epoch < hp.epochs and state.global_step < state.last_step:
        if job.train_epoch():  # ran to the epoch's end
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        # The step's checkpoint comes first: a stop, a failed evaluation or a full disk later loses no training.
        job.save_checkpoint()
        if job.stopping():
            return stopped(state)
        last = state.epoch >= hp.epochs or state.global_step >= state.last_step
        if last:
            job.tell_plan("end")
        if last or state.epoch % hp.eval_every == 0:
            scores, evaluated = job.evaluate(), last
            if job.stopping():  # also every rank's wait for the evaluation to end
                return stopped(state)
            job.report_evaluation(scores)
    if not evaluated:  # resumed from a finished checkpoint: score the restored weights
        job.tell_plan("end")
        scores = job.evaluate()
        if job.stopping():
            return stopped(state)
        job.report_evaluation(scores, record=False)
    job.finish(scores)  # rank 0 writes the model and the metrics
    return 0


def set_determinism(hp: Hyperparameters, device: torch.device) -> None:
    """Seeded initialisation everywhere; on the CPU also deterministic kernels, so a resumed job ends with the
    weights of an uninterrupted one."""
    torch.manual_seed(hp.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN, to expose reads of uninitialised memory;
        # nothing here reads memory it has not written, and the fill is paid on every step (docs/benchmarks.md).
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def job_model(config: TrainConfig, ctx: distributed.DistContext, num_classes: int) -> torch.nn.Module:
    """The model on this rank's device, from the pretrained weights when there are some."""
    hp = config.hp
    model = build_model(
        hp.arch,
        num_classes,
        hp.min_size,
        hp.max_size,
        pretrained=pretrained_file(config),
        trainable_backbone_layers=hp.trainable_backbone_layers,
        max_detections=hp.max_detections,
    ).to(ctx.device)
    return distributed.sync_batch_norm(model, ctx)


def job_optimization(
    config: TrainConfig, ctx: distributed.DistContext, model: torch.nn.Module, steps_per_epoch: int, state: LoopState
) -> Optimization:
    """The optimizer at the job's rate, its schedule to ``state.last_step`` (read at every step: a time budget
    moves it), mixed precision where it pays; each choice logged."""
    hp = config.hp
    optimizer = make_optimizer(model, hp, job_lr(hp, ctx.world_size))
    log.info(describe_lr(hp, ctx.world_size))
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch, lambda: state.last_step)
    amp_dtype = autocast_dtype(ctx.device, config.cpu_env) if hp.amp else None
    log.info("mixed precision: %s", amp_dtype or "off")
    if ctx.device.type == "cpu":  # CPU figures differ between kernel classes: the log says which ran
        cpu = torch.backends.cpu.get_cpu_capability()
        log.info("cpu: %d torch threads, %s kernels", torch.get_num_threads(), cpu)
    return Optimization(optimizer, scheduler, grad_scaler(amp_dtype), amp_dtype, hp.clip_grad_norm)


@dataclass
class TrainingData:
    """This rank's training images: the dataset, this rank's share of it (``sampler``), its batches of similar
    aspect ratios (``order``: less padding, as torchvision's reference does) and the loader's worker processes."""

    index: DatasetIndex
    dataset: InstanceDataset
    sampler: DistributedSampler
    order: GroupedOrder
    workers: int

    def loader(self, hp: Hyperparameters, state: LoopState, device: torch.device) -> DataLoader:
        """The rest of the current epoch's batches, in the order an uninterrupted epoch would have them."""
        self.dataset.set_epoch(state.epoch)
        self.sampler.set_epoch(state.epoch)
        return DataLoader(
            self.dataset,
            batch_size=hp.batch_size,
            sampler=SkipSampler(self.order, state.step_in_epoch * hp.batch_size),
            collate_fn=collate,
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(hp.seed + state.epoch),
            worker_init_fn=ignore_stop_signals,
        )


def training_data(config: TrainConfig, ctx: distributed.DistContext, index: DatasetIndex) -> TrainingData:
    hp = config.hp
    # Decode each training image once, not every epoch (a share of every CPU step), where it fits and the
    # samples are read in this process: a loader worker's copy would die with the worker at each epoch's end.
    decoded = index.decoded_bytes()
    workers = loader_workers(config, ctx)
    cache = workers == 0 and decoded <= DECODED_CACHE_LIMIT
    if cache:
        log.info("keeping the decoded training images in memory (%.0f MB)", decoded / 2**20)
    dataset = InstanceDataset(index, train_transforms(hp.hflip, hp.photometric), seed=hp.seed, cache=cache)
    sampler = training_sampler(dataset, config, ctx)
    order = GroupedOrder(sampler, aspect_ratio_groups(index, hp.aspect_ratio_group_factor), hp.batch_size)
    return TrainingData(index, dataset, sampler, order, workers)


@dataclass(frozen=True)
class StepPlan:
    per_epoch: int
    total: int  # without a time budget; the budget moves ``LoopState.last_step``, never this


def plan_steps(hp: Hyperparameters, sampler: DistributedSampler, ctx: distributed.DistContext) -> StepPlan:
    """Steps per epoch and in all. Hosts of a sharded channel hold different amounts of data, but every rank
    must run the same collectives: all train the smallest rank's number of steps an epoch."""
    own_steps = math.ceil(len(sampler) / hp.batch_size)
    per_epoch = distributed.agreed_min(own_steps, ctx)
    if per_epoch < own_steps:
        log.info(
            "this rank holds %d steps of data an epoch; every rank trains %d (the smallest rank's)",
            own_steps,
            per_epoch,
        )
    total = hp.epochs * per_epoch
    if hp.max_steps:
        total = min(total, hp.max_steps)
    log.info("plan: %d steps (%d epochs of %d steps)", total, hp.epochs, per_epoch)
    return StepPlan(per_epoch, total)


@dataclass
class Validation:
    """What evaluating needs, built once: this rank's loader (:func:`validation_loader`), rank 0's ground truth
    for the job's whole validation set and the job-wide ids of this rank's images (:func:`job_ground_truth`), and
    the images drawn with predictions at each evaluation."""

    loader: DataLoader
    ground_truth: dict[str, Any] | None
    image_ids: dict[Any, int] | None
    overlay_set: InstanceDataset

    @classmethod
    def build(cls, index: DatasetIndex, config: TrainConfig, ctx: distributed.DistContext) -> Validation:
        loader = validation_loader(index, config, ctx)  # its log line first, as each rank's part comes first
        ground_truth, image_ids = job_ground_truth(index, config, ctx)
        return cls(loader, ground_truth, image_ids, InstanceDataset(index, eval_transforms()))

    def overlay_images(self) -> list[torch.Tensor]:
        return [self.overlay_set[i][0] for i in range(min(OVERLAY_IMAGES, len(self.overlay_set)))]


class _Job:
    """One rank's pieces, built in set-up order by ``__init__``; :func:`main` calls them in the order things
    happen: resume, prepare_loop, then train_epoch / save_checkpoint / evaluate, finish."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: distributed.DistContext,
        stop: StopSignal,
        state: LoopState,
        job_started: float,
        sizes: ImageSizes | None = None,
    ):
        self.config, self.hp, self.ctx, self.stop, self.state = config, config.hp, ctx, stop, state
        self.job_started = job_started
        hp = self.hp
        set_determinism(hp, ctx.device)
        train_index, self.val_index = load_data(config, sizes)
        log.info(
            "data: %d training and %d validation images, classes %s (%s format)",
            len(train_index.images),
            len(self.val_index.images),
            train_index.class_names,
            train_index.source,
        )
        distributed.check_same_classes(train_index.class_names, ctx, config)
        self.model = job_model(config, ctx, train_index.num_classes)
        self.train_model: torch.nn.Module = self.model
        self.train = training_data(config, ctx, train_index)
        self.steps = plan_steps(hp, self.train.sampler, ctx)
        state.last_step = self.steps.total  # before the schedule is built: its first step's rate reads the plan
        self.optimization = job_optimization(config, ctx, self.model, self.steps.per_epoch, state)
        self.fingerprint = {
            "arch": hp.arch,
            "format": FORMAT_VERSION,
            "classes": train_index.class_names,
            "seed": hp.seed,
            "batch_size": hp.batch_size,
            "world_size": ctx.world_size,
        }
        self.budget: BudgetPlanner | None = None
        self.prior_budget: dict[str, float] = {}  # a restart of this job: what its earlier attempts measured
        self.summaries = Summaries(None)
        self.validation: Validation | None = None
        self.started = time.perf_counter()

    def resume(self) -> None:
        """Continue from ``checkpoints/last.pt`` when there is one (read by rank 0, sent to every rank)."""
        ctx, directory = self.ctx, self.config.paths.checkpoints_dir
        payload = checkpoint.load(directory) if ctx.is_main else None
        if ctx.distributed:
            box = [payload]
            torch.distributed.broadcast_object_list(box, src=0)
            payload = box[0]
        if payload is None:
            return
        if payload["fingerprint"] != self.fingerprint:
            raise ConfigError(
                f"the checkpoint in {directory} was made by a different job "
                f"({payload['fingerprint']}); remove it or restore that job's settings ({self.fingerprint})"
            )
        opt = self.optimization
        restored = checkpoint.restore(payload, self.model, opt.optimizer, opt.scheduler, opt.scaler, rank=ctx.rank)
        vars(self.state).update(vars(restored), last_step=self.steps.total)
        log.info("resuming from checkpoint: epoch %d, step %d", self.state.epoch, self.state.global_step)
        ran = float(payload.get("runtime", 0.0))
        if ran and payload.get("job_name") == self.config.job_name:
            # The same job restarted (a Spot interruption, a retry): SageMaker's MaxRuntimeInSeconds counts every
            # attempt together, so the budget does too. Another job resuming this checkpoint has a clock of its own.
            self.job_started -= ran
            self.prior_budget = dict(payload.get("budget", {}))
            if self.hp.max_runtime:
                log.info(
                    "budget: this job ran %.0f s before it restarted; %.0f s of max_runtime=%d s are left",
                    ran,
                    self.hp.max_runtime - ran,
                    self.hp.max_runtime,
                )

    def prepare_loop(self) -> None:
        """DDP, the time budget (planned from the step training starts at), TensorBoard, validation."""
        hp, ctx = self.hp, self.ctx
        if ctx.distributed:
            device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if hp.max_runtime:
            self.budget = BudgetPlanner(
                hp.max_runtime,
                self.job_started,
                self.steps.total,
                self.steps.per_epoch,
                (hp.eval_every, hp.epochs),
                len(self.val_index.images),
                hp.batch_size * ctx.world_size,
                first_step=self.state.global_step,
                prior=self.prior_budget,
            )
        # A resumed job's earlier entries are in its first run's files.
        self.summaries = Summaries(self.config.paths.tensorboard_dir if ctx.is_main else None, len(self.state.history))
        self.validation = Validation.build(self.val_index, self.config, ctx)
        self.started = time.perf_counter()

    def stopping(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        return distributed.any_rank(self.stop(), self.ctx)

    def train_epoch(self) -> bool:
        """The rest of the current epoch; True when it ran to the epoch's end.

        Between steps, in this order: the step's flags agreed by every rank (one collective: a non-finite
        loss, a stop request, the budget's plan), the metrics line, TensorBoard, the stop, the periodic
        checkpoint, the budget's new end."""
        hp, ctx, state = self.hp, self.ctx, self.state
        metrics = TrainMetrics(hp.log_every, ctx.world_size)
        for step in train_steps(
            self.train_model,
            self.optimization,
            self.train.loader(hp, state, ctx.device),
            ctx.device,
            state,
            self.steps.per_epoch,
        ):
            last = bool(hp.max_steps) and state.global_step >= hp.max_steps
            flags = self.agree(step, budget=not last)
            lr = self.optimization.lr()
            if flags.nonfinite:
                raise non_finite_loss(step, state, lr, here=not bool(step.finite))
            metrics.add(step, state, lr)
            if last:
                return False
            self.report()
            if flags.stop:
                return False
            if hp.checkpoint_every and state.global_step % hp.checkpoint_every == 0:
                self.save_checkpoint()
            if self.budget is not None and not self.keep_to_budget(flags):
                return False
        return True

    def agree(self, step: Step, budget: bool) -> distributed.StepFlags:
        """The step's flags, agreed by every rank in one collective; with ``budget`` (and a time budget), this
        step's time is recorded and the budget plans (at the steps it is due) or checks that a step still fits."""
        plan, late = None, False
        if budget and self.budget is not None:
            current, now = self.state, time.monotonic()
            self.budget.record(current.global_step, current.step_in_epoch, now)
            if self.budget.due(current.global_step, current.step_in_epoch):
                plan = self.budget.plan(current.global_step, now)
            else:
                late = self.budget.out_of_time(now)
        return distributed.agree(step.finite, self.stop(), self.ctx, out_of_time=late, plan=plan)

    def keep_to_budget(self, flags: distributed.StepFlags) -> bool:
        """The agreed plan (every rank the same step count: the smallest) as the job's end; False when the
        epoch must end here (no further step fits)."""
        budget, current = self.budget, self.state
        assert budget is not None
        if flags.plan is not None:
            if flags.plan != current.last_step:
                level = logging.INFO if budget.worth_telling(flags.plan) else logging.DEBUG
                log.log(level, describe(self.hp.max_runtime, budget.step_seconds(), flags.plan, current.last_step))
                current.last_step = flags.plan
                self.tell_plan("budget")
        elif flags.out_of_time:
            log.warning(
                "budget: stopping at step %d of %d: the steps ran slower than planned",
                current.global_step,
                current.last_step,
            )
            current.last_step = current.global_step
            self.tell_plan("budget")
        # An epoch's natural end is left to the loop, which then counts the epoch as done.
        return not (current.global_step >= current.last_step and current.step_in_epoch < self.steps.per_epoch)

    def tell_plan(self, event: str) -> None:
        """The plan as the structured line the harness reads (rank 0; the sentences beside it are for people)."""
        if not self.ctx.is_main:
            return
        state = self.state
        log.info(Plan(event, state.global_step, state.global_step if event == "end" else state.last_step).line())
        if event == "end" and self.budget is not None:  # small re-plans were logged at DEBUG
            took = time.monotonic() - self.job_started
            log.info(
                "budget: trained to step %d of its plan, %.0f s into max_runtime=%d s",
                state.global_step,
                took,
                self.hp.max_runtime,
            )

    def save_checkpoint(self) -> None:
        # Every rank's random state (each draws its own augmentations and dropout), written by rank 0.
        rng = distributed.gather_to_main([checkpoint.rng_state()], self.ctx)
        if self.ctx.is_main:
            checkpoint.save(
                self.config.paths.checkpoints_dir,
                self.model,
                self.optimization.optimizer,
                self.optimization.scheduler,
                self.optimization.scaler,
                self.state,
                self.fingerprint,
                rng=rng,
                job=(self.config.job_name, time.monotonic() - self.job_started),
                budget=self.budget.measurements() if self.budget is not None else None,
            )

    def report(self) -> None:
        """New history entries to TensorBoard (rank 0 only has a history)."""
        self.summaries.catch_up(self.state.history)

    def evaluate(self) -> dict[str, float]:
        """Every rank predicts its part of the validation images (:func:`validation_loader`), rank 0 scores
        them all; the scores on rank 0, {} on the others.

        Stops at the next batch on SIGTERM (the scores are then partial, and unused)."""
        ctx, validation = self.ctx, self.validation
        assert validation is not None, "prepare_loop builds it"
        ids = validation.image_ids

        def gather(results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            if ids is not None:  # several hosts' shards: their images in the job-wide numbering
                results = [{**result, "image_id": ids[result["image_id"]]} for result in results]
            return distributed.gather_to_main(results, ctx)

        return evaluate(
            self.model,
            validation.loader,
            validation.ground_truth,
            ctx.device,
            self.state.epoch,
            should_stop=self.stop,
            gather=gather if ctx.distributed else None,
        )

    def report_evaluation(self, scores: dict[str, float], record: bool = True) -> None:
        """Rank 0: the scores into the history (when ``record``) and TensorBoard, with a few images' predictions."""
        if not self.ctx.is_main:
            return
        state, hp = self.state, self.hp
        entry = {"phase": "eval", "epoch": state.epoch, "step": state.global_step, **scores}
        if record:
            state.history.append(entry)
            self.report()
        else:
            self.summaries.history([entry])
        assert self.validation is not None, "prepare_loop builds it"
        images = self.validation.overlay_images()
        self.summaries.overlays(
            state.global_step,
            predicted_overlays(
                self.model, images, self.ctx.device, self.train.index.class_names, hp.score_threshold, hp.mask_threshold
            ),
        )

    def finish(self, scores: dict[str, float]) -> None:
        """Rank 0 writes the model and the metrics; every rank waits for it."""
        if self.ctx.is_main:
            write_outputs(
                self.config, self.model, self.train.index, scores, self.state, time.perf_counter() - self.started
            )
            self.summaries.close()
        distributed.barrier(self.ctx)


def stopped(state: LoopState) -> int:
    log.warning("stopped by SIGTERM at step %d; checkpoint saved, a restart resumes from it", state.global_step)
    return EXIT_STOPPED


def validation_loader(index: DatasetIndex, config: TrainConfig, ctx: distributed.DistContext) -> DataLoader:
    """This rank's part of the validation images: every rank predicts a part, no image twice (no padding),
    and rank 0 scores the merged predictions (:meth:`_Job.evaluate`).

    FullyReplicated (a validation channel every host holds whole, or a split of a FullyReplicated training
    channel: same files, same seed): every world_size-th image of the set. ShardedByS3Key: each host holds
    validation images of its own; its processes take every nprocs-th of them, and rank 0 scores every host's
    (:func:`job_ground_truth`).
    """
    channel = "validation" if "validation" in config.channels else "training"
    sharded = config.sharded(channel)
    nprocs = ctx.world_size // len(config.resources.hosts)
    count = len(index.images)
    part = range(ctx.local_rank, count, nprocs) if sharded else range(ctx.rank, count, ctx.world_size)
    if ctx.distributed:
        whose = f"this host's {count} (sharded)" if sharded else f"the {count}"
        log.info("evaluation: this rank predicts %d of %s validation images", len(part), whose)
    dataset: torch.utils.data.Dataset = InstanceDataset(index, eval_transforms())
    if len(part) < count:
        dataset = torch.utils.data.Subset(dataset, part)
    return DataLoader(
        dataset,
        batch_size=2,
        collate_fn=collate,
        num_workers=min(loader_workers(config, ctx), 2),
        worker_init_fn=ignore_stop_signals,
    )


def job_ground_truth(
    index: DatasetIndex, config: TrainConfig, ctx: distributed.DistContext
) -> tuple[dict[str, Any] | None, dict[Any, int] | None]:
    """Rank 0's ground truth for the job's whole validation set (None on the other ranks), and the job-wide
    number of each of this rank's validation images where the ids need one (else None).

    One host or FullyReplicated data: the index's own, ids as they are. ShardedByS3Key over several hosts:
    a host's image ids are unique only on that host, so every host's images are numbered 1..N host after
    host, and each host's first process sends its ground truth to rank 0 (once, at set-up).
    """
    channel = "validation" if "validation" in config.channels else "training"
    hosts = len(config.resources.hosts)
    if not (config.sharded(channel) and hosts > 1):
        return (index.to_coco() if ctx.is_main else None), None
    nprocs = ctx.world_size // hosts
    counts = distributed.gather_to_all(len(index.images), ctx)[::nprocs]  # one per host, in host order
    host = ctx.rank // nprocs
    first = sum(counts[:host])
    ids = {image["id"]: first + n for n, image in enumerate(index.images, 1)}
    own = [index.to_coco(ids)] if ctx.local_rank == 0 else []
    parts = distributed.gather_to_main(own, ctx)
    if parts is None:
        return None, ids
    log.info("evaluation: rank 0 scores %d validation images of %d hosts (%s)", sum(counts), hosts, counts)
    return merge_coco(parts), ids


def write_outputs(
    config: TrainConfig,
    model: torch.nn.Module,
    index: DatasetIndex,
    scores: dict[str, float],
    state: LoopState,
    seconds: float,
) -> None:
    hp = config.hp
    default_min, default_max = DEFAULT_SIZES[hp.arch]
    spec = ModelSpec(
        arch=hp.arch,
        class_names=tuple(index.class_names),
        min_size=hp.min_size or default_min,
        max_size=hp.max_size or default_max,
        score_threshold=hp.score_threshold,
        mask_threshold=hp.mask_threshold,
        max_detections=hp.max_detections,
        metrics={k: round(v, 6) for k, v in scores.items()},
        training={
            "job_name": config.job_name,
            "hyperparameters": hp.to_dict(),
            "steps": state.global_step,
            "train_seconds": round(seconds, 1),
        },
    )
    try:
        save_model(config.paths.model_dir, model, spec)
    except (OSError, SafetensorError) as exc:
        raise storage_error(exc, config.paths.model_dir, "writing the model to") from exc
    out = config.paths.output_data_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"history": state.history, "final": scores}, indent=1))
        plot_history(state.history, out / "metrics.png")
    except OSError as exc:
        raise storage_error(exc, out, "writing metrics to") from exc
    log.info("model written to %s (%s)", config.paths.model_dir, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
