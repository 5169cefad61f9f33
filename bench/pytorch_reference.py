#!/usr/bin/env python3
"""PyTorch CPU reference benchmark for fedquic's training engine (the `train` crate).

Measures, with plain eager PyTorch on the CPU, the same work the Rust engine does:

* models: the FedAvg paper's 2NN `mlp:784-200-200-10` (199,210 parameters) and CNN
  `cnn:mnist` (conv5x5x32 - pool - conv5x5x64 - pool - fc512 - fc10; 1,663,370
  parameters), default PyTorch initialisation;
* training throughput (samples/s): forward + softmax cross-entropy (mean over the
  batch) + backward + plain SGD step (lr 0.05, no momentum, no weight decay), at batch
  sizes 10 and 64;
* inference throughput (samples/s): forward pass only, batch 256 (`--infer-batches
  64,256` for several), `model.eval()` under `torch.no_grad()`;
* inputs: random float32 values in [0, 1) shaped like MNIST (N x 784 for the MLP,
  N x 1 x 28 x 28 for the CNN) with random labels 0-9. A pool of 8,192 random examples
  is cut into contiguous batches before timing and cycled through, so the timed loop
  holds only the model work (no data loading);
* timing: a few warm-up steps and a calibration run, then `--repeats` (3) timed repeats,
  each running steps until it has lasted at least `--min-time` (2 s), measured with
  `time.perf_counter`; the reported figure is the median of the repeats' samples/s;
* threads: each entry of `--threads` (default "1,2") runs in a fresh Python process that
  calls `torch.set_num_interop_threads(1)` and `torch.set_num_threads(n)` before any
  tensor is created.

Setup (fresh Debian/Ubuntu machine with python3 and the python3-venv package; run from
the repository root):

    python3 -m venv bench/.venv
    bench/.venv/bin/pip install torch

PyPI's `torch` is the CUDA build: the wheel is about 0.5 GB and, with the nvidia-*
packages it pulls in, the venv comes to about 5 GB on disk (roughly 3 GB downloaded). It
runs fine on a machine without a GPU; this script only uses the CPU. Where
download.pytorch.org is reachable, the much smaller CPU-only wheel can be used instead:

    bench/.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu

(that index is NOT reachable from the project's build machines, only PyPI is).

Run:

    bench/.venv/bin/python bench/pytorch_reference.py
    bench/.venv/bin/python bench/pytorch_reference.py --threads 1,2 --json bench/pytorch_results.json

Timings are only meaningful on an otherwise idle machine; the JSON records the load
average at the start of the run. `--min-time 0.2 --repeats 1` gives a quick smoke test.
NumPy is not needed (PyTorch's "Failed to initialize NumPy" warning is silenced).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=r".*Failed to initialize NumPy.*")

LEARNING_RATE = 0.05
TRAIN_BATCHES = (10, 64)
INFER_BATCH = 256
POOL_EXAMPLES = 8192
CLASSES = 10
EXPECTED_PARAMS = {
    "mlp:784-200-200-10": 199_210,
    "cnn:mnist": 1_663_370,
}
MODELS = tuple(EXPECTED_PARAMS)


def build_model(name):
    """The two reference architectures, exactly as the Rust specs define them."""
    from torch import nn

    if name == "mlp:784-200-200-10":
        model = nn.Sequential(
            nn.Linear(784, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, 10),
        )
    elif name == "cnn:mnist":
        model = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )
    else:
        raise ValueError(f"unknown model {name!r}")
    params = sum(p.numel() for p in model.parameters())
    assert params == EXPECTED_PARAMS[name], f"{name}: {params} parameters, expected {EXPECTED_PARAMS[name]}"
    return model, params


def input_shape(name):
    return (784,) if name.startswith("mlp:") else (1, 28, 28)


def make_batches(torch, name, batch, generator):
    """A pool of random MNIST-shaped examples, cut into contiguous batches."""
    count = max(1, POOL_EXAMPLES // batch)
    x = torch.rand((count * batch, *input_shape(name)), generator=generator, dtype=torch.float32)
    y = torch.randint(0, CLASSES, (count * batch,), generator=generator, dtype=torch.int64)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(count)]


def time_steps(step, batches, steps):
    """Runs `steps` steps cycling through `batches`; returns elapsed seconds."""
    count = len(batches)
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % count]
        step(x, y)
    return time.perf_counter() - start


def measure(step, batches, batch, min_time, repeats, log):
    # Warm-up: allocator, oneDNN primitive creation, first-touch of the weights.
    time_steps(step, batches, 5)
    # Calibration: double the step count until a run takes at least 0.25 s; a timed
    # repeat then runs chunks of about a tenth of --min-time until it has lasted at
    # least --min-time (so it does even when the calibration was off).
    steps = 8
    while True:
        elapsed = time_steps(step, batches, steps)
        if elapsed >= 0.25:
            break
        steps *= 2
    chunk = max(1, math.ceil(0.1 * min_time * steps / elapsed))
    seconds, counts = [], []
    for _ in range(repeats):
        done, spent = 0, 0.0
        while spent < min_time:
            spent += time_steps(step, batches, chunk)
            done += chunk
        seconds.append(spent)
        counts.append(done)
    rates = [n * batch / s for n, s in zip(counts, seconds)]
    log(f"    {', '.join(f'{n} steps in {s:.2f} s' for n, s in zip(counts, seconds))} -> "
        f"{', '.join(f'{r:,.0f}' for r in rates)} samples/s")
    return {
        "samples_per_s": statistics.median(rates),
        "repeat_samples_per_s": rates,
        "repeat_seconds": seconds,
        "repeat_steps": counts,
    }


def worker(args):
    """One thread count, in its own process; prints a JSON object on stdout."""
    import torch

    torch.set_num_interop_threads(1)
    torch.set_num_threads(args.worker)
    import torch.nn.functional as F

    def log(message):
        print(message, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1234)
    results = []
    for name in args.models:
        for batch in TRAIN_BATCHES:
            model, params = build_model(name)
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.0)
            batches = make_batches(torch, name, batch, generator)

            def train_step(x, y, model=model, optimizer=optimizer):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                return loss

            log(f"[threads {args.worker}] {name} train batch {batch}")
            result = measure(train_step, batches, batch, args.min_time, args.repeats, log)
            final_loss = float(train_step(*batches[0]).detach())
            if not math.isfinite(final_loss):
                raise RuntimeError(f"{name} batch {batch}: loss diverged ({final_loss})")
            results.append({"model": name, "params": params, "mode": "train", "batch": batch,
                            "final_loss": final_loss, **result})

        model, params = build_model(name)
        model.eval()
        for infer_batch in args.infer_batches:
            batches = make_batches(torch, name, infer_batch, generator)

            def infer_step(x, y, model=model):
                with torch.no_grad():
                    return model(x)

            log(f"[threads {args.worker}] {name} inference batch {infer_batch}")
            result = measure(infer_step, batches, infer_batch, args.min_time, args.repeats, log)
            results.append({"model": name, "params": params, "mode": "infer",
                            "batch": infer_batch, **result})

    json.dump({
        "threads": args.worker,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "results": results,
    }, sys.stdout)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_threads(text):
    try:
        threads = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not threads or any(n < 1 for n in threads):
        raise argparse.ArgumentTypeError(f"thread counts must be positive integers: {text!r}")
    return threads


def parse_models(text):
    models = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in models if m not in EXPECTED_PARAMS]
    if not models or unknown:
        raise argparse.ArgumentTypeError(f"models must be among {', '.join(MODELS)}: {text!r}")
    return models


def main():
    parser = argparse.ArgumentParser(
        description="PyTorch CPU reference throughput for fedquic's models (see the docstring for setup).")
    parser.add_argument("--threads", type=parse_threads, default=[1, 2],
                        help='comma-separated intra-op thread counts (default "1,2")')
    parser.add_argument("--json", metavar="FILE", help="also write all numbers as JSON to FILE")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="minimum seconds per timed repeat (default 2.0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (default 3)")
    parser.add_argument("--models", type=parse_models, default=list(MODELS),
                        help=f'comma-separated subset of {",".join(MODELS)} (default: both)')
    parser.add_argument("--infer-batches", type=parse_threads, default=[INFER_BATCH],
                        help=f'comma-separated inference batch sizes (default "{INFER_BATCH}")')
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.min_time <= 0:
        parser.error("--repeats must be >= 1 and --min-time > 0")

    if args.worker is not None:
        worker(args)
        return

    import torch  # only for the version; each measurement runs in its own process

    started = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "benchmark": "fedquic bench/pytorch_reference.py",
        "date": started.isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
        # ATen's vector ISA; oneDNN's and MKL's follow ONEDNN_MAX_CPU_ISA and
        # MKL_ENABLE_INSTRUCTIONS, recorded as set.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_environment": {k: v for k, v in os.environ.items()
                            if k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")},
        "settings": {
            "learning_rate": LEARNING_RATE,
            "optimizer": "SGD, no momentum, no weight decay",
            "loss": "softmax cross-entropy, mean over the batch",
            "train_batches": list(TRAIN_BATCHES),
            "infer_batches": args.infer_batches,
            "input": "uniform [0,1) float32, random labels 0-9",
            "min_time_s": args.min_time,
            "repeats": args.repeats,
            "statistic": "median of repeats",
        },
        "runs": [],
    }
    print(f"torch {torch.__version__}, python {info['python_version']}, CPU {info['cpu_model']} "
          f"x {info['cpu_count']}, ATen {info['cpu_capability']} {info['isa_environment'] or ''}, "
          f"load average {info['load_average_at_start'][0]:.2f}", file=sys.stderr)

    for n in args.threads:
        if os.cpu_count() and n > os.cpu_count():
            print(f"warning: {n} threads on {os.cpu_count()} CPUs", file=sys.stderr)
        env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(n),
                   "--min-time", str(args.min_time), "--repeats", str(args.repeats),
                   "--models", ",".join(args.models),
                   "--infer-batches", ",".join(str(b) for b in args.infer_batches)]
        completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        if completed.returncode != 0:
            sys.exit(f"worker for {n} threads failed with exit status {completed.returncode}")
        run = json.loads(completed.stdout)
        if run["torch_num_threads"] != n:
            print(f"warning: asked for {n} threads, torch reports {run['torch_num_threads']}", file=sys.stderr)
        info["runs"].append(run)
    info["load_average_at_end"] = list(os.getloadavg())
    info["elapsed_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)

    # Table: one row per (model, mode, batch), one column per thread count.
    rows = {}
    for run in info["runs"]:
        for r in run["results"]:
            rows.setdefault((r["model"], r["mode"], r["batch"]), {})[run["threads"]] = r["samples_per_s"]
    header = ["model", "mode", "batch"] + [f"{n} thread{'s' if n != 1 else ''}" for n in args.threads]
    lines = [[m, mode, str(b)] + [f"{cols[n]:,.0f}" if n in cols else "-" for n in args.threads]
             for (m, mode, b), cols in rows.items()]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    print()
    print(f"PyTorch {torch.__version__} CPU reference, samples/s (median of {args.repeats}), "
          f"{info['cpu_model']}, {info['date']}")
    for i, line in enumerate([header] + lines):
        cells = [c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    busiest = max(info["load_average_at_start"][0], info["load_average_at_end"][0])
    if busiest > 0.5 * (os.cpu_count() or 1):
        print(f"\nwarning: load average reached {busiest:.2f} on {os.cpu_count()} CPUs: other work was "
              "running, so these timings (multi-threaded ones most of all) are not reliable")

    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
