#!/usr/bin/env bash
# Build the offline base image: Debian 12 (bookworm) from Debian's archive, no image registry needed.
#
# debootstrap (minbase variant) into a temporary root, trust the host's CA bundle, `docker import` the tree.
# Python 3.11 is bookworm's python3, so the image Dockerfile installs the same packages on this base as on
# the CUDA base. The CUDA user-space comes from torch's nvidia-* wheels either way; the NVIDIA runtime
# supplies the driver. Run as root (debootstrap chroots). Idempotent: an existing tag is kept unless FORCE=1.
#
#   scripts/build-base-image.sh                          # -> maskrcnn-base:bookworm
#   BASE_TAG=maskrcnn-base:bookworm MIRROR=http://deb.debian.org/debian FORCE=1 scripts/build-base-image.sh
set -euo pipefail

BASE_TAG=${BASE_TAG:-maskrcnn-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKER=${DOCKER:-/usr/bin/docker}
FORCE=${FORCE:-0}

if [[ $FORCE != 1 ]] && "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    echo "build-base-image: $BASE_TAG exists (FORCE=1 rebuilds)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "build-base-image: debootstrap missing (scripts/install-docker.sh installs it)" >&2; exit 1; }

root=$(mktemp -d /tmp/maskrcnn-base.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT

echo "build-base-image: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 40 "$root.log" >&2; exit 1; }
rm -f "$root.log"

cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES

# Same apt hygiene as the official debian images: no caches, no translations, no recommends in layers.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/docker-no-recommends"

# Trust whatever the host trusts (a TLS-intercepting proxy's CA included), and keep it trusted when a later
# layer runs update-ca-certificates: it rebuilds the bundle from /usr/local/share/ca-certificates.
if [[ -s $HOST_CA_BUNDLE ]]; then
    install -m 0644 "$HOST_CA_BUNDLE" "$root/usr/local/share/ca-certificates/host-bundle.crt"
    chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
    install -m 0644 "$HOST_CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
fi

rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/log/*.log "$root"/tmp/* "$root"/root/.bash_history
: >"$root/etc/machine-id"
echo "build-base-image: importing as $BASE_TAG"
tar --numeric-owner -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    --change "LABEL org.opencontainers.image.title=maskrcnn-base org.opencontainers.image.description=debootstrap-$SUITE-minbase" \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" \
    - "$BASE_TAG" >/dev/null
"$DOCKER" image ls "$BASE_TAG"
