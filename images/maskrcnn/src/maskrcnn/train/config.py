"""Everything the job is told, read once at the edge into frozen, typed objects.

SageMaker tells a training container what to do through files under one base directory
(``/opt/ml``, or ``SAGEMAKER_BASE_DIR`` when set) and a few environment variables. This module
turns those into :class:`TrainConfig`; nothing else in the package reads ``os.environ`` or the
config files. Tests build configs from plain dicts with :meth:`TrainConfig.from_dicts`.

Hyperparameters arrive as strings written by either SDK generation: v2 writes ``str(v)``
(``"True"``, ``"[16, 22]"``); v3 passes strings as they are and writes everything else as
``json.dumps(v)`` (``"true"``, ``"[16, 22]"``); framework estimators JSON-quote strings too
(``"\\"lite\\""``). All decode here; an unknown key fails with the list of accepted ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskrcnn.contract import SageMakerPaths, base_paths
from maskrcnn.dataset_layout import DISTRIBUTIONS
from maskrcnn.device import CPU_ISA_CAPS
from maskrcnn.errors import ConfigError
from maskrcnn.model.format import ARCHS

DATASET_FORMATS = ("auto", "coco", "pennfudan")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")


@dataclass(frozen=True)
class Hyperparameters:
    """Every training knob, with its default. The README's table lists them; tests/image/test_readme.py holds
    it to every name and default here."""

    arch: str = "lite"  # lite (CPU-sized), resnet50_fpn or resnet50_fpn_v2
    epochs: int = 12  # passes over the training set
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit; for smoke runs)
    max_runtime: int = 0  # seconds the job may take: fit the schedule's steps, evaluate, write the model (0 = none)
    batch_size: int = 4  # images per process per step
    lr: float = 0.02  # peak learning rate for one process's batch_size images; N processes train at N x lr
    optimizer: str = "sgd"  # sgd or adamw
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 / decoupled weight decay
    lr_schedule: str = "cosine"  # cosine, multistep or constant (after warm-up)
    lr_steps: tuple[int, ...] = (8, 11)  # epochs at which multistep multiplies lr by lr_gamma
    lr_gamma: float = 0.1  # multistep decay factor
    warmup_steps: int = 50  # linear warm-up from lr * warmup_factor to lr (at most half the planned steps)
    warmup_factor: float = 0.001  # starting fraction of lr during warm-up
    clip_grad_norm: float = 10.0  # max gradient L2 norm (0 = no clipping)
    amp: bool = True  # mixed precision: bfloat16 on CUDA (float16 + loss scaling before Ampere) and usable CPU AMX
    min_size: int = 0  # shorter image side fed to the model (0 = the arch's default)
    max_size: int = 0  # longer side cap (0 = the arch's default)
    hflip: float = 0.5  # horizontal flip probability (boxes and masks move with the image)
    photometric: bool = False  # random brightness/contrast/saturation/hue jitter
    seed: int = 0  # seeds data order, augmentation and init; CPU runs are bit-reproducible
    val_fraction: float = 0.2  # held-out share of training when no validation channel is given
    dataset_format: str = "auto"  # auto, coco or pennfudan
    num_workers: int = -1  # data-loader worker processes per training process (-1 = min(4, vCPUs per process))
    aspect_ratio_group_factor: int = 3  # batch images of similar aspect ratio, in 2x this many bins (0 = off)
    checkpoint_every: int = 200  # steps between checkpoints in /opt/ml/checkpoints (0 = only on stop)
    eval_every: int = 1  # evaluate every N epochs (the last epoch is always evaluated)
    log_every: int = 10  # steps between training metric lines (the first and the last step are always logged)
    collective_timeout: int = 600  # seconds a distributed collective may wait for a peer before the job fails
    trainable_backbone_layers: int = 3  # resnet stages left trainable when pretrained weights are used
    score_threshold: float = 0.5  # serving default: minimum detection score
    mask_threshold: float = 0.5  # serving default: mask probability cut-off
    max_detections: int = 100  # serving default: detections per image

    @classmethod
    def accepted(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_strings(cls, raw: Mapping[str, Any]) -> Hyperparameters:
        """Decode SageMaker's string-valued map; unknown keys and bad values fail loudly."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key.startswith("sagemaker_") or key.startswith("_"):
                continue  # the SDK's own bookkeeping (sagemaker_program, _tuning_objective_metric ...)
            if key not in fields:
                raise ConfigError(f"unknown hyperparameter {key!r}; accepted: {', '.join(sorted(fields))}")
            values[key] = _decode(key, value, fields[key].type)
        hp = cls(**values)
        hp.validate()
        return hp

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        need(self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}")
        need(
            self.dataset_format in DATASET_FORMATS,
            f"dataset_format must be one of {', '.join(DATASET_FORMATS)}",
        )
        need(self.epochs >= 1, "epochs must be >= 1")
        need(self.max_steps >= 0, "max_steps must be >= 0")
        need(self.max_runtime >= 0, "max_runtime must be >= 0 (seconds; 0 = no budget)")
        need(self.batch_size >= 1, "batch_size must be >= 1")
        need(self.lr > 0, "lr must be > 0")
        need(0.0 < self.val_fraction < 1.0, "val_fraction must be between 0 and 1")
        need(0.0 <= self.hflip <= 1.0, "hflip must be a probability")
        need(self.min_size >= 0 and self.max_size >= 0, "min_size and max_size must be >= 0")
        need(self.num_workers >= -1, "num_workers must be >= 0, or -1 (sized to the host)")
        need(self.aspect_ratio_group_factor >= 0, "aspect_ratio_group_factor must be >= 0")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        need(self.eval_every >= 1, "eval_every must be >= 1")
        need(self.log_every >= 1, "log_every must be >= 1")
        need(self.collective_timeout >= 10, "collective_timeout must be >= 10 (seconds)")
        need(0.0 <= self.score_threshold <= 1.0, "score_threshold must be within [0, 1]")
        need(0.0 < self.mask_threshold < 1.0, "mask_threshold must be within (0, 1)")
        need(self.max_detections >= 1, "max_detections must be >= 1")
        need(0 <= self.trainable_backbone_layers <= 5, "trainable_backbone_layers must be 0..5")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lr_steps"] = list(self.lr_steps)
        return out


def _decode(key: str, value: Any, kind: Any) -> Any:
    """One string from hyperparameters.json -> the field's type."""
    if not isinstance(value, str):
        value = json.dumps(value)  # a hand-written file may hold real JSON types
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = json.loads(text)  # SDK v3 wrote json.dumps of a string
    kind = str(kind)
    try:
        if kind == "bool":
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if kind == "int":
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        if kind == "float":
            return float(text)
        if kind.startswith("tuple"):
            items = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t.strip()]
            return tuple(int(i) for i in items)
        return text
    except (ValueError, TypeError, json.JSONDecodeError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(
            kind, "a list of integers like [8, 11]"
        )
        raise ConfigError(f"hyperparameter {key!r} must be {expected}, got {value!r}") from None


NETWORK_PREFIXES = ("NCCL_", "FI_")  # what NCCL and libfabric read: the transport between hosts
INPUT_MODES = ("File", "FastFile")  # both present the channel as files; Pipe (FIFOs) is not read


def channel_distributions(inputdataconfig: Mapping[str, Any]) -> dict[str, str]:
    """Each channel's ``S3DistributionType`` (FullyReplicated when absent, as SDK local modes write none).

    ``TrainingInputMode`` Pipe is refused: the job reads datasets as files (File and FastFile both give files).
    """
    out: dict[str, str] = {}
    for name, entry in inputdataconfig.items():
        entry = entry or {}
        mode = entry.get("TrainingInputMode", "File")
        if mode not in INPUT_MODES:
            raise ConfigError(
                f"channel {name!r}: TrainingInputMode {mode!r} is not supported; use File or FastFile "
                "(the job reads the dataset as files, Pipe mode streams FIFOs)"
            )
        distribution = entry.get("S3DistributionType", "FullyReplicated")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"channel {name!r}: S3DistributionType {distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"
            )
        out[name] = distribution
    return out


@dataclass(frozen=True)
class ResourceConfig:
    """Which host this is among the job's hosts (resourceconfig.json)."""

    current_host: str = "algo-1"
    hosts: tuple[str, ...] = ("algo-1",)
    network_interface_name: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ResourceConfig:
        hosts = tuple(raw.get("hosts") or ("algo-1",))
        current = raw.get("current_host", hosts[0])
        if current not in hosts:
            raise ConfigError(f"resourceconfig.json: current_host {current!r} is not in hosts {list(hosts)}")
        return cls(current, hosts, raw.get("network_interface_name"))

    @property
    def host_rank(self) -> int:
        return self.hosts.index(self.current_host)


@dataclass(frozen=True)
class TrainConfig:
    """The resolved training job: paths, hyperparameters, cluster and channels."""

    paths: SageMakerPaths
    hp: Hyperparameters
    resources: ResourceConfig
    channels: tuple[str, ...]
    job_name: str = "local-job"
    distributions: Mapping[str, str] = field(default_factory=dict)  # channel -> S3DistributionType
    master_addr: str | None = None  # overrides hosts[0]; lets emulated hosts share one machine
    master_port: int = 29500
    pretrained_path: Path | None = None  # a weights file baked into the image, if any
    procs_per_host: int | None = None  # None: one per GPU (one on CPU); set to test the launcher on CPU
    extra: Mapping[str, Any] = field(default_factory=dict)
    network_env: Mapping[str, str] = field(default_factory=dict)  # NCCL_*, FI_* and LD_LIBRARY_PATH, for NCCL's log
    cpu_env: Mapping[str, str] = field(default_factory=dict)  # oneDNN's ISA cap, for mixed precision on CPU

    @classmethod
    def from_dicts(
        cls,
        base_dir: str | Path,
        hyperparameters: Mapping[str, Any] | None = None,
        inputdataconfig: Mapping[str, Any] | None = None,
        resourceconfig: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TrainConfig:
        environ = environ or {}
        paths = SageMakerPaths(Path(base_dir))
        if inputdataconfig is None:
            # No inputdataconfig.json: trust what is mounted under input/data.
            found = sorted(p.name for p in paths.data_dir.iterdir()) if paths.data_dir.is_dir() else []
            inputdataconfig = {name: {} for name in found}
        unknown = set(inputdataconfig) - {"training", "validation", "pretrained"}
        if unknown:
            raise ConfigError(f"unknown input channel(s) {sorted(unknown)}; accepted: training, validation, pretrained")
        if "training" not in inputdataconfig:
            raise ConfigError("the 'training' channel is required (s3 or file input named 'training')")
        pretrained = environ.get("MASKRCNN_PRETRAINED_PATH")
        return cls(
            paths=paths,
            hp=Hyperparameters.from_strings(hyperparameters or {}),
            resources=ResourceConfig.from_dict(resourceconfig or {}),
            channels=tuple(sorted(inputdataconfig)),
            distributions=channel_distributions(inputdataconfig),
            job_name=environ.get("TRAINING_JOB_NAME", "local-job"),
            master_addr=environ.get("MASKRCNN_MASTER_ADDR") or None,
            master_port=int(environ.get("MASKRCNN_MASTER_PORT", "29500")),
            pretrained_path=Path(pretrained) if pretrained else None,
            procs_per_host=int(environ["MASKRCNN_PROCS_PER_HOST"]) if environ.get("MASKRCNN_PROCS_PER_HOST") else None,
            network_env={k: v for k, v in environ.items() if k.startswith(NETWORK_PREFIXES) or k == "LD_LIBRARY_PATH"},
            cpu_env={k: v for k, v in environ.items() if k in CPU_ISA_CAPS},
        )

    def sharded(self, channel: str) -> bool:
        """True when each host received its own part of ``channel`` (ShardedByS3Key), not all of it."""
        return self.distributions.get(channel) == "ShardedByS3Key"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainConfig:
        """Read the base directory's config files and the environment, once."""
        environ = dict(os.environ if environ is None else environ)
        paths = base_paths(environ)
        return cls.from_dicts(
            paths.base,
            _read_json(paths.hyperparameters_file, {}),
            _read_json(paths.inputdataconfig_file, None),
            _read_json(paths.resourceconfig_file, {}),
            environ,
        )


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} must hold a JSON object")
    return data


# The CPU preset for the built-in synthetic set (160-px images), tuned for 2 CPU cores: what
# bench/bench_convergence.py measures and the demo's preset builds on (docs/benchmarks.md has the curve).
SYNTHETIC_CPU_PRESET: dict[str, str] = {
    "arch": "lite",
    "epochs": "10",  # sized to bench_convergence's 300-s training budget on 2 cores (docs/benchmarks.md)
    "batch_size": "4",
    "min_size": "160",
    "max_size": "160",
    "optimizer": "adamw",
    "lr": "0.003",
    "weight_decay": "0.05",
    "num_workers": "0",  # on 2 cores a loader process steals more from the 2 torch threads than it saves
}
SYNTHETIC_CPU_IMAGE_SIZE = 160
SYNTHETIC_CPU_TRAIN_IMAGES = 400

# `make demo`'s training job (local/demo.py): the CPU preset on twice its training images for 6 epochs instead
# of 10, the same 1200 steps at most as 12 epochs of 400 but each image seen half as often, which scored higher
# held out (docs/benchmarks.md, "Fewer repeats"). It validates at the middle and the end only, inside a time
# budget: the job plans the steps that fit, so a slower CPU anneals fewer steps instead of overrunning the
# demo's DEMO_SECONDS. DEMO_REST_SECONDS is left for the rest of the demo (writing the data, starting the job,
# serving the held-out images, scoring), sized to the slowest CPU measured (docs/benchmarks.md).
DEMO_SECONDS = 600  # the demo's target on 2 CPU cores, set-up excluded
DEMO_REST_SECONDS = 80
DEMO_PRESET: dict[str, str] = {
    **SYNTHETIC_CPU_PRESET,
    "epochs": "6",
    "eval_every": "3",
    "max_runtime": str(DEMO_SECONDS - DEMO_REST_SECONDS),
}
DEMO_TRAIN_IMAGES = 2 * SYNTHETIC_CPU_TRAIN_IMAGES  # all trained on (the job validates on a set of its own)

# The SageMaker GPU preset: what the AWS workflow (`python -m pipeline start`) trains unless `-p KEY=VALUE`
# overrides a key. It holds only the keys that differ from Hyperparameters' defaults (sizes stay 0: the
# arch's own 800/1333). checkpoint_every counts optimizer steps: a resnet50 checkpoint (weights and
# optimizer state) is hundreds of MB, so it is written every few minutes of GPU work, not every step.
GPU_RESNET50_PRESET: dict[str, str] = {
    "arch": "resnet50_fpn",
    "epochs": "10",
    "lr": "0.01",  # SGD for one GPU's 4 images a step (x GPUs on a bigger host: the rate per image stays)
    "checkpoint_every": "500",
}

# Every named preset of the schema above; each must decode with Hyperparameters.from_strings.
PRESETS: dict[str, dict[str, str]] = {
    "demo": DEMO_PRESET,
    "gpu-resnet50": GPU_RESNET50_PRESET,
    "synthetic-cpu": SYNTHETIC_CPU_PRESET,
}
