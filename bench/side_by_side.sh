#!/usr/bin/env bash
# Issue 10's side-by-side: bench_train on the kernel path the CPU picks and forced to
# avx2, and PyTorch on CPU, alternating for ROUNDS rounds (default 2), then the table of
# every round's samples/s and the ratios of the medians (bench/side_by_side.py).
# Needs PyTorch in bench/.venv (see bench/pytorch_reference.py). Outputs go to OUT
# (default /tmp/side_by_side).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-2}"
out="${OUT:-/tmp/side_by_side}"
mkdir -p "$out"
cargo build --release -q -p fedquic-train --example bench_train
bench=target/release/examples/bench_train
args=(--threads 1,2 --batches 10,64 --eval-batches 64,256)
auto=() avx2=() torch=()
for round in $(seq "$rounds"); do
    echo "round $round: $(date -u +%H:%M:%S) UTC" >&2
    "$bench" "${args[@]}" > "$out/auto_$round.txt"
    FEDQUIC_KERNEL=avx2 "$bench" "${args[@]}" > "$out/avx2_$round.txt"
    bench/.venv/bin/python bench/pytorch_reference.py --threads 1,2 --infer-batches 64,256 \
        --min-time 1.0 --json "$out/torch_$round.json" > "$out/torch_$round.txt" 2>&1
    auto+=("$out/auto_$round.txt") avx2+=("$out/avx2_$round.txt") torch+=("$out/torch_$round.json")
done
echo "done: $(date -u +%H:%M:%S) UTC" >&2
grep -h "kernel path\|FMA peak" "$out/auto_1.txt" "$out/avx2_1.txt" >&2 || true
join() { local IFS=,; echo "$*"; }
python3 bench/side_by_side.py --ours "auto=$(join "${auto[@]}")" --ours "avx2=$(join "${avx2[@]}")" \
    --torch "$(join "${torch[@]}")"
