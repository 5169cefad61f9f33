#!/usr/bin/env bash
# "A million virtual clients" in BENCHMARKS.md: check-in simulation
# (--materialize selected) at 10k, 100k, 1M and 10M clients, 100 clients a
# round, 10 rounds of the 2NN on per-client synthetic digits (600 each, as the
# FedAvg paper's MNIST clients), over the in-process QUIC network. Also:
#   floor   the same at 1M with one example per client (what is left is
#           certificates, handshakes, model transfer and central evaluation);
#   e5      the same at 1M with 5 local epochs (E = 5, as often in the FedAvg paper);
#   all     every client connected for the whole run (--materialize all) at 1,000
#           and 2,000 clients, for the memory an idle connected client takes;
#   small   a 7,850-float model (logreg) at 10k and 100k, next to Flower's figures
#           for a 1,000-float update.
# Peak memory is /usr/bin/time's maximum resident set size of the whole
# simulator (aggregator and clients in one process). bench/population_report.py
# writes bench/population/report.md.
#
#   OUT=DIR   results (default bench/results/population); finished runs are skipped
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/population}
mkdir -p "$OUT"
cargo build --release -p fedquic-sim --bins --quiet
sim=target/release/fedquic-sim
echo "$(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'),$(date -u +%FT%TZ)" > "$OUT/machine.txt"

run() {
  local name=$1
  shift
  if [ -s "$OUT/$name/time.txt" ]; then return 0; fi
  mkdir -p "$OUT/$name"
  echo "== $name: $sim $*"
  echo "$sim $*" > "$OUT/$name/command.txt"
  /usr/bin/time -v "$sim" "$@" --out "$OUT/$name" > "$OUT/$name/stdout.txt" 2> "$OUT/$name/time.tmp"
  mv "$OUT/$name/time.tmp" "$OUT/$name/time.txt"
  grep -E "final|materialised" "$OUT/$name/stdout.txt" || true
  grep -E "Maximum resident" "$OUT/$name/time.txt"
}

twonn=(--model mlp:784-200-200-10 --rounds 10 --transport mem --seed 0 --quiet)
run pop_10k   --clients 10000    --fraction 0.01     --data synthetic-per-client:600 "${twonn[@]}"
run pop_100k  --clients 100000   --fraction 0.001    --data synthetic-per-client:600 "${twonn[@]}"
run pop_1m    --clients 1000000  --fraction 0.0001   --data synthetic-per-client:600 "${twonn[@]}"
run pop_10m   --clients 10000000 --fraction 0.00001  --data synthetic-per-client:600 "${twonn[@]}"
run floor_1m  --clients 1000000  --fraction 0.0001   --data synthetic-per-client:1   "${twonn[@]}"
run e5_1m     --clients 1000000  --fraction 0.0001   --data synthetic-per-client:600 "${twonn[@]}" --epochs 5
run all_1000  --clients 1000 --fraction 0.1  --materialize all --data synthetic:12000 \
  --model mlp:784-200-200-10 --rounds 3 --transport mem --seed 0 --quiet
run all_2000  --clients 2000 --fraction 0.05 --materialize all --data synthetic:12000 \
  --model mlp:784-200-200-10 --rounds 3 --transport mem --seed 0 --quiet
small=(--model logreg:784-10 --rounds 10 --transport mem --seed 0 --quiet --data synthetic-per-client:10)
run small_10k  --clients 10000  --fraction 0.01  "${small[@]}"
run small_100k --clients 100000 --fraction 0.001 "${small[@]}"
python3 bench/population_report.py "$OUT" > bench/population/report.md
cat bench/population/report.md
