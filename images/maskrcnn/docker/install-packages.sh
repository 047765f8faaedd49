#!/bin/sh
# apt-get install the given packages on the image's base: Debian 12 or Ubuntu 22.04.
#
# Python 3.11 is the interpreter every wheel in the image is built for. Debian 12 ships it (3.11.2) as its
# python3. Ubuntu 22.04's python3.11 (universe) is 3.11.0~rc1, which torch >= 2.5 cannot import
# (torch._dynamo needs sys.get_int_max_str_digits, added in 3.11.0 final), so on Ubuntu the deadsnakes
# PPA supplies python3.11 at the same path (/usr/bin/python3.11). The PPA's signing key is fetched by its
# fingerprint and checked against it when gpg is there (the nvidia/cuda images have it).
#
#   install-packages.sh python3.11 nginx tini ca-certificates
set -eu

DEADSNAKES_KEY=F23C5A6CF475977595C89F51BA6932366A755776
# shellcheck source=/dev/null
. /etc/os-release

apt-get update

if [ "$ID" = ubuntu ] && ! [ -f /etc/apt/sources.list.d/deadsnakes.list ] \
    && apt-cache policy python3.11 | grep -q 'Candidate:.*rc'; then
    echo "install-packages: Ubuntu $VERSION_ID's python3.11 is a release candidate; using the deadsnakes PPA"
    fetched=""
    if ! command -v curl >/dev/null; then
        apt-get install -y --no-install-recommends curl ca-certificates
        fetched=curl
    fi
    mkdir -p /etc/apt/keyrings
    curl -fsSL "https://keyserver.ubuntu.com/pks/lookup?op=get&options=mr&search=0x$DEADSNAKES_KEY" \
        -o /etc/apt/keyrings/deadsnakes.asc
    if command -v gpg >/dev/null; then
        gpg --show-keys --with-colons /etc/apt/keyrings/deadsnakes.asc | grep -q "^fpr:*$DEADSNAKES_KEY:" \
            || { echo "install-packages: the deadsnakes key does not have fingerprint $DEADSNAKES_KEY" >&2; exit 1; }
    fi
    echo "deb [signed-by=/etc/apt/keyrings/deadsnakes.asc] https://ppa.launchpadcontent.net/deadsnakes/ppa/ubuntu $VERSION_CODENAME main" \
        >/etc/apt/sources.list.d/deadsnakes.list
    if [ -n "$fetched" ]; then apt-get purge -y --auto-remove $fetched; fi
    apt-get update
fi

apt-get install -y --no-install-recommends "$@"
rm -rf /var/lib/apt/lists/*
