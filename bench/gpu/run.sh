#!/usr/bin/env bash
# Issue 9's measurement on a GPU machine, prepared by bench/gpu/prepare.sh. Writes
# its logs to $OUT (the device tool's output folder; ./gpu-out elsewhere):
# - env.txt: host, GPU, driver, Vulkan loader and ICD files;
# - probe.txt: the adapter wgpu finds (with NVIDIA's ICD path as a fallback);
# - bench_wgpu.txt: bench_train --backend wgpu, 2NN and CNN, batch 10/64/256;
# - bench_cpu.txt: the CPU backend on one core of the same host (the targets'
#   reference: CNN batch 64 at 20x, 2NN batch 256 at 10x);
# - torch_cuda.txt: PyTorch CUDA beside it, when torch is importable;
# - sim_wgpu.txt / sim_cpu.txt: the federated CNN run on the MNIST subset.
# Every step has its own timeout; on an H200 the whole run took about 90 seconds.
set -u
source "$(dirname "$0")/env.sh"
export RUST_LOG=info
{
    date -u; uname -a; nproc; grep -m1 "model name" /proc/cpuinfo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    ldconfig -p | grep -i -e vulkan -e GLdispatch
    ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/nvidia/share/vulkan/icd.d
} > "$OUT/env.txt" 2>&1
B=.gpu/bench_train
find_adapter "$OUT/probe.txt"
tail -n 20 "$OUT/probe.txt"
echo "== wgpu bench"
timeout 150 "$B" --backend wgpu --batches 10,64,256 --eval-batches 10,64,256 --seconds 1.5 2>&1 | tee "$OUT/bench_wgpu.txt"
echo "== cpu bench, one core"
timeout 60 taskset -c 0 "$B" --backend cpu --batches 10,64,256 --eval-batches 10,64,256 --seconds 0.6 2>&1 | tee "$OUT/bench_cpu.txt"
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "== torch cuda"
    timeout 90 python3 bench/gpu/torch_cuda.py 2>&1 | tee "$OUT/torch_cuda.txt"
else
    echo "no PyTorch with CUDA here" | tee "$OUT/torch_cuda.txt"
fi
if [ -d .gpu/mnist-10k ]; then
    SIM=(--data mnist:.gpu/mnist-10k --model cnn:mnist --clients 100 --fraction 0.1 --rounds 10
         --epochs 5 --batch-size 10 --partition iid --quiet --threads 10)
    echo "== sim wgpu"
    ( time timeout 120 .gpu/fedquic-sim "${SIM[@]}" --backend wgpu ) > "$OUT/sim_wgpu.txt" 2>&1
    grep -v "^  " "$OUT/sim_wgpu.txt" | tail -n 8
    echo "== sim cpu"
    ( time timeout 90 .gpu/fedquic-sim "${SIM[@]}" --backend cpu ) > "$OUT/sim_cpu.txt" 2>&1
    grep -v "^  " "$OUT/sim_cpu.txt" | tail -n 8
fi
