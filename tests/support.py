"""What test modules of every area share: the repository root, a free TCP port, an /opt/ml job tree and the
image built from this checkout.

``from support import REPO, free_port, write_job_tree``: tests/ is on ``sys.path`` (pytest puts the root
conftest's folder there), as for ``tiny``. ``free_port`` is the harness's own (``local.runtime``), so tests and
the harness pick ports one way; ``write_job_tree`` is the harness's ``local.layout``, so a test's /opt/ml tree
is the one ``python -m local train`` and SageMaker lay out. ``build_image`` is what the image area's and the
harness's docker fixtures call.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from local.layout import JobSpec, write_host_tree
from local.runtime import DEFAULT_IMAGE, free_port

REPO = Path(__file__).resolve().parents[1]


def write_job_tree(
    base: Path,
    hyperparameters: Mapping[str, object],
    channels: Mapping[str, Path],
    *,
    host: str = "algo-1",
    hosts: int = 1,
    distribution: str = "replicated",
) -> Path:
    """Lay out host ``host``'s /opt/ml tree of an ``hosts``-host job under ``base`` and return ``base``.

    As ``local.layout.write_host_tree`` writes it: hyperparameters.json (every value a string, as SageMaker
    writes them), inputdataconfig.json, resourceconfig.json (hosts algo-1..N), each channel's files hard-linked
    under input/data/ (``distribution="sharded"`` deals this host its part of ``training``), and empty model/,
    output/data/ and checkpoints/.
    """
    spec = JobSpec(
        name=base.name,
        channels=dict(channels),
        hyperparameters={k: str(v) for k, v in hyperparameters.items()},
        instance_count=hosts,
        distribution=distribution,
    )
    write_host_tree(base, spec, host)
    return base


BASE_LABEL = "org.opencontainers.image.base.name"


def image_tag() -> str:
    """The tag the container tests build and run: ``IMAGE``, else ``make build``'s."""
    return os.environ.get("IMAGE", DEFAULT_IMAGE)


def image_base(tag: str) -> str | None:
    """The base ``tag`` was built from (its label), None when the tag does not exist."""
    inspect = ["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{BASE_LABEL}"}}}}', tag]
    found = subprocess.run(inspect, capture_output=True, text=True, check=False)
    label = found.stdout.strip() if found.returncode == 0 else ""
    return label if label and label != "<no value>" else None  # Go's template for a missing label


def build_image(tag: str) -> str | None:
    """Build ``tag`` from this checkout with scripts/build-image.sh (incremental: seconds when nothing changed),
    on ``BASE_IMAGE`` or else the base the tag was built from; the build's last output when it failed, else None.
    A stale image would test old code against new tests, so every session that runs containers builds first."""
    env = {**os.environ, "IMAGE": tag}
    base = os.environ.get("BASE_IMAGE") or image_base(tag)
    if base:
        env["BASE_IMAGE"] = base
    built = subprocess.run(
        [str(REPO / "scripts" / "build-image.sh")], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if built.returncode == 0:
        return None
    return (
        f"building {tag} (base {base or 'the Dockerfile default'}) failed, exit code {built.returncode}:\n"
        + (built.stdout + built.stderr)[-4000:]
    )


__all__ = ["REPO", "build_image", "free_port", "image_base", "image_tag", "write_job_tree"]
