#!/usr/bin/env bash
# Prepares issue 9's GPU measurement on this (CPU) machine, so that the device run
# is one short call. Builds the release `bench_train` and `fedquic-sim`, strips them
# into .gpu/ with the MNIST subset, and downloads the Vulkan loader and glvnd
# packages into .gl/: a device machine may have NVIDIA's Vulkan ICD but no loader,
# and the ICD needs glvnd's libGLdispatch (see BENCHMARKS.md, "On an NVIDIA H200").
#
#   bash bench/gpu/prepare.sh [MNIST_DIR]     (default ../shared/data/mnist-10k)
#
# Then, with the device tool, carrying the two ignored folders:
#   run(command="bash bench/gpu/run.sh", carry=[".gpu", ".gl"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/../.."
MNIST=${1:-../shared/data/mnist-10k}
cargo build --release -p fedquic-train --example bench_train
cargo build --release -p fedquic-sim
mkdir -p .gpu .gl
cp target/release/examples/bench_train target/release/fedquic-sim .gpu/
strip .gpu/bench_train .gpu/fedquic-sim
if [ -d "$MNIST" ]; then
    rm -rf .gpu/mnist-10k
    cp -r "$MNIST" .gpu/mnist-10k
else
    echo "no MNIST subset at $MNIST: the federated run will be skipped" >&2
fi
(cd .gl && apt-get download libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libgles2 libopengl0)
du -sh .gpu .gl
