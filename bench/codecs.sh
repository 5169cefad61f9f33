#!/usr/bin/env bash
# The "Update codecs" evidence of BENCHMARKS.md: every uplink codec on the
# MNIST subset, the 2NN and the CNN, IID and shards:2, seeds 0 1 2; then
# bench/codecs_report.py turns the runs into a table (final accuracy, rounds
# to target, bytes up per round; mean +- sample std over seeds) and plots.
#
#   2NN: 100 clients, C = 0.1, E = 1, B = 10, lr 0.05, 50 rounds (target 85%)
#   CNN: 20 clients, C = 0.5, E = 1, B = 10, lr 0.05, 10 rounds (target 90%)
#
#   MNIST=DIR      MNIST IDX files (default ../shared/data/mnist-10k)
#   OUT=DIR        results (default bench/results/codecs); finished runs are skipped
#   SEEDS="0 1 2"  seeds
#   ONLY="mlp cnn" which models
#   THREADS=2      training threads per run
#   LONG=1         also the shards:2 convergence runs (f32 and top-k 1%, 2NN 250
#                  rounds, CNN 30)
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/data/mnist-10k}
OUT=${OUT:-bench/results/codecs}
SEEDS=${SEEDS:-"0 1 2"}
ONLY=${ONLY:-"mlp cnn"}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
cargo build --release -p fedquic-sim -p fedquic-aggregator --examples --bins --quiet
sim=target/release/fedquic-sim
echo "$(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'),$(date -u +%FT%TZ)" > "$OUT/machine.txt"

# run MODEL PARTITION CODEC SEED VARIANT ARGS...: one simulation into
# $OUT/MODEL/PARTITION/CODEC[@VARIANT]/seedSEED (VARIANT "" is FedAvg).
run() {
  local model=$1 part=$2 codec=$3 seed=$4 variant=$5
  shift 5
  local label=$codec${variant:+@$variant}
  local dir="$OUT/$model/${part/:/}/$(echo "$label" | tr ':+' '_-')/seed$seed"
  if [ -s "$dir/rounds.csv" ]; then return 0; fi
  mkdir -p "$dir"
  echo "$label" > "$dir/codec.txt"
  printf '%s\n' "$sim $* --codec $codec --partition $part --seed $seed --out $dir" > "$dir/command.txt"
  echo "== $model $part $codec seed $seed"
  if "$sim" "$@" --codec "$codec" --partition "$part" --seed "$seed" --out "$dir" --quiet \
      > "$dir/stdout.txt" 2> "$dir/stderr.txt"; then
    tail -n 1 "$dir/stdout.txt"
  else
    echo "   FAILED (see $dir/stderr.txt)"; tail -n 3 "$dir/stderr.txt"; rm -f "$dir/rounds.csv"
  fi
}

mlp_base=(--data "mnist:$MNIST" --model mlp:784-200-200-10 --clients 100 --fraction 0.1
          --epochs 1 --batch-size 10 --lr 0.05 --threads "$THREADS")
cnn_base=(--data "mnist:$MNIST" --model cnn:mnist --clients 20 --fraction 0.5
          --epochs 1 --batch-size 10 --lr 0.05 --threads "$THREADS")
mlp=("${mlp_base[@]}" --rounds 50)
cnn=("${cnn_base[@]}" --rounds 10)
# FedAvg averages each coordinate over every client of the round, so a
# coordinate that only some clients' top-k carried moves by a fraction of its
# dense step: top-k rows are also run at server learning rate 3 (FedAvgM with
# momentum 0), beside f32 at the same setting.
lr3=(--strategy fedavgm --server-lr 3 --server-momentum 0)
# An adaptive server step (rows "@adagrad"): per-coordinate steps make up for
# coordinates that few clients' top-k carried.
adagrad=(--strategy fedadagrad --server-lr 0.01)
for seed in $SEEDS; do
  for part in iid shards:2; do
    if [[ " $ONLY " == *" mlp "* ]]; then
      for codec in f32 f16 bf16 int8 top-k:0.01 top-k:0.01+int8 top-k:0.05+int8; do
        run mlp "$part" "$codec" "$seed" "" "${mlp[@]}"
      done
      for codec in f32 top-k:0.01 top-k:0.01+int8; do
        run mlp "$part" "$codec" "$seed" lr3 "${mlp[@]}" "${lr3[@]}"
      done
      for codec in f32 top-k:0.01; do
        run mlp "$part" "$codec" "$seed" adagrad "${mlp[@]}" "${adagrad[@]}"
      done
      # Compressed model broadcast (downlink), updates in f32.
      for down in f16 bf16; do
        run mlp "$part" f32 "$seed" "down-$down" "${mlp[@]}" --downlink-codec "$down"
      done
    fi
    if [[ " $ONLY " == *" cnn "* ]]; then
      for codec in f32 f16 int8 top-k:0.01 top-k:0.05+int8; do
        run cnn "$part" "$codec" "$seed" "" "${cnn[@]}"
      done
      for codec in f32 top-k:0.01; do
        run cnn "$part" "$codec" "$seed" lr3 "${cnn[@]}" "${lr3[@]}"
      done
      for codec in f32 top-k:0.01; do
        run cnn "$part" "$codec" "$seed" adagrad "${cnn[@]}" "${adagrad[@]}"
      done
    fi
  done
done
# LONG=1: the non-IID runs again, long enough for f32 to flatten out (2NN 250
# rounds, CNN 30), for top-k 1% against f32 at convergence (rows "@r250", "@r30").
if [ "${LONG:-0}" = 1 ]; then
  for seed in $SEEDS; do
    for codec in f32 top-k:0.01; do
      if [[ " $ONLY " == *" mlp "* ]]; then
        run mlp shards:2 "$codec" "$seed" r250 "${mlp_base[@]}" --rounds 250
      fi
      if [[ " $ONLY " == *" cnn "* ]]; then
        run cnn shards:2 "$codec" "$seed" r30 "${cnn_base[@]}" --rounds 30
      fi
    done
  done
fi
python3 bench/codecs_report.py "$OUT"
