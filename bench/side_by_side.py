#!/usr/bin/env python3
"""Side-by-side table for issue 10: `bench_train` outputs (one file per kernel path and
round) against `bench/pytorch_reference.py --json` outputs.

    python3 bench/side_by_side.py --ours auto=a1.txt,a2.txt --ours avx2=b1.txt,b2.txt \
        --torch auto=t1.json,t2.json --torch avx2=u1.json,u2.json

Prints a Markdown table: every round's samples/s per cell, and each path's ratio to
PyTorch, best against best (and, in brackets, median against median). Each `--ours` path
is compared with the `--torch` runs of the same name, or with the first `--torch` when
none has its name: a forced-AVX2 run of ours against PyTorch forced to AVX2 is what a
CPU without AVX-512 gives both sides.

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
    parser.add_argument("--torch", action="append", required=True, help="NAME=FILE,FILE... (JSON)")
    args = parser.parse_args()
    paths = []
    for spec in args.ours:
        name, files = spec.split("=", 1)
        paths.append((name, [ours(f) for f in files.split(",")]))
    references = {}
    for spec in args.torch:
        name, files = spec.split("=", 1)
        references[name] = [torch(f) for f in files.split(",")]
    first = next(iter(references))
    pairing = [(name, runs, name if name in references else first) for name, runs in paths]
    keys = sorted(
        set().union(*(set(c) for _, runs in paths for c in runs))
        & set().union(*(set(c) for runs in references.values() for c in runs)),
        key=lambda k: (k[0] != "cnn:mnist", k[0], k[1] == "train", k[2], k[3]),
    )
    head = (
        ["model", "mode", "batch", "thr"]
        + [f"ours {n}" for n, _, _ in pairing]
        + [f"PyTorch {n}" for n in references]
        + [f"{n} / PyTorch {r}" for n, _, r in pairing]
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    fmt = lambda values: " / ".join(f"{v:,.0f}" for v in values)
    for key in keys:
        torch_values = {n: [r[key] for r in runs if key in r] for n, runs in references.items()}
        cells, ratios = [], []
        for _, runs, reference in pairing:
            values = [r[key] for r in runs if key in r]
            base = torch_values[reference]
            cells.append(fmt(values) if values else "-")
            ratios.append(
                f"**{max(values) / max(base):.2f}x** ({statistics.median(values) / statistics.median(base):.2f}x)"
                if values and base
                else "-"
            )
        model, mode, batch, threads = key
        print(
            f"| `{model}` | {mode} | {batch} | {threads} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(fmt(v) if v else "-" for v in torch_values.values())
            + " | "
            + " | ".join(ratios)
            + " |"
        )


if __name__ == "__main__":
    main()
