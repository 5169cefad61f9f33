#!/usr/bin/env python3
"""Side-by-side table for issue 10: `bench_train` outputs (one file per kernel path and
round) against `bench/pytorch_reference.py --json` outputs.

    python3 bench/side_by_side.py --ours avx512=a1.txt,a2.txt --ours avx2=b1.txt,b2.txt \
        --torch t1.json,t2.json

Prints a Markdown table: every round's samples/s per cell, and each path's ratio to
PyTorch, best against best (and, in brackets, median against median).

Both sides are reduced by the same statistic: `bench_train` prints the best of its three
timed calls, so PyTorch's cell in a round is the best of its repeats too (its JSON's
`samples_per_s` is their median). On a shared VM a neighbour only ever slows a run down,
so each side's best round is the closest to what the machine can do; the medians show
how much the rounds moved. `bench/side_by_side.sh` runs the rounds and this script.
"""
import argparse
import json
import re
import statistics

ROW = re.compile(r"^(\S+)\s+(train|infer)\s+(\d+)\s+(\d+)\s")
THREADS = re.compile(r"^CPU threads: (\d+)")


def ours(path):
    """{(model, mode, batch, threads): samples/s} from one bench_train output."""
    cells, threads = {}, None
    with open(path) as f:
        for line in f:
            m = THREADS.match(line)
            if m:
                threads = int(m.group(1))
                continue
            m = ROW.match(line)
            if m and threads is not None:
                model, mode, batch, rate = m.groups()
                cells[(model, mode, int(batch), threads)] = int(rate)
    return cells


def torch(path):
    with open(path) as f:
        data = json.load(f)
    cells = {}
    for run in data["runs"]:
        for r in run["results"]:
            key = (r["model"], r["mode"], r["batch"], run["threads"])
            # The best repeat, as bench_train reports its best timed call.
            cells[key] = max(r.get("repeat_samples_per_s") or [r["samples_per_s"]])
    return cells


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", action="append", required=True, help="NAME=FILE,FILE...")
    parser.add_argument("--torch", required=True, help="FILE,FILE... (JSON)")
    args = parser.parse_args()
    paths = []
    for spec in args.ours:
        name, files = spec.split("=", 1)
        paths.append((name, [ours(f) for f in files.split(",")]))
    reference = [torch(f) for f in args.torch.split(",")]
    keys = sorted(
        set().union(*(set(c) for _, runs in paths for c in runs)) & set().union(*reference),
        key=lambda k: (k[0] != "cnn:mnist", k[0], k[1] == "train", k[2], k[3]),
    )
    names = [name for name, _ in paths]
    head = ["model", "mode", "batch", "thr"] + names + ["PyTorch"] + [f"{n} ratio" for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    fmt = lambda values: " / ".join(f"{v:,.0f}" for v in values)
    for key in keys:
        torch_values = [r[key] for r in reference if key in r]
        torch_best, torch_median = max(torch_values), statistics.median(torch_values)
        cells, ratios = [], []
        for _, runs in paths:
            values = [r[key] for r in runs if key in r]
            cells.append(fmt(values) if values else "-")
            ratios.append(
                f"**{max(values) / torch_best:.2f}x** ({statistics.median(values) / torch_median:.2f}x)"
                if values
                else "-"
            )
        model, mode, batch, threads = key
        print(
            f"| `{model}` | {mode} | {batch} | {threads} | "
            + " | ".join(cells)
            + f" | {fmt(torch_values)} | "
            + " | ".join(ratios)
            + " |"
        )


if __name__ == "__main__":
    main()
