#!/usr/bin/env bash
# Runs every measurement recorded in BENCHMARKS.md, one after another, and
# keeps the output in bench/results/. Run it on an otherwise idle machine.
#   MNIST=DIR   directory with the MNIST IDX files (default: ../shared/data/mnist-10k)
#   SKIP_CNN=1  skip the 20-round CNN run (the slowest part)
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/data/mnist-10k}
out=bench/results
mkdir -p "$out"
cargo build --release -p fedquic-sim --quiet
cargo build --release -p fedquic-train --example bench_train --quiet
cargo build --release -p fedquic-aggregator -p fedquic-client --quiet
sim=target/release/fedquic-sim
timed() { /usr/bin/time -f "%e s wall, %M KB max RSS" "$@"; }

{
  echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(date -u +%FT%TZ)"
  for kp in "10 1000000" "50 1000000" "10 10000000" "100 100000"; do
    set -- $kp
    echo "== fedquic-sim bench-overhead --clients $1 --params $2 --rounds 5"
    "$sim" bench-overhead --clients "$1" --params "$2" --rounds 5
  done
} 2>&1 | tee "$out/overhead.txt"

for n in 1000 10000; do
  echo "== fedquic-sim bench-connections --clients $n"
  "$sim" bench-connections --clients "$n"
done 2>&1 | tee "$out/connections.txt"

echo "== bench/flood.sh (10,000 QUIC Initials against an aggregator running a federation)" | tee "$out/flood.txt"
bench/flood.sh target/release/fedquic-aggregator target/release/fedquic-client "$sim" 10000 2>&1 | tee -a "$out/flood.txt"

for p in iid shards:2; do
  echo "== fedquic-sim --data mnist:$MNIST --model mlp:784-200-200-10 --clients 100 --fraction 0.1 --rounds 50 --epochs 1 --batch-size 10 --lr 0.05 --partition $p --quiet"
  timed "$sim" --data "mnist:$MNIST" --model mlp:784-200-200-10 --clients 100 --fraction 0.1 --rounds 50 \
    --epochs 1 --batch-size 10 --lr 0.05 --partition "$p" --quiet
done 2>&1 | tee "$out/mnist.txt"

if [ "${SKIP_CNN:-0}" != 1 ]; then
  echo "== fedquic-sim --data mnist:$MNIST --model cnn:mnist --clients 100 --fraction 0.1 --rounds 20 --epochs 5 --batch-size 10 --partition iid --quiet" 
  timed "$sim" --data "mnist:$MNIST" --model cnn:mnist --clients 100 --fraction 0.1 --rounds 20 --epochs 5 \
    --batch-size 10 --partition iid --quiet 2>&1 | tee "$out/cnn.txt"
fi

cargo run --release -p fedquic-train --example bench_train --quiet -- --threads 1,2 2>&1 | tee "$out/train.txt"
if [ -x bench/.venv/bin/python ]; then
  bench/.venv/bin/python bench/pytorch_reference.py --threads 1,2 --json "$out/pytorch.json" 2>&1 | tee "$out/pytorch.txt"
else
  echo "PyTorch reference skipped: see bench/pytorch_reference.py for the one-line setup" | tee "$out/pytorch.txt"
fi
