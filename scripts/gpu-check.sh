#!/usr/bin/env bash
# The one script a lent GPU machine runs (docs/benchmarks.md, "GPU checks"), from the repository root, in
# well under 8 minutes on one H100 (each phase has its own limit, so one hang does not eat the rest):
#
#   1. info   (30 s)  torch, CUDA, cuDNN, driver, devices, bfloat16, packages missing
#   2. tests (170 s)  the gpu layer: pytest -m gpu -rs over every test module that has gpu tests, no -x
#   3. train (120 s)  resnet50_fpn, 60 steps, AMP then float32, on one GPU: images/s per GPU, data wait,
#                     the evaluation's time (bench/gpu_check.py train)
#   4. serve (120 s)  the real serve stack (nginx where installed, else gunicorn on the port; it says which):
#                     p50/p99 of 20 requests, req/s, GPU memory per worker (bench/gpu_check.py serve)
#
# Everything printed also goes to $OUT/gpu-check.log when OUT is set, with the tests' JUnit XML, each training
# job's log, the server's log and summary.json beside it. Exit 0 when every phase passed, 1 otherwise; with no
# CUDA device it says so, skips every phase and exits 0 (GPU_CHECK_ALLOW_CPU=1 runs the phases shrunk on the
# CPU instead: a dry run that catches the script's own bugs before GPU minutes are spent; figures meaningless).
#
#   bash scripts/gpu-check.sh                     # .venv/bin/python where it exists, else python3 (a lent machine's,
#                                                 # with the carried wheels on PYTHONPATH); PYTHON=... picks another
#   GPU_CHECK_ALLOW_CPU=1 OUT=/tmp/gc bash scripts/gpu-check.sh   # the dry run on a CPU machine
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then # the venv of `make setup` where there is one (not carried to a lent machine)
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD/images/maskrcnn/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
TEE_PID=
finish() { # the scratch folder goes; the log's tee gets its last lines before the machine is handed back
  rm -rf "$WORK"
  if [[ -n "$TEE_PID" ]]; then
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null || true
  fi
}
trap finish EXIT
LOG_DIR=${OUT:-}
if [[ -n "$LOG_DIR" ]]; then
  mkdir -p "$LOG_DIR"
  exec > >(tee -a "$LOG_DIR/gpu-check.log") 2>&1
  TEE_PID=$!
fi
echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "gpu-check: $PYTHON cannot import torch."
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    echo "gpu-check: but this machine has a GPU: point PYTHON at a Python with torch. Nothing was checked."
    exit 1
  fi
  echo "gpu-check: no GPU here either: every phase skipped."
  exit 0
fi
QUICK=()
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  smi="not installed"
  if command -v nvidia-smi >/dev/null; then
    smi=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -3)
  fi
  echo "gpu-check: no CUDA device visible to torch ($("$PYTHON" -c 'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)')); nvidia-smi: ${smi}."
  if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
    echo "gpu-check: every phase skipped (GPU_CHECK_ALLOW_CPU=1 dry-runs them on the CPU). On a lent GPU machine this"
    echo "means the driver and torch's CUDA do not match (docs/image.md, 'GPU drivers')."
    exit 0
  fi
  echo "gpu-check: GPU_CHECK_ALLOW_CPU=1: a dry run of every phase on the CPU, shrunk; its figures mean nothing."
  QUICK=(--quick)
fi

SUMMARY=()
FAILED=0
phase() { # phase NAME LIMIT_SECONDS COMMAND...: run it under its own limit, record status and time
  local name=$1 limit=$2 rc status start=$SECONDS
  shift 2
  echo
  echo "=== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status="TIMED OUT after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [[ $rc == 0 ]] || FAILED=$((FAILED + 1))
  SUMMARY+=("$(printf '%-6s %-26s %4d s' "$name" "$status" $((SECONDS - start)))")
}
LOG_ARGS=(--work "$WORK" ${LOG_DIR:+--log-dir "$LOG_DIR"})

phase info 30 "$PYTHON" bench/gpu_check.py info "${LOG_ARGS[@]}"

# Every module with gpu tests (tests/image's need Docker and skip without it); a module this machine cannot
# import (a dev-only package) is reported and the others still run.
# With pytest-timeout there (the lent machine has it), one hung test costs 90 s, not the phase.
mapfile -t GPU_MODULES < <(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort)
PER_TEST=()
if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then PER_TEST=(--timeout 90); fi
phase tests 170 "$PYTHON" -m pytest -m gpu -rs -q -p no:cacheprovider --continue-on-collection-errors \
  "${PER_TEST[@]}" ${LOG_DIR:+--junitxml="$LOG_DIR/gpu-tests.xml"} "${GPU_MODULES[@]}"

phase train 120 "$PYTHON" bench/gpu_check.py train "${LOG_ARGS[@]}" "${QUICK[@]}"
phase serve 120 "$PYTHON" bench/gpu_check.py serve "${LOG_ARGS[@]}" "${QUICK[@]}"

echo
echo "=== summary ($SECONDS s in all)"
printf '%s\n' "${SUMMARY[@]}"
[[ $FAILED == 0 ]]
