#!/usr/bin/env python3
"""Tables for BENCHMARKS.md "Privacy" from bench/privacy.sh's results.

    python3 bench/privacy_report.py [bench/results/privacy]
"""
import csv
import glob
import os
import re
import statistics
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "bench/results/privacy"


def cost_table():
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "cost", "*.txt"))):
        name = os.path.basename(path)[:-4]
        m = re.match(r"K(\d+)_P(\w+)_(plain|secagg)_(\d+)", name)
        if not m:
            continue
        text = open(path).read()
        sec = re.search(r"median seconds per round: ([\d.]+)", text)
        byt = re.search(r"bytes per client per round \(median\): ([\d.]+)", text)
        if not sec or not byt:
            continue
        key = (int(m.group(1)), m.group(2), m.group(3))
        runs.setdefault(key, []).append((float(sec.group(1)), float(byt.group(1))))
    if not runs:
        return
    print("| K | P | mode | s/round (median of runs) | runs | bytes/client/round | time vs plain | bytes vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    for (k, p, mode) in sorted(runs, key=lambda x: (x[1], x[0], x[2])):
        vals = runs[(k, p, mode)]
        s = statistics.median(v[0] for v in vals)
        b = statistics.median(v[1] for v in vals)
        plain = runs.get((k, p, "plain"))
        rt = rb = ""
        if mode == "secagg" and plain:
            ps = statistics.median(v[0] for v in plain)
            pb = statistics.median(v[1] for v in plain)
            rt = f"{s / ps:.2f}x"
            rb = f"{b / pb:.3f}x"
        runs_txt = " ".join(f"{v[0]:.3f}" for v in vals)
        print(f"| {k} | {p} | {mode} | {s:.3f} | {runs_txt} | {b:,.0f} | {rt} | {rb} |")
    print()


def utility_table():
    rows = []
    for d in sorted(glob.glob(os.path.join(out, "utility", "*"))):
        label = os.path.basename(d)
        accs, eps, secs = [], [], []
        for seed_dir in sorted(glob.glob(os.path.join(d, "seed*"))):
            path = os.path.join(seed_dir, "rounds.csv")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                recs = list(csv.DictReader(f))
            if not recs:
                continue
            last = recs[-1]
            accs.append(float(last["test_accuracy"]) * 100)
            if last.get("epsilon"):
                eps.append(float(last["epsilon"]))
            secs.append(float(last["elapsed_seconds"]))
        if not accs:
            continue
        acc = f"{statistics.mean(accs):.2f}"
        if len(accs) > 1:
            acc += f" ± {statistics.stdev(accs):.2f}"
        e = f"{statistics.mean(eps):.3g}" if eps else "none (no DP)"
        rows.append((label, acc, e, len(accs), statistics.mean(secs)))
    if not rows:
        return
    print("| run | final test accuracy (%) | epsilon at delta 1e-5 after 50 rounds | seeds | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} |")
    print()


cost_table()
utility_table()
