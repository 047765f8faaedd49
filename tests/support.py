"""What test modules of every area share: the repository root, a free TCP port and an /opt/ml job tree.

``from support import REPO, free_port, write_job_tree``: tests/ is on ``sys.path`` (pytest puts the root
conftest's folder there), as for ``tiny``. ``free_port`` is the harness's own (``local.runtime``), so tests and
the harness pick ports one way; ``write_job_tree`` is the harness's ``local.layout``, so a test's /opt/ml tree
is the one ``python -m local train`` and SageMaker lay out.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from local.layout import JobSpec, write_host_tree
from local.runtime import free_port

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


__all__ = ["REPO", "free_port", "write_job_tree"]
