#!/usr/bin/env bash
# The "Privacy" evidence of BENCHMARKS.md.
#
# 1. Cost of secure aggregation (bench-overhead, fixed-delta clients, mutual TLS):
#    K=100, P=100k and K=10, P=1M, with and without --secagg; then secure
#    aggregation at K = 10, 50, 100, 500 (P=100k) to see how it grows with K.
# 2. Privacy-utility curve: the MNIST subset, 2NN, 100 clients, C = 0.1, E = 1,
#    B = 10, lr 0.05, 50 rounds; central DP at several noise multipliers (clip
#    norm 1, fixed-size sampling), distributed DP under secure aggregation at
#    one of them, and the no-DP baseline. bench/privacy_report.py tabulates.
#
#   MNIST=DIR   MNIST IDX files (default ../shared/data/mnist-10k)
#   OUT=DIR     results (default bench/results/privacy); finished runs are skipped
#   ONLY="cost utility scale"   (scale: DP-FedAvg over a 100,000-client check-in
#                                population, 1,000 a round; about 4 minutes a run)
#   SEEDS="0"   seeds of the utility runs
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/data/mnist-10k}
OUT=${OUT:-bench/results/privacy}
ONLY=${ONLY:-"cost utility scale"}
SEEDS=${SEEDS:-"0"}
mkdir -p "$OUT"
cargo build --release -p fedquic-sim --bins --quiet
sim=target/release/fedquic-sim
echo "$(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'),$(date -u +%FT%TZ)" > "$OUT/machine.txt"

if [[ " $ONLY " == *" cost "* ]]; then
  cost() {
    local name=$1
    shift
    local file="$OUT/cost/$name.txt"
    if [ -s "$file" ]; then return 0; fi
    mkdir -p "$OUT/cost"
    echo "== $name: $sim bench-overhead $*"
    echo "$sim bench-overhead $*" > "$file.tmp"
    "$sim" bench-overhead "$@" >> "$file.tmp" 2>&1 && mv "$file.tmp" "$file"
    tail -n 4 "$file"
  }
  for run in 1 2 3; do
    cost "K100_P100k_plain_$run" --clients 100 --params 100000 --rounds 5
    cost "K100_P100k_secagg_$run" --clients 100 --params 100000 --rounds 5 --secagg
    cost "K10_P1M_plain_$run" --clients 10 --params 1000000 --rounds 5
    cost "K10_P1M_secagg_$run" --clients 10 --params 1000000 --rounds 5 --secagg
  done
  for k in 10 50 500; do
    cost "K${k}_P100k_plain_1" --clients "$k" --params 100000 --rounds 5
    cost "K${k}_P100k_secagg_1" --clients "$k" --params 100000 --rounds 5 --secagg
  done
fi

if [[ " $ONLY " == *" utility "* ]]; then
  mlp=(--data "mnist:$MNIST" --model mlp:784-200-200-10 --clients 100 --fraction 0.1
       --rounds 50 --epochs 1 --batch-size 10 --lr 0.05 --threads 2)
  utility() {
    local label=$1 seed=$2
    shift 2
    local dir="$OUT/utility/$label/seed$seed"
    if [ -s "$dir/rounds.csv" ]; then return 0; fi
    mkdir -p "$dir"
    printf '%s\n' "$sim ${mlp[*]} $* --seed $seed --out $dir" > "$dir/command.txt"
    echo "== utility $label seed $seed"
    if "$sim" "${mlp[@]}" "$@" --seed "$seed" --out "$dir" --quiet > "$dir/stdout.txt" 2> "$dir/stderr.txt"; then
      tail -n 1 "$dir/stdout.txt"
    else
      echo "   FAILED (see $dir/stderr.txt)"; tail -n 3 "$dir/stderr.txt"; rm -f "$dir/rounds.csv"
    fi
  }
  for seed in $SEEDS; do
    utility nodp "$seed"
    utility clip1 "$seed" --dp central --dp-clip 1 --dp-noise 1e-6
    for z in 0.01 0.03 0.1 0.3 1; do
      utility "central_z$z" "$seed" --dp central --dp-clip 1 --dp-noise "$z"
    done
    utility secagg "$seed" --secagg --secagg-clip 10
    utility distributed_z0.1 "$seed" --secagg --dp distributed --dp-clip 1 --dp-noise 0.1
  done
fi

if [[ " $ONLY " == *" scale "* ]]; then
  # Population-scale DP: 100,000 clients with synthetic digits of their own,
  # 1,000 a round (q = 0.01), E = 5, FedAvgM (momentum 0.9), 30 rounds.
  scale=(--clients 100000 --fraction 0.01 --rounds 30 --model mlp:784-64-10
         --data synthetic-per-client:20 --epochs 5 --strategy fedavgm --server-momentum 0.9
         --server-lr 1 --transport mem --seed 0 --quiet)
  for run in "nodp" "clip1 --dp central --dp-clip 1 --dp-noise 1e-6" "z1 --dp central --dp-clip 1 --dp-noise 1"; do
    set -- $run
    name=$1
    shift
    dir="$OUT/scale/$name"
    if [ -s "$dir/rounds.csv" ]; then continue; fi
    mkdir -p "$dir"
    printf '%s\n' "$sim ${scale[*]} $* --out $dir" > "$dir/command.txt"
    echo "== scale $name"
    "$sim" "${scale[@]}" "$@" --out "$dir" > "$dir/stdout.txt" 2>&1 && grep final "$dir/stdout.txt"
  done
fi
