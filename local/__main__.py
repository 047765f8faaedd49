"""``python -m local``: the local SageMaker harness. See docs/local.md; all logic is in local.cli."""

import sys

from local.cli import main

if __name__ == "__main__":
    sys.exit(main())
