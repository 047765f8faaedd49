#!/bin/sh
# Make sure the image has CUDA's forward-compatibility libraries (docs/image.md, "GPU drivers").
#
# torch's CUDA 13 needs driver R580; SageMaker's hosts run R535 (p5, g6, batch transform's newest AMI) and older.
# NVIDIA's cuda-compat-<major>-<minor> package is a newer user-mode driver (libcuda) in /usr/local/cuda/compat that
# lets CUDA 13 run on R535/R570 data-centre GPUs; maskrcnn.device loads it at start only where the host's driver is
# older. The nvidia/cuda bases ship it; on a base that carries NVIDIA's CUDA apt repository but not the package,
# it is installed here; on any other base (the offline Debian one) there is none to install, which is said, and
# such an image refuses R535/R570 hosts at start, naming why.
#
#   install-cuda-compat.sh cuda-compat-13-0
set -eu

package=$1
compat=/usr/local/cuda/compat

if [ -e "$compat/libcuda.so.1" ]; then
    echo "install-cuda-compat: the base ships $(readlink "$compat/libcuda.so.1" || echo libcuda.so.1) in $compat"
    exit 0
fi
if ! grep -rqs "developer.download.nvidia.com/compute/cuda" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install-cuda-compat: this base has no CUDA apt repository, so no $package: the image has no" \
        "forward-compatibility libraries and runs only on hosts with driver R580 or newer"
    exit 0
fi
apt-get update
apt-get install -y --no-install-recommends "$package"
rm -rf /var/lib/apt/lists/*
echo "install-cuda-compat: installed $package: $(readlink "$compat/libcuda.so.1" || echo "no $compat/libcuda.so.1")"
