#!/usr/bin/env bash
# The "Learning quality" matrix of BENCHMARKS.md: MNIST subset, the 2NN
# (mlp:784-200-200-10), 100 clients, C = 0.1, E = 1, B = 10, 50 rounds,
# seeds 0 1 2; then bench/learning_quality_report.py turns the runs into
# tables (mean +- sample std over seeds) and plots.
#
#   MNIST=DIR       MNIST IDX files (default ../shared/data/mnist-10k)
#   OUT=DIR         results (default bench/results/learning_quality); a run whose
#                   rounds.csv exists is skipped, so the script resumes
#   SEEDS="0 1 2"   evaluation seeds; the server learning rates are tuned on
#                   TUNE_SEED (default 99), not on an evaluation seed
#   THREADS=2       training threads per run
#   ONLY="noniid byzantine faults"   which parts to run
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/data/mnist-10k}
OUT=${OUT:-bench/results/learning_quality}
SEEDS=${SEEDS:-"0 1 2"}
TUNE_SEED=${TUNE_SEED:-99}
THREADS=${THREADS:-2}
ONLY=${ONLY:-"noniid byzantine faults"}
mkdir -p "$OUT"
# The same package set as the other release builds, so the features (and artifacts) match.
cargo build --release -p fedquic-sim -p fedquic-aggregator --examples --bins --quiet
sim=target/release/fedquic-sim
base=(--data "mnist:$MNIST" --model mlp:784-200-200-10 --clients 100 --fraction 0.1
      --rounds 50 --epochs 1 --batch-size 10 --lr 0.05 --threads "$THREADS" --quiet)
{
  echo "$(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'),$(date -u +%FT%TZ)"
} > "$OUT/machine.txt"

# run GROUP NAME SEED ARGS...: one simulation into $OUT/GROUP/NAME/seedSEED.
run() {
  local group=$1 name=$2 seed=$3
  shift 3
  local dir="$OUT/$group/$name/seed$seed"
  if [ -s "$dir/rounds.csv" ]; then return 0; fi
  mkdir -p "$dir"
  echo "== $group/$name seed $seed: $*"
  printf '%s\n' "$sim ${base[*]} --seed $seed --out $dir $*" > "$dir/command.txt"
  local start=$(date +%s.%N)
  if "$sim" "${base[@]}" --seed "$seed" --out "$dir" "$@" > "$dir/stdout.txt" 2> "$dir/stderr.txt"; then
    echo "$(date +%s.%N) - $start" | bc > "$dir/wall_seconds.txt"
    tail -n 2 "$dir/stdout.txt"
  else
    echo "   FAILED (see $dir/stderr.txt)"; tail -n 3 "$dir/stderr.txt"
    rm -f "$dir/rounds.csv"
  fi
}

# Mean test accuracy of the last 5 rounds of a run (the tuning criterion).
last5() {
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "test_accuracy") c = i; next }
           { a[NR] = $c } END { s = 0; n = 0; for (i = NR - 4; i <= NR; i++) if (i > 1) { s += a[i]; n++ } print s / n }' "$1"
}

if [[ " $ONLY " == *" noniid "* ]]; then
  P=(--partition shards:2)
  : > "$OUT/grid.csv"
  echo "strategy,server_lr,last5_accuracy" >> "$OUT/grid.csv"
  declare -A grid=(
    [fedavgm]="0.3 1.0"
    [fedadam]="0.003 0.01 0.03"
    [fedyogi]="0.003 0.01 0.03"
    [fedadagrad]="0.01 0.03 0.1"
  )
  declare -A best
  for s in fedavgm fedadam fedyogi fedadagrad; do
    best_acc=-1
    for lr in ${grid[$s]}; do
      run tune "$s-lr$lr" "$TUNE_SEED" "${P[@]}" --strategy "$s" --server-lr "$lr"
      f="$OUT/tune/$s-lr$lr/seed$TUNE_SEED/rounds.csv"
      [ -s "$f" ] || continue
      acc=$(last5 "$f")
      echo "$s,$lr,$acc" >> "$OUT/grid.csv"
      if awk -v a="$acc" -v b="$best_acc" 'BEGIN { exit !(a > b) }'; then best_acc=$acc; best[$s]=$lr; fi
    done
    echo "   best $s server lr: ${best[$s]:-none} (last-5 accuracy $best_acc)"
  done
  for seed in $SEEDS; do
    run noniid fedavg "$seed" "${P[@]}" --strategy fedavg
    for s in fedavgm fedadam fedyogi fedadagrad; do
      [ -n "${best[$s]:-}" ] && run noniid "$s" "$seed" "${P[@]}" --strategy "$s" --server-lr "${best[$s]}"
    done
    run noniid fedprox "$seed" "${P[@]}" --strategy fedprox --mu 0.01
  done
  # SCAFFOLD is being added on another branch: include it when this build has it.
  if "$sim" "${base[@]}" --rounds 1 --clients 10 --strategy scaffold > /dev/null 2> "$OUT/scaffold_probe.txt"; then
    for seed in $SEEDS; do run noniid scaffold "$seed" "${P[@]}" --strategy scaffold; done
    rm -f "$OUT/scaffold_missing.txt"
  else
    echo "   SCAFFOLD not available in this build: $(tail -n 1 "$OUT/scaffold_probe.txt")" | tee "$OUT/scaffold_missing.txt"
  fi
fi

if [[ " $ONLY " == *" byzantine "* ]]; then
  # 20% of the 100 clients are Byzantine: about 2 of the 10 updates a round
  # (hypergeometric: sometimes 0, sometimes 4 or more). Krum and Multi-Krum
  # tolerate f = 2 of 10 (K >= 2f + 3); Bulyan needs K >= 4f + 3, so f = 1.
  declare -A defence=(
    [fedavg]="--strategy fedavg"
    [fedavg-noclip]="--strategy fedavg --max-norm-multiple 0"
    [median]="--strategy fedmedian"
    [trimmed]="--strategy fedtrimmedavg --trim 0.2"
    [krum]="--strategy krum --byzantine-f 2"
    [multikrum]="--strategy multikrum --byzantine-f 2 --krum-m 5"
    [bulyan]="--strategy bulyan --byzantine-f 1"
    [normbounded]="--strategy normbounded --clip-norm ${CLIP_NORM:-0.5}"
  )
  # Seeds outermost, clean runs of the defences last: a cut-short run
  # still has every attack against every defence.
  for seed in $SEEDS; do
    run byzantine clean.fedavg "$seed" --partition iid ${defence[fedavg]}
    # scale:10 boosts an honest update (in IID data, a bigger step in a good
    # direction); scale:-10 boosts a sign-flipped one, the classic model
    # replacement.
    for a in scale:10 scale:-10 sign-flip gaussian:1 alie label-flip; do
      for d in fedavg fedavg-noclip median trimmed krum multikrum bulyan normbounded; do
        # shellcheck disable=SC2086
        run byzantine "$a.$d" "$seed" --partition iid --byzantine "0.2:$a" ${defence[$d]}
      done
    done
    for d in median trimmed krum multikrum bulyan normbounded; do
      # shellcheck disable=SC2086
      run byzantine "clean.$d" "$seed" --partition iid ${defence[$d]}
    done
  done
fi

if [[ " $ONLY " == *" faults "* ]]; then
  # A round deadline of 1 s: about 16% of the stragglers (delay > 1 s) are cut.
  for seed in $SEEDS; do
    run faults clean "$seed" --partition iid
    run faults dropout0.3 "$seed" --partition iid --dropout 0.3
    run faults stragglers "$seed" --partition iid --stragglers 0.3:lognormal:-1,1 --round-deadline 1
  done
fi

python3 bench/learning_quality_report.py "$OUT"
