"""PyTorch -> fedquic -> onnxruntime, end to end.

1. Defines the FedAvg paper's MNIST CNN in PyTorch and exports it to ONNX.
2. Federates it with `fedquic-sim --model onnx:cnn.onnx` on MNIST and exports the final
   global model with `--export-onnx`.
3. Evaluates that exported model with onnxruntime (and, loaded back into PyTorch, with
   onnx2torch) on the same test images, and compares with the accuracy fedquic reported.
4. Runs the same federation with fedquic's own `--model cnn:mnist` and the same seed.

Usage (from the repository root, after `cargo build --release -p fedquic-sim`):

    python examples/onnx_e2e.py --data /path/to/mnist-dir [--rounds 10 --clients 20 ...]

Needs the packages of tests/fixtures/onnx/requirements.txt.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn


class FedAvgCnn(nn.Module):
    """McMahan et al. 2017: 5x5 conv 32, 2x2 max pool, 5x5 conv 64, 2x2 max pool,
    dense 512, dense 10 (1,663,370 parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def init_like_fedquic(model):
    """He-uniform weights before ReLU, Glorot-uniform for the output layer, zero biases:
    the scheme fedquic uses for cnn:mnist, so both runs start from the same distribution
    (the draws differ)."""
    for layer in [model.conv1, model.conv2, model.fc1]:
        nn.init.kaiming_uniform_(layer.weight, a=0.0, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    nn.init.xavier_uniform_(model.fc2.weight)
    nn.init.zeros_(model.fc2.bias)


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(directory, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    sys.exit(f"{stem} not found in {directory}")


def run_sim(binary, model, args, out_dir, export=None):
    command = [
        binary, "--model", model, "--data", f"mnist:{args.data}",
        "--clients", str(args.clients), "--fraction", str(args.fraction),
        "--rounds", str(args.rounds), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--seed", str(args.seed), "--out", out_dir, "--quiet",
    ]
    if export:
        command += ["--export-onnx", export]
    print("$", " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, check=True)
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    return results["final_test_accuracy"], time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory with the four MNIST IDX files")
    parser.add_argument("--sim", default="target/release/fedquic-sim")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="fedquic-onnx-")
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(args.seed)

    # 1. PyTorch defines and exports the model.
    model = FedAvgCnn()
    init_like_fedquic(model)
    model.eval()
    cnn_path = os.path.join(work, "cnn.onnx")
    torch.onnx.export(
        model, torch.zeros(1, 1, 28, 28), cnn_path, input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=13, dynamo=False,
    )
    print(f"PyTorch exported {cnn_path}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    # 2. fedquic federates it and exports the global model.
    trained_path = os.path.join(work, "federated.onnx")
    onnx_accuracy, onnx_seconds = run_sim(
        args.sim, f"onnx:{cnn_path}", args, os.path.join(work, "sim-onnx"), trained_path)
    print(f"fedquic (onnx:cnn.onnx): final test accuracy {100 * onnx_accuracy:.2f}% "
          f"in {onnx_seconds:.1f} s")

    # 3. Another runtime evaluates the exported result on the same test images.
    images = read_idx(find(args.data, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0
    labels = read_idx(find(args.data, "t10k-labels-idx1-ubyte")).astype(np.int64)
    images = images.reshape(-1, 1, 28, 28)
    graph = onnx.load(trained_path)
    names = ([i.name for i in graph.graph.input], [o.name for o in graph.graph.output])
    session = onnxruntime.InferenceSession(trained_path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": images})[0]
    ort_accuracy = float((logits.argmax(axis=1) == labels).mean())
    print(f"onnxruntime on the exported model (inputs/outputs {names}): "
          f"test accuracy {100 * ort_accuracy:.2f}% on {len(labels)} images")
    from onnx2torch import convert
    torch_model = convert(graph).eval()
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(images)).numpy()
    torch_accuracy = float((torch_logits.argmax(axis=1) == labels).mean())
    print(f"PyTorch (onnx2torch) on the exported model: test accuracy {100 * torch_accuracy:.2f}%")

    # 4. The same federation on fedquic's built-in definition.
    spec_accuracy, spec_seconds = run_sim(
        args.sim, "cnn:mnist", args, os.path.join(work, "sim-spec"))
    print(f"fedquic (cnn:mnist, same seed): final test accuracy {100 * spec_accuracy:.2f}% "
          f"in {spec_seconds:.1f} s")

    runtime_gap = abs(ort_accuracy - onnx_accuracy) * 100
    spec_gap = abs(spec_accuracy - onnx_accuracy) * 100
    print(f"onnxruntime vs fedquic: {runtime_gap:.2f} points; "
          f"onnx:cnn.onnx vs cnn:mnist: {spec_gap:.2f} points")
    ok = runtime_gap < 0.1 and spec_gap <= 0.5
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
