#!/usr/bin/env bash
# Issue 13's "faster wire" comparison in one command: `fedquic-sim bench-overhead`
# (QUIC, mutual TLS) and Flower's counterpart (bench/flower_overhead.sh: gRPC, no
# TLS) at the issue's four points, ours and Flower's runs alternating pair by pair
# so that both see the same minute of the machine, then the Markdown table of
# every pair's seconds per round, the speed-up per pair and the medians
# (bench/wire_side_by_side.py), and the floor (`wire_floor`) for the distance to it.
#
#   PAIRS=3        pairs per point (default 3)
#   POINTS="10:1000000 50:1000000 10:10000000 100:100000"   K:P points
#   ROUNDS=5       rounds per run (each run's figure is its median round)
#   OUT=DIR        raw outputs (default /tmp/wire_side_by_side)
#   FLOWER_VENV    Flower's virtualenv (default ~/venv-flwr; created when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
pairs="${PAIRS:-3}"
points="${POINTS:-10:1000000 50:1000000 10:10000000 100:100000}"
rounds="${ROUNDS:-5}"
out="${OUT:-/tmp/wire_side_by_side}"
mkdir -p "$out"
rm -f "$out"/*.txt
cargo build --release -q -p fedquic-sim -p fedquic-net --bins --examples
sim=target/release/fedquic-sim
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), commit $(git rev-parse --short HEAD)" > "$out/machine.txt"
echo "start: $(date -u +%FT%H:%M:%S) UTC" >> "$out/machine.txt"
for pair in $(seq "$pairs"); do
    for point in $points; do
        k=${point%%:*} p=${point##*:}
        echo "pair $pair, K=$k P=$p: $(date -u +%H:%M:%S) UTC" >&2
        "$sim" bench-overhead --clients "$k" --params "$p" --rounds "$rounds" \
            > "$out/ours_${k}_${p}_$pair.txt" 2>&1
        bash bench/flower_overhead.sh --clients "$k" --params "$p" --rounds "$rounds" \
            > "$out/flower_${k}_${p}_$pair.txt" 2>&1
    done
done
echo "end: $(date -u +%FT%H:%M:%S) UTC" >> "$out/machine.txt"
target/release/examples/wire_floor > "$out/floor.txt" 2>&1 || true
python3 bench/wire_side_by_side.py "$out"
