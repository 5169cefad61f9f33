# Sourced by the bench/gpu scripts on a GPU machine: moves to the repository root, sets
# OUT (the device tool's output folder; ./gpu-out elsewhere), unpacks the Vulkan loader
# and glvnd from .gl/ where the host lacks them (NVIDIA's ICD needs glvnd's
# libGLdispatch; see BENCHMARKS.md), and gives Mesa a private runtime directory.
# `find_adapter FILE` then checks that wgpu opens an adapter with .gpu/bench_train,
# retrying with NVIDIA's ICD named explicitly (exported as VK_DRIVER_FILES), and logs
# what it tried to FILE.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ! ldconfig -p | grep -q libvulkan.so.1 || ! ldconfig -p | grep -q libGLdispatch.so.0; then
    for deb in .gl/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" /; done
    ldconfig 2>/dev/null
fi
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg-run}
mkdir -p -m 700 "$XDG_RUNTIME_DIR"

find_adapter() {
    local log=$1
    local probe=(timeout 60 .gpu/bench_train --backend wgpu --models mlp:784-10-10 --batches 10
                 --eval-batches 10 --seconds 0.05)
    VK_LOADER_DEBUG=error,warn "${probe[@]}" > "$log" 2>&1 && return 0
    for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json \
               /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
        [ -e "$icd" ] || continue
        echo "retry with VK_DRIVER_FILES=$icd" >> "$log"
        export VK_DRIVER_FILES=$icd
        VK_LOADER_DEBUG=error,warn "${probe[@]}" >> "$log" 2>&1 && return 0
    done
    return 1
}
