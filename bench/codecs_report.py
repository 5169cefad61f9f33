#!/usr/bin/env python3
"""Table and plots for bench/codecs.sh (python3 standard library only).

Usage: codecs_report.py OUT_DIR

Reads OUT_DIR/<model>/<partition>/<codec>/seed<N>/{rounds.csv,codec.txt} and
writes OUT_DIR/report.md (final accuracy, rounds to target, bytes up per round:
mean +- sample std over seeds, each codec against f32 of the same setup) and
OUT_DIR/<model>-<partition>.svg (test accuracy per round, mean over seeds).
"""

import csv
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learning_quality_report import mean_curve, svg_plot  # noqa: E402

TARGETS = {"mlp": 0.85, "cnn": 0.90}
MODELS = {"mlp": "2NN (mlp:784-200-200-10)", "cnn": "CNN (cnn:mnist)"}
ORDER = ["f32", "f16", "bf16", "int8", "top-k:0.01", "top-k:0.01+int8", "top-k:0.05+int8",
         "f32@lr3", "top-k:0.01@lr3", "top-k:0.01+int8@lr3", "f32@down-f16", "f32@down-bf16",
         "f32@adagrad", "top-k:0.01@adagrad",
         "f32@r250", "top-k:0.01@r250", "f32@r30", "top-k:0.01@r30"]


def load(out):
    runs = {}
    for model in sorted(os.listdir(out)):
        mdir = os.path.join(out, model)
        if not os.path.isdir(mdir):
            continue
        for part in sorted(os.listdir(mdir)):
            for cdir in sorted(os.listdir(os.path.join(mdir, part))):
                for seed in sorted(os.listdir(os.path.join(mdir, part, cdir))):
                    d = os.path.join(mdir, part, cdir, seed)
                    rounds = os.path.join(d, "rounds.csv")
                    if not os.path.isfile(rounds) or os.path.getsize(rounds) == 0:
                        continue
                    codec = open(os.path.join(d, "codec.txt")).read().strip()
                    with open(rounds) as f:
                        rows = list(csv.DictReader(f))
                    runs.setdefault((model, part, codec), []).append({
                        "acc": [float(r["test_accuracy"]) if r["test_accuracy"] else math.nan
                                for r in rows],
                        "up": statistics.mean(float(r["bytes_up"]) for r in rows),
                        "down": statistics.mean(float(r["bytes_down"]) for r in rows),
                        "seconds": sum(float(r["seconds"]) for r in rows),
                    })
    return runs


def sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def rounds_to(acc, target):
    for i, a in enumerate(acc):
        if not math.isnan(a) and a >= target:
            return i + 1
    return math.nan


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: codecs_report.py OUT_DIR")
    out = sys.argv[1]
    runs = load(out)
    md = []
    machine = os.path.join(out, "machine.txt")
    if os.path.isfile(machine):
        md.append(f"Machine: {open(machine).read().strip()}\n")
    setups = sorted({(m, p) for (m, p, _) in runs}, key=lambda s: (s[0] != "mlp", s[1]))
    for model, part in setups:
        target = TARGETS.get(model, 0.85)
        md.append(f"### {MODELS.get(model, model)}, {part}\n")
        md.append(f"| codec (@lr3: server lr 3; @adagrad: FedAdagrad, lr 0.01) | seeds | final test accuracy (%) | vs f32 (points) | rounds to "
                  f"{target:.0%} | bytes up per round | vs f32 | bytes down per round | wall (s) |")
        md.append("|---|---|---|---|---|---|---|---|---|")
        def base_of(codec):
            """f32 at the same server setting (the part after '@'; a downlink
            codec compares with plain f32)."""
            variant = codec.partition("@")[2]
            if variant.startswith("down-"):
                variant = ""
            base = runs.get((model, part, "f32" + (f"@{variant}" if variant else "")))
            if not base:
                return math.nan, math.nan
            return (statistics.mean(s["acc"][-1] for s in base),
                    statistics.mean(s["up"] for s in base))
        codecs = sorted({c for (m, p, c) in runs if (m, p) == (model, part)},
                        key=lambda c: ORDER.index(c) if c in ORDER else 99)
        series = []
        for codec in codecs:
            seeds = runs[(model, part, codec)]
            final = [s["acc"][-1] * 100 for s in seeds]
            reach = [rounds_to(s["acc"], target) for s in seeds]
            reached = [r for r in reach if not math.isnan(r)]
            reach_cell = (f"{statistics.mean(reached):.1f} ± {sd(reached):.1f}" if reached else "-")
            if len(reached) < len(reach):
                reach_cell += f" ({len(reach) - len(reached)} of {len(reach)} never)"
            up = statistics.mean(s["up"] for s in seeds)
            base_acc, base_up = base_of(codec)
            md.append(
                f"| {codec} | {len(seeds)} | {statistics.mean(final):.2f} ± {sd(final):.2f} | "
                f"{statistics.mean(final) - base_acc * 100:+.2f} | {reach_cell} | {up:,.0f} | "
                f"{base_up / up:.1f}x fewer | {statistics.mean(s['down'] for s in seeds):,.0f} | "
                f"{statistics.mean(s['seconds'] for s in seeds):.1f} |")
            series.append((codec, mean_curve(seeds)))
        md.append("")
        svg_plot(os.path.join(out, f"{model}-{part}.svg"),
                 f"{MODELS.get(model, model)}, {part}: test accuracy by uplink codec", series)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
