#!/usr/bin/env bash
# Install a Docker engine from Debian's archive and make sure it is running.
#
# Idempotent: packages already present are not reinstalled and a running dockerd is left alone.
# Installs docker.io (engine + CLI), debootstrap (scripts/build-base-image.sh) and docker-compose v1
# (the SageMaker SDK's local mode falls back to `docker-compose`). Needs root and the Debian archive;
# no image registry is needed. Used by .ci/run.
#
#   scripts/install-docker.sh            # install if missing, start dockerd, wait until `docker info` answers
#   DOCKERD_LOG=/tmp/dockerd.log scripts/install-docker.sh
set -euo pipefail

PACKAGES=(docker.io debootstrap docker-compose)
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
WAIT_SECONDS=${WAIT_SECONDS:-60}

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "install-docker: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's engine is 20.10: talk to it with Debian's CLI. A newer CLI elsewhere on PATH (for instance a
# static 28.x in /usr/local/bin) wants the buildx plugin for BuildKit builds, which Debian does not ship.
DOCKER=/usr/bin/docker

if ! $SUDO "$DOCKER" info >/dev/null 2>&1; then
    # No systemd in containers/CI VMs: start the daemon directly. containerd is started by dockerd.
    echo "install-docker: starting dockerd (log: $DOCKERD_LOG)"
    $SUDO bash -c "nohup dockerd >'$DOCKERD_LOG' 2>&1 &"
    for ((i = 0; i < WAIT_SECONDS; i++)); do
        if $SUDO "$DOCKER" info >/dev/null 2>&1; then break; fi
        sleep 1
    done
fi

if ! $SUDO "$DOCKER" info >/dev/null 2>&1; then
    echo "install-docker: dockerd did not become ready within ${WAIT_SECONDS}s; last log lines:" >&2
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    exit 1
fi
echo "install-docker: ready ($($DOCKER version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}'))"
