#!/usr/bin/env python3
"""Flower's counterpart of `fedquic-sim bench-overhead`: seconds per round of
the framework itself (no learning), for a side-by-side comparison.

One Flower server process (legacy `start_server`, gRPC on 127.0.0.1, no TLS)
and one process holding all K NumPyClients (one thread each). Client i
(1..=K, as in bench-overhead) adds (1 + i % 7) * 1e-3 to every parameter of
the P-float32 model and reports 1 + i % 5 examples; the server runs FedAvg
(example-weighted) with every client in every round and no evaluation. A
round is timed on the server from the start of configure_fit (once all K
clients are connected) to the end of aggregate_fit; the aggregate is checked
against the exact weighted mean (tolerance 1e-6, as bench-overhead).

    flower_overhead.py --clients K --params P --rounds R [--port N]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home
warnings.filterwarnings("ignore")

import logging  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import flwr as fl  # noqa: E402
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

DELTA = 1e-3
TOLERANCE = 1e-6
MAX_MESSAGE = 1 << 30  # 1 GiB: room for P = 10M f32 (40 MB) and more


def update(i):
    """Client i's delta and example count (bench_update in sim/src/bench.rs)."""
    return np.float32(DELTA * (1 + i % 7)), 1 + i % 5


def expected_step(k):
    pairs = [update(i) for i in range(1, k + 1)]
    return sum(float(d) * n for d, n in pairs) / sum(n for _, n in pairs)


def fail(msg):
    print(f"FAILED: {msg}", file=sys.stderr, flush=True)
    os._exit(1)  # not sys.exit: gRPC threads would keep the server alive


def peak_mb():
    with open("/proc/self/status") as f:
        kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    return f"{kb * 1024 / 1e6:.1f} MB"


class TimedFedAvg(fl.server.strategy.FedAvg):
    def __init__(self, k, **kw):
        super().__init__(**kw)
        self.k, self.step, self.t0 = k, expected_step(k), 0.0
        self.round_seconds, self.max_error = [], 0.0

    def configure_fit(self, server_round, parameters, client_manager):
        client_manager.wait_for(self.k)  # round 1: connection setup is not timed
        self.t0 = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        self.round_seconds.append(time.perf_counter() - self.t0)
        if failures or len(results) != self.k:
            fail(f"round {server_round}: {len(results)} results, {len(failures)} failures")
        (agg,) = parameters_to_ndarrays(out[0])
        err = float(np.max(np.abs(agg.astype(np.float64) - server_round * self.step)))
        self.max_error = max(self.max_error, err)
        if err > TOLERANCE:
            fail(f"round {server_round}: off the exact weighted mean by {err:.3e}")
        return out


def serve(a):
    strategy = TimedFedAvg(
        a.clients,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=a.clients,
        min_evaluate_clients=0,
        min_available_clients=a.clients,
        initial_parameters=ndarrays_to_parameters([np.zeros(a.params, np.float32)]),
    )
    fl.server.start_server(
        server_address=f"127.0.0.1:{a.port}",
        config=fl.server.ServerConfig(num_rounds=a.rounds),
        strategy=strategy,
        grpc_max_message_length=MAX_MESSAGE,
    )
    s = strategy.round_seconds
    print("round seconds: " + " ".join(f"{x:.3f}" for x in s))
    print(f"median seconds per round: {statistics.median(s):.3f}")
    print(f"largest error against the exact weighted mean: {strategy.max_error:.3e} (allowed {TOLERANCE:.3e})")
    print(f"server peak memory (VmHWM): {peak_mb()}", flush=True)


class BenchClient(fl.client.NumPyClient):
    def __init__(self, i):
        self.delta, self.examples = update(i)

    def get_parameters(self, config):
        raise RuntimeError("the server supplies initial parameters")

    def fit(self, parameters, config):
        return [p + self.delta for p in parameters], self.examples, {}


def run_client(i, port):
    fl.client.start_client(
        server_address=f"127.0.0.1:{port}",
        client=BenchClient(i).to_client(),
        grpc_max_message_length=MAX_MESSAGE,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # deprecation notices, INFO chatter
    if a.serve:
        return serve(a)

    print(
        f"flower-overhead: K={a.clients} clients, P={a.params} params, {a.rounds} rounds, "
        f"FedAvg, gRPC on 127.0.0.1 without TLS; flwr {fl.__version__}, grpcio {grpc.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}",
        flush=True,
    )
    server = subprocess.Popen([sys.executable, __file__, "--serve", *sys.argv[1:]])
    threads = [threading.Thread(target=run_client, args=(i, a.port), daemon=True)
               for i in range(1, a.clients + 1)]
    for t in threads:
        t.start()  # start_client retries until the server listens
    if server.wait() != 0:
        sys.exit(f"server failed (exit status {server.returncode})")
    for t in threads:
        t.join(timeout=10)


if __name__ == "__main__":
    main()
