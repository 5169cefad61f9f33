#!/usr/bin/env bash
# Flower's counterpart of `fedquic-sim bench-overhead`: what the framework
# itself costs per round, measured the same way on the same machine. One Flower
# server process (FedAvg, every client every round, no evaluation) and one
# process holding all K NumPyClients (threads), on loopback gRPC without TLS
# (Flower's default; bench-overhead runs QUIC with mutual TLS). Client i adds
# (1 + i % 7) * 1e-3 to every one of the P f32 parameters and reports 1 + i % 5
# examples; the server checks the exact weighted mean and times each round from
# configure_fit to the end of aggregate_fit. Prints `round seconds`, `median
# seconds per round` and the server's peak memory (VmHWM), as bench-overhead.
#
#   bench/flower_overhead.sh --clients K --params P --rounds R [--port N]
#   FLOWER_VENV=DIR   virtualenv for flwr, outside the repo (default ~/venv-flwr)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOWER_VENV:-$HOME/venv-flwr}
FLWR=flwr==1.42.0
if ! "$VENV/bin/python" -c 'import flwr' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$FLWR"
fi
exec "$VENV/bin/python" bench/flower_overhead.py "$@"
