#!/usr/bin/env bash
# The "Asynchronous FedBuff" evidence of BENCHMARKS.md: synchronous FedAvg
# (with a round deadline) against FedBuff on the MNIST subset, 100 clients,
# the 2NN, heavy stragglers and a slow link; seeds 0 1 2. Both runs get the
# same number of client updates (sync: ROUNDS x 10; FedBuff: 2 x ROUNDS
# steps of 5). bench/fedbuff_report.py reports wall time to TARGET accuracy
# (simulated stragglers and link time included) and final accuracy.
#
#   MNIST=DIR      MNIST IDX files (default ../shared/data/mnist-10k)
#   OUT=DIR        results (default bench/results/fedbuff); finished runs are skipped
#   SEEDS="0 1 2"  seeds
#   ROUNDS=20      synchronous rounds
#   STRAGGLERS=0.5:lognormal:1,1   (half the tasks wait e^N(1,1) s: median 2.7 s, mean 4.5 s)
#   LINK=50:20     50 ms one way, 20 Mbit/s each way, per client
#   DEADLINE=8     synchronous round deadline (s)
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/data/mnist-10k}
OUT=${OUT:-bench/results/fedbuff}
SEEDS=${SEEDS:-"0 1 2"}
ROUNDS=${ROUNDS:-20}
STRAGGLERS=${STRAGGLERS:-0.5:lognormal:1,1}
LINK=${LINK:-50:20}
DEADLINE=${DEADLINE:-8}
mkdir -p "$OUT"
cargo build --release -p fedquic-sim --bins --quiet
sim=target/release/fedquic-sim
echo "$(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'),$(date -u +%FT%TZ)" > "$OUT/machine.txt"
base=(--data "mnist:$MNIST" --model mlp:784-200-200-10 --clients 100 --fraction 0.1
      --epochs 1 --batch-size 10 --lr 0.05 --threads 2 --partition iid
      --stragglers "$STRAGGLERS" --link "$LINK" --quiet)

run() {
  local mode=$1 seed=$2
  shift 2
  local dir="$OUT/$mode/seed$seed"
  if [ -s "$dir/rounds.csv" ]; then return 0; fi
  mkdir -p "$dir"
  printf '%s\n' "$sim ${base[*]} --seed $seed --out $dir $*" > "$dir/command.txt"
  echo "== $mode seed $seed"
  if "$sim" "${base[@]}" --seed "$seed" --out "$dir" "$@" > "$dir/stdout.txt" 2> "$dir/stderr.txt"; then
    tail -n 1 "$dir/stdout.txt"
  else
    echo "   FAILED (see $dir/stderr.txt)"; tail -n 3 "$dir/stderr.txt"; rm -f "$dir/rounds.csv"
  fi
}

for seed in $SEEDS; do
  run sync "$seed" --rounds "$ROUNDS" --round-deadline "$DEADLINE"
  run fedbuff "$seed" --rounds $((2 * ROUNDS)) --round-deadline 60 --fedbuff \
      --concurrency 10 --buffer-size 5 --max-staleness 20 --staleness polynomial:0.5
done
python3 bench/fedbuff_report.py "$OUT"
