#!/usr/bin/env bash
# Peak memory of the aggregator under a flood of QUIC Initials (no
# certificate, never a completed handshake) while two real clients run a
# 3-round federation; see BENCHMARKS.md, "Handshake flood".
#
#   bench/flood.sh [AGGREGATOR_BIN] [CLIENT_BIN] [SIM_BIN] [INITIALS]
#
# Defaults: this checkout's debug binaries (cargo build --bins first) and
# 10000 Initials. Prints the aggregator's VmHWM, its refusal log lines and
# whether the run completed. Everything stays on 127.0.0.1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
agg=${1:-$root/target/debug/fedquic-aggregator}
client=${2:-$root/target/debug/fedquic-client}
sim=${3:-$root/target/debug/fedquic-sim}
initials=${4:-10000}
port=${PORT:-47433}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"' EXIT

"$agg" certs init --dir "$work/certs" --clients 2 >/dev/null
# The per-client bundle (clients/NAME/) when the binary writes one, else the flat layout.
certs_for() {
  if [ -d "$work/certs/clients/$1" ]; then echo "$work/certs/clients/$1"; else echo "$work/certs"; fi
}
agg_certs=$work/certs
[ -d "$work/certs/aggregator" ] && agg_certs=$work/certs/aggregator
cat > "$work/agg.toml" <<TOML
listen = "127.0.0.1:$port"
[certs]
dir = "$agg_certs"
[model]
spec = "mlp:784-32-10"
[rounds]
count = 3
fraction_fit = 1.0
min_fit_clients = 2
min_available_clients = 2
deadline_secs = 60
[evaluate]
test_data = ""
[state]
dir = "$work/state"
TOML

"$agg" run --config "$work/agg.toml" 2>"$work/agg.log" &
agg_pid=$!
for _ in $(seq 100); do grep -q "aggregator listening" "$work/agg.log" && break; sleep 0.1; done
hwm() { awk '/VmHWM/ {print $2}' "/proc/$agg_pid/status" 2>/dev/null || true; }
echo "aggregator idle: VmHWM $(hwm) kB"
"$client" --server 127.0.0.1:$port --certs "$(certs_for client-001)" --name client-001 \
  --data synthetic:2000/200 --partition 1/2 --threads 1 >"$work/c1.out" 2>"$work/c1.log" &
c1=$!
"$sim" flood --port "$port" --initials "$initials" --rate 20000
echo "after the flood: VmHWM $(hwm) kB"
"$client" --server 127.0.0.1:$port --certs "$(certs_for client-002)" --name client-002 \
  --data synthetic:2000/200 --partition 2/2 --threads 1 >"$work/c2.out" 2>"$work/c2.log" &
c2=$!
peak=0
while kill -0 "$agg_pid" 2>/dev/null; do
  v=$(hwm); [ -n "$v" ] && peak=$v
  sleep 0.05
done
wait "$agg_pid" && agg_rc=0 || agg_rc=$?
wait "$c1" && wait "$c2" && clients=ok || clients=failed
echo "peak VmHWM: $peak kB"
echo "aggregator exit: $agg_rc; clients: $clients ($(cat "$work/c1.out" "$work/c2.out" | tr '\n' ' '))"
echo "aggregator log lines about refused/abandoned connections: $(grep -ciE 'refused connection|abandoned connection|ignored connection' "$work/agg.log")"
grep -E "run complete|round [0-9]+ (complete|committed)" "$work/agg.log" | tail -1 || true
