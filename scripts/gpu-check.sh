#!/usr/bin/env bash
# The GPU checks of issue 14 in one go, for a machine with NVIDIA GPUs lent for a few minutes
# (docs/benchmarks.md, "GPU checks"). Runs from the repository root with an environment that already
# has the project installed (the venv of `make setup`, or the image's /opt/venv); nothing is installed.
# -rs prints every skip with its reason: on one GPU the two-GPU tests (workers on their own devices, DDP
# over NCCL) say so; with no CUDA at all every test skips, which on a lent machine means the driver and
# the image's CUDA do not match (docs/image.md, "GPU drivers").
#
#   PYTHON=.venv/bin/python scripts/gpu-check.sh          # or: timeout 540 scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/images/maskrcnn/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices",
  [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
# The gpu layer of the training area: the image's own GPU test (tests/image) needs Docker's nvidia runtime.
exec "$PYTHON" -m pytest -m gpu -rs -q -x tests/train "$@"
