"""What test modules of every area share: the repository root and a free TCP port.

``from support import REPO, free_port``: tests/ is on ``sys.path`` (pytest puts the root conftest's folder
there), as for ``tiny``. ``free_port`` is the harness's own (``local.runtime``), so tests and the harness pick
ports one way.
"""

from __future__ import annotations

from pathlib import Path

from local.runtime import free_port

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "free_port"]
