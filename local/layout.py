"""The job tree SageMaker writes before it starts ``train``, and ``--hp KEY=VALUE`` parsing.

``python -m local train --output OUT`` lays out::

    OUT/
      job.json           what ran: name, mode, hosts, hyperparameters, exit code, failure, metrics
      model.tar.gz       algo-1's model/ packed as SageMaker packs it (only on success)
      output.tar.gz      algo-1's output/data/ (SageMaker's output.tar.gz)
      algo-1/            one /opt/ml tree per host: SAGEMAKER_BASE_DIR, or mounted at /opt/ml
        input/config/hyperparameters.json   every value a string
        input/config/inputdataconfig.json   one entry per channel, File mode
        input/config/resourceconfig.json    current_host and hosts algo-1..N
        input/data/<channel>/               the channel's files (hard links, see below)
        model/  output/  checkpoints/
      algo-2/ ...

With ``--distribution sharded`` (S3DistributionType ShardedByS3Key) each host's ``training`` channel holds
its own disjoint part of ``--data``: every N-th image (sorted by file name), with a COCO annotation file
listing just those, or PennFudan's image/mask pairs. SageMaker deals whole S3 objects to hosts; a COCO
annotation file is one object, so a dataset meant for sharding on SageMaker carries one annotation file per
shard. The harness gives each host what such a dataset gives it: a self-contained part.

Channels are hard links to the files of ``--data`` (a copy where the data lies on another file
system). Not symlinks: the tree is mounted into a container in docker mode, where a link to a host
path would dangle, and the training code should see plain files as File mode gives it. Not copies
by default: linking costs neither time nor disk (the inner loop has a 1 s overhead budget). SageMaker
treats input as read-only; a training script that writes into ``input/data`` would change the
source files here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from maskrcnn import dataset_layout
from maskrcnn.contract import SageMakerPaths
from maskrcnn.dataset_layout import REPLICATED, SHARDED
from maskrcnn.errors import DataError

from local.errors import HarnessError
from pipeline import execution

JOB_FILE = "job.json"
LOG_FILE = "train.log"  # every host's raw job log, as CloudWatch would hold it
MODEL_ARCHIVE = "model.tar.gz"
OUTPUT_ARCHIVE = "output.tar.gz"
DISTRIBUTIONS = {"replicated": REPLICATED, "sharded": SHARDED}  # --distribution -> SageMaker's S3DistributionType


def parse_pairs(pairs: Iterable[str], what: str = "--hp") -> dict[str, str]:
    """``["epochs=2", "lr=0.01"]`` -> ``{"epochs": "2", "lr": "0.01"}``, as ``pipeline start -p`` parses them.

    Values stay strings, as SageMaker delivers them; the job itself decodes and validates them, so an
    unknown key fails the way it would on SageMaker (output/failure, non-zero exit). A malformed pair is
    the harness's HarnessError (exit 2).
    """
    try:
        return execution.parse_pairs(pairs, what)
    except execution.InputError as error:
        raise HarnessError(str(error)) from None


def host_names(count: int) -> list[str]:
    if count < 1:
        raise HarnessError(f"--instance-count must be >= 1, got {count}")
    return [f"algo-{i}" for i in range(1, count + 1)]


def default_job_name(prefix: str = "maskrcnn") -> str:
    """SageMaker-style ``prefix-YYYY-MM-DD-HH-MM-SS-mmm``."""
    now = datetime.now(UTC)
    return f"{prefix}-{now:%Y-%m-%d-%H-%M-%S}-{now.microsecond // 1000:03d}"


@dataclass(frozen=True)
class JobSpec:
    """A training job as CreateTrainingJob describes it, minus what has no meaning on one machine."""

    name: str
    channels: Mapping[str, Path]  # channel name -> local folder
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    instance_count: int = 1
    environment: Mapping[str, str] = field(default_factory=dict)  # the job's Environment map
    distribution: str = "replicated"  # the training channel's: replicated (FullyReplicated) or sharded

    @property
    def hosts(self) -> list[str]:
        return host_names(self.instance_count)

    def check(self) -> None:
        if "training" not in self.channels:
            raise HarnessError("a training channel is required (--data DIR)")
        for name, folder in self.channels.items():
            if not Path(folder).is_dir():
                raise HarnessError(f"channel {name!r}: {folder} is not a folder")
        too_long = [k for k, v in self.hyperparameters.items() if len(v) > 2500]
        if len(self.hyperparameters) > 100 or too_long:
            raise HarnessError("SageMaker allows at most 100 hyperparameters of at most 2500 characters each")
        host_names(self.instance_count)
        if self.distribution not in DISTRIBUTIONS:
            raise HarnessError(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")


def inputdataconfig(channels: Iterable[str], sharded: str | None = None) -> dict[str, dict[str, str]]:
    """One File-mode entry per channel; ``sharded`` names the channel distributed ShardedByS3Key."""
    return {
        name: {
            "TrainingInputMode": "File",
            "S3DistributionType": DISTRIBUTIONS["sharded" if name == sharded else "replicated"],
            "RecordWrapperType": "None",
        }
        for name in sorted(channels)
    }


def resourceconfig(hosts: list[str], current: str) -> dict[str, object]:
    return {
        "current_host": current,
        "current_instance_type": "local",
        "current_group_name": "homogeneousCluster",
        "hosts": hosts,
        "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "local", "hosts": hosts}],
        "network_interface_name": "eth0",
    }


def prepare_output(output: Path, overwrite: bool) -> None:
    """Make ``output`` an empty folder. Old checkpoints would make the job resume, so a used folder
    is refused unless ``overwrite``, and even then only a folder that holds a previous job is cleared."""
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise HarnessError(f"{output} is not empty; choose a new --output or pass --overwrite")
        if not ((output / JOB_FILE).exists() or (output / "algo-1").is_dir()):
            raise HarnessError(f"{output} does not hold a previous job; refusing to clear it")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def link_tree(src: Path, dest: Path) -> None:
    """Mirror ``src`` into ``dest`` with hard links, copying where linking is impossible."""
    shutil.copytree(src, dest, copy_function=lambda s, d: _link_file(Path(s), Path(d)), symlinks=False)


def shard_tree(src: Path, dest: Path, shard: int, count: int) -> int:
    """Hard-link host ``shard``'s part of dataset ``src`` (every ``count``-th image) into ``dest``.

    Returns the number of images in the part. The files are found by the rules the job reads them by
    (:mod:`maskrcnn.dataset_layout`). COCO: a filtered copy of the annotation file beside the images it
    lists; PennFudan: the part's ``PNGImages``/``PedMasks`` pairs.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:  # the job's own rules (maskrcnn.dataset_layout): a folder it would refuse is refused here
        if dataset_layout.detect_format(src) == "pennfudan":
            images = dataset_layout.pennfudan_images(src)[shard::count]
            for image in images:
                mask = dataset_layout.pennfudan_mask(src, image)
                for path in (image, mask) if mask.is_file() else (image,):  # a missing mask is the job's to report
                    _link_file(path, dest / path.relative_to(src))
            return len(images)
        annotations_file = dataset_layout.annotation_file(src)
    except DataError as exc:
        raise HarnessError(f"--distribution sharded: {exc}") from None
    try:
        coco = json.loads(annotations_file.read_text())
        entries = sorted(coco["images"], key=lambda im: im["file_name"])[shard::count]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HarnessError(f"--distribution sharded: cannot read {annotations_file}: {exc}") from None
    ids = {im["id"] for im in entries}
    annotations = [a for a in coco.get("annotations", []) if a.get("image_id") in ids]
    part = {**coco, "images": entries, "annotations": annotations}
    (dest / annotations_file.name).write_text(json.dumps(part))
    for im in entries:
        found = dataset_layout.find_image(src, im["file_name"])
        if found is not None:  # a missing file is the job's to report, as it would be on SageMaker
            _link_file(found, dest / found.relative_to(src))
    return len(entries)


def _link_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dest)


def write_host_tree(base: Path, spec: JobSpec, current_host: str) -> SageMakerPaths:
    """One host's /opt/ml tree: config files, channel data, empty model/ output/ checkpoints/."""
    paths = SageMakerPaths(base)
    sharded = "training" if spec.distribution == "sharded" else None
    paths.input_config.mkdir(parents=True, exist_ok=True)
    paths.hyperparameters_file.write_text(json.dumps(dict(spec.hyperparameters), indent=1))
    paths.inputdataconfig_file.write_text(json.dumps(inputdataconfig(spec.channels, sharded), indent=1))
    paths.resourceconfig_file.write_text(json.dumps(resourceconfig(spec.hosts, current_host), indent=1))
    for name, folder in spec.channels.items():
        if name == sharded:
            shard_tree(Path(folder), paths.channel(name), spec.hosts.index(current_host), len(spec.hosts))
        else:
            link_tree(Path(folder), paths.channel(name))
    for folder in (paths.model_dir, paths.output_data_dir, paths.checkpoints_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return paths


def write_job(output: Path, spec: JobSpec, overwrite: bool = False) -> dict[str, SageMakerPaths]:
    """Lay out every host's tree under ``output``; returns host name -> its paths."""
    spec.check()
    prepare_output(output, overwrite)
    return {host: write_host_tree(output / host, spec, host) for host in spec.hosts}
