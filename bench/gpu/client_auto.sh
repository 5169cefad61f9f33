#!/usr/bin/env bash
# Issue 9's "done when" on a GPU machine: a real aggregator and two `fedquic-client
# --backend auto` processes over QUIC with mTLS, training the MNIST CNN for two rounds
# on the MNIST subset, and the line each client logs about the backend it picked.
# Needs .gpu/ (fedquic-aggregator, fedquic-client, mnist-10k; bench/gpu/prepare.sh) and,
# on NVIDIA, .gl/. Logs go to $OUT (./gpu-out elsewhere): client_auto.txt.
set -u
source "$(dirname "$0")/env.sh"
WORK=$(mktemp -d)
LOG="$OUT/client_auto.txt"
.gpu/fedquic-aggregator certs init --dir "$WORK/certs" --clients 2 --server-name localhost > "$LOG" 2>&1
cat > "$WORK/aggregator.toml" <<TOML
[model]
spec = "cnn:mnist"
[rounds]
count = 2
fraction_fit = 1.0
min_fit_clients = 2
min_available_clients = 2
[fit]
epochs = 1
batch_size = 64
learning_rate = 0.05
[evaluate]
test_data = "mnist:.gpu/mnist-10k"
TOML
timeout 120 .gpu/fedquic-aggregator run --config "$WORK/aggregator.toml" --listen 127.0.0.1:4433 \
    --certs "$WORK/certs" --state-dir "$WORK/state" > "$WORK/aggregator.log" 2>&1 &
AGGREGATOR=$!
for i in 1 2; do
    name=client-00$i
    timeout 110 .gpu/fedquic-client --server 127.0.0.1:4433 --server-name localhost \
        --certs "$WORK/certs/clients/$name" --name "$name" --data mnist:.gpu/mnist-10k \
        --partition "$i/2" --backend auto > "$WORK/$name.log" 2>&1 &
done
wait "$AGGREGATOR"
echo "aggregator exit $?" >> "$LOG"
wait
for i in 1 2; do
    echo "== client-00$i" >> "$LOG"
    grep -i -e "backend" -e "error" "$WORK/client-00$i.log" | head -n 5 >> "$LOG"
done
echo "== aggregator" >> "$LOG"
grep -i -e "round" -e "backend" -e "error" "$WORK/aggregator.log" | tail -n 10 >> "$LOG"
cat "$LOG"
