#!/usr/bin/env bash
# Issue 10's side-by-side: bench_train on the kernel path the CPU picks and forced to
# avx2, and PyTorch on CPU likewise (its own pick, and forced to AVX2 through oneDNN's,
# MKL's and ATen's ISA switches: what a CPU without AVX-512 gives it), alternating for
# ROUNDS rounds (default 2), then the table of every round's samples/s and the ratios
# (bench/side_by_side.py): ours auto against PyTorch's pick, ours avx2 against PyTorch AVX2.
# On a CPU without AVX-512 both sides pick AVX2 themselves, so the forced runs are
# skipped. Needs PyTorch in bench/.venv (see bench/pytorch_reference.py). Outputs go to OUT
# (default /tmp/side_by_side).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-2}"
out="${OUT:-/tmp/side_by_side}"
mkdir -p "$out"
cargo build --release -q -p fedquic-train --example bench_train
bench=target/release/examples/bench_train
args=(--threads 1,2 --batches 10,64 --eval-batches 64,256)
auto=() avx2=() torch=() torch_avx2=()
torch_args=(--threads 1,2 --infer-batches 64,256 --min-time 1.0)
avx512=no
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then avx512=yes; fi
for round in $(seq "$rounds"); do
    echo "round $round: $(date -u +%H:%M:%S) UTC" >&2
    "$bench" "${args[@]}" > "$out/auto_$round.txt"
    bench/.venv/bin/python bench/pytorch_reference.py "${torch_args[@]}" \
        --json "$out/torch_$round.json" > "$out/torch_$round.txt" 2>&1
    auto+=("$out/auto_$round.txt") torch+=("$out/torch_$round.json")
    if [ "$avx512" = yes ]; then
        FEDQUIC_KERNEL=avx2 "$bench" "${args[@]}" > "$out/avx2_$round.txt"
        ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
            bench/.venv/bin/python bench/pytorch_reference.py "${torch_args[@]}" \
            --json "$out/torch_avx2_$round.json" > "$out/torch_avx2_$round.txt" 2>&1
        avx2+=("$out/avx2_$round.txt") torch_avx2+=("$out/torch_avx2_$round.json")
    fi
done
echo "done: $(date -u +%H:%M:%S) UTC" >&2
grep -h "kernel path\|FMA peak" "$out"/auto_1.txt "$out"/avx2_1.txt >&2 2>/dev/null || true
join() { local IFS=,; echo "$*"; }
table=(--ours "auto=$(join "${auto[@]}")" --torch "auto=$(join "${torch[@]}")")
if [ "$avx512" = yes ]; then
    table+=(--ours "avx2=$(join "${avx2[@]}")" --torch "avx2=$(join "${torch_avx2[@]}")")
fi
python3 bench/side_by_side.py "${table[@]}"
