"""The SageMaker host image (AMI version) a GPU instance runs, chosen so that the image's CUDA reaches its driver.

SageMaker picks the NVIDIA driver of an endpoint's or a batch transform's hosts by an AMI version: the default
for ml.g4dn, ml.g5 and ml.p4d endpoints runs R470, which no route of the image reaches (docs/image.md, "GPU
drivers", has the matrix). So every NVIDIA GPU instance type gets one explicitly::

    inference_ami("ml.g4dn.xlarge")            # 'al2023-ami-sagemaker-inference-gpu-4-1' (R580: CUDA 13 natively)
    transform_ami("ml.g5.xlarge")              # 'al2-ami-sagemaker-batch-gpu-535' (R535: forward compatibility)
    inference_ami("ml.m5.xlarge")              # None: a CPU instance has no GPU AMI
    inference_ami("ml.g5.xlarge", "al2-ami-sagemaker-inference-gpu-2-1")   # an override the image reaches

The AMI names and their drivers live in :mod:`maskrcnn.device`, next to the routes that decide which drivers the
image runs on; an override is checked against both, so a choice the image would refuse fails here, before any
AWS call.
"""

from __future__ import annotations

from maskrcnn.device import (
    FORWARD_COMPAT_BRANCHES,
    INFERENCE_AMI,
    INFERENCE_AMI_DRIVERS,
    MIN_DRIVER,
    TRANSFORM_AMI,
    TRANSFORM_AMI_DRIVERS,
    torch_build,
)

# NVIDIA families whose GPUs the image's torch has no kernels for (the cu130 wheel starts at sm_75).
NO_KERNELS = {"p2": "K80, sm_37", "p3": "V100, sm_70", "g3": "M60, sm_52"}
NOT_NVIDIA = ("g4ad",)  # AMD Radeon Pro V520


class AmiError(ValueError):
    """An instance type or AMI version the image cannot run on; the message says what to choose."""


def family(instance_type: str) -> str:
    """ "g4dn" for "ml.g4dn.xlarge", "p6-b200" for "ml.p6-b200.48xlarge"."""
    parts = instance_type.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "ml" else ""


def is_nvidia_gpu(instance_type: str) -> bool:
    """ml.g* and ml.p* instances carry NVIDIA GPUs (but ml.g4ad: AMD); ml.inf*/ml.trn* are Neuron, the rest CPU."""
    name = family(instance_type)
    return name[:1] in ("g", "p") and name not in NOT_NVIDIA


def _check_gpu(instance_type: str) -> None:
    for prefix, gpu in NO_KERNELS.items():
        if family(instance_type).startswith(prefix):
            raise AmiError(
                f"{instance_type}: the image's torch has no kernels for its GPU ({gpu}); choose ml.g4dn (T4) or newer"
            )


def reachable(driver_branch: int) -> bool:
    """True when the image's CUDA runs on that driver branch (natively or with forward compatibility). The image's
    torch is the one installed here (the project pins one torch for its tests and its image)."""
    cuda, _ = torch_build()
    major = (cuda or "").split(".")[0]
    if major not in MIN_DRIVER:
        return True  # no CUDA build to judge by: the image's own check decides at start
    return driver_branch >= MIN_DRIVER[major] or driver_branch in FORWARD_COMPAT_BRANCHES.get(major, ())


def _choose(instance_type: str, override: str | None, table: dict[str, int], default: str, field: str) -> str | None:
    if not is_nvidia_gpu(instance_type):
        if override is not None:
            raise AmiError(f"{field} {override!r} is for NVIDIA GPU instances; {instance_type} has none")
        return None
    _check_gpu(instance_type)
    chosen = default if override is None else override
    if chosen not in table:
        raise AmiError(f"{field} {chosen!r} is none of the NVIDIA GPU AMIs: {', '.join(table)}")
    if not reachable(table[chosen]):
        usable = ", ".join(name for name, driver in table.items() if reachable(driver))
        raise AmiError(
            f"{field} {chosen!r} runs driver R{table[chosen]}, which the image's CUDA does not reach "
            f"(docs/image.md, 'GPU drivers'); choose {usable}"
        )
    return chosen


def inference_ami(instance_type: str, override: str | None = None) -> str | None:
    """ProductionVariant.InferenceAmiVersion for an endpoint on ``instance_type``; None for a CPU instance."""
    return _choose(instance_type, override, INFERENCE_AMI_DRIVERS, INFERENCE_AMI, "InferenceAmiVersion")


def transform_ami(instance_type: str, override: str | None = None) -> str | None:
    """TransformResources.TransformAmiVersion for a batch transform on ``instance_type``; None for a CPU instance."""
    return _choose(instance_type, override, TRANSFORM_AMI_DRIVERS, TRANSFORM_AMI, "TransformAmiVersion")


def check_training_instance(instance_type: str) -> None:
    """Training hosts' drivers cannot be chosen (nor are they documented): only the GPU itself is checked here."""
    if is_nvidia_gpu(instance_type):
        _check_gpu(instance_type)
