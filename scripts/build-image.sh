#!/usr/bin/env bash
# Build the Mask R-CNN SageMaker image (make build).
#
# 1. Fill build/wheelhouse with every pinned wheel (pip download on the host: from the local index this
#    is a disk copy; inside a build it would be GBs over the network). Skipped while the pins are unchanged.
# 2. DOCKER_BUILDKIT=1 docker build: the Dockerfile bind-mounts the wheelhouse (RUN --mount) and installs
#    with --no-index, so the build needs no PyPI; apt needs the base's archive (Debian or Ubuntu mirror).
#
#   scripts/build-image.sh                                   # CUDA base (needs Docker Hub + Ubuntu archive)
#   BASE_IMAGE=maskrcnn-base:bookworm scripts/build-image.sh # offline base from scripts/build-base-image.sh
#   IMAGE=maskrcnn-sagemaker:dev PRETRAINED_WEIGHTS=MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1 scripts/build-image.sh
#
# Variables: IMAGE (tag, default maskrcnn-sagemaker:latest), BASE_IMAGE (empty = the Dockerfile's CUDA
# default), PRETRAINED_WEIGHTS (empty = bake nothing), PYTHON (a Python 3.11 with pip for step 1, default
# .venv/bin/python), GIT_SHA (the revision label; default `git rev-parse`, which CodeBuild's S3 source
# cannot answer: the buildspec sets it), DOCKER (default /usr/bin/docker: Debian's 20.10 CLI has BuildKit built in; a newer
# CLI without the buildx plugin cannot do BuildKit builds), DOCKER_BUILD_ARGS (extra `docker build` flags).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-maskrcnn-sagemaker:latest}
BASE_IMAGE=${BASE_IMAGE:-}
PRETRAINED_WEIGHTS=${PRETRAINED_WEIGHTS:-}
PYTHON=${PYTHON:-.venv/bin/python}
DOCKER=${DOCKER:-/usr/bin/docker}
WHEELHOUSE=build/wheelhouse
REQUIREMENTS=(images/maskrcnn/requirements.txt images/maskrcnn/docker/build-requirements.txt)
requirement_args=()
for file in "${REQUIREMENTS[@]}"; do requirement_args+=(-r "$file"); done

[[ -x $DOCKER ]] || DOCKER=$(command -v docker)
[[ -x $PYTHON ]] || PYTHON=$(command -v python3.11 || command -v python3)
# The wheelhouse is resolved for the host's interpreter and platform, which must be the image's:
# CPython 3.11 on Linux x86_64 (manylinux wheels; both bases have glibc >= 2.35).
if ! "$PYTHON" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux")'; then
    echo "build-image: $PYTHON is not CPython 3.11 on Linux x86_64, which the wheelhouse must match" >&2
    exit 1
fi

# --- 1. wheelhouse ------------------------------------------------------------------------------------
stamp=$(cat constraints.txt "${REQUIREMENTS[@]}" | sha256sum | cut -c1-16)
if [[ $(cat "$WHEELHOUSE/.stamp" 2>/dev/null) != "$stamp" ]]; then
    echo "build-image: filling $WHEELHOUSE"
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    # Binary only: the image build has no compiler and no network.
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary :all: \
        -c constraints.txt "${requirement_args[@]}" --dest "$WHEELHOUSE"
    echo "$stamp" >"$WHEELHOUSE/.stamp"
fi

# torchvision's download cache, mounted into the weights stage: PRETRAINED_WEIGHTS finds its .pth here
# (build/torch-cache/hub/checkpoints/NAME.pth) without network. Must exist even when empty.
mkdir -p build/torch-cache/hub/checkpoints

# --- 2. image -------------------------------------------------------------------------------------------
args=(--network host -f images/maskrcnn/Dockerfile -t "$IMAGE"
      --build-arg "GIT_SHA=${GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
      --build-arg "PRETRAINED_WEIGHTS=$PRETRAINED_WEIGHTS")
if [[ -n $BASE_IMAGE ]]; then args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE"); fi
echo "build-image: building $IMAGE (base: ${BASE_IMAGE:-Dockerfile default})"
start=$SECONDS
# shellcheck disable=SC2086  # DOCKER_BUILD_ARGS is a list of flags on purpose
DOCKER_BUILDKIT=1 "$DOCKER" build "${args[@]}" ${DOCKER_BUILD_ARGS:-} .
echo "build-image: $IMAGE built in $((SECONDS - start)) s," \
    "$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"
