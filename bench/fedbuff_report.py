#!/usr/bin/env python3
"""Table and plot for bench/fedbuff.sh (python3 standard library only).

Usage: fedbuff_report.py OUT_DIR [TARGET]

Reads OUT_DIR/<mode>/seed<N>/rounds.csv and writes OUT_DIR/report.md: per mode,
wall time to TARGET test accuracy (default 0.85; elapsed seconds since the
aggregator started, so straggler waits and link time count), updates folded
by then, final accuracy, and the speed-up of FedBuff over sync; and
OUT_DIR/accuracy-by-time.svg (mean test accuracy against wall time).
"""

import csv
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learning_quality_report import COLOURS  # noqa: E402


def load(out):
    runs = {}
    for mode in sorted(os.listdir(out)):
        mdir = os.path.join(out, mode)
        if not os.path.isdir(mdir):
            continue
        for seed in sorted(os.listdir(mdir)):
            path = os.path.join(mdir, seed, "rounds.csv")
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                continue
            with open(path) as f:
                rows = list(csv.DictReader(f))
            runs.setdefault(mode, []).append([
                (float(r["elapsed_seconds"]),
                 float(r["test_accuracy"]) if r["test_accuracy"] else math.nan,
                 int(r["clients_answered"]))
                for r in rows
            ])
    return runs


def to_target(rows, target):
    updates = 0
    for t, acc, answered in rows:
        updates += answered
        if not math.isnan(acc) and acc >= target:
            return t, updates
    return math.nan, math.nan


def cell(values, prec=1):
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "never"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    missing = f" ({len(values) - len(v)} never)" if len(v) < len(values) else ""
    return f"{statistics.mean(v):.{prec}f} ± {sd:.{prec}f}{missing}"


def svg(path, series, title):
    w, h, left, right, top, bottom = 760, 440, 60, 150, 36, 46
    pw, ph = w - left - right, h - top - bottom
    tmax = max((t for _, runs in series for rows in runs for t, _, _ in rows), default=1.0)
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>']
    for i in range(0, 11):
        y = top + ph - ph * i / 10
        lines.append(f'<line x1="{left}" y1="{y}" x2="{left + pw}" y2="{y}" stroke="#ddd"/>')
        lines.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{i / 10:.1f}</text>')
    for i in range(0, 6):
        x = left + pw * i / 5
        lines.append(f'<text x="{x}" y="{top + ph + 16}" text-anchor="middle">{tmax * i / 5:.0f}</text>')
    lines.append(f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">wall time (s)</text>')
    for k, (label, runs) in enumerate(series):
        c = COLOURS[k % len(COLOURS)]
        for rows in runs:
            pts = [f"{left + pw * t / tmax:.1f},{top + ph - ph * min(max(a, 0.0), 1.0):.1f}"
                   for t, a, _ in rows if not math.isnan(a)]
            lines.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.4" points="{" ".join(pts)}"/>')
        ly = top + 14 + 16 * k
        lines.append(f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 30}" y2="{ly - 4}" stroke="{c}" stroke-width="2"/>')
        lines.append(f'<text x="{left + pw + 36}" y="{ly}">{label}</text>')
    lines.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: fedbuff_report.py OUT_DIR [TARGET]")
    out = sys.argv[1]
    target = float(sys.argv[2]) if len(sys.argv) == 3 else 0.85
    runs = load(out)
    md = []
    machine = os.path.join(out, "machine.txt")
    if os.path.isfile(machine):
        md.append(f"Machine: {open(machine).read().strip()}\n")
    md.append(f"| mode | seeds | seconds to {target:.0%} | updates folded by then | "
              "final test accuracy (%) | total wall (s) | updates in all |")
    md.append("|---|---|---|---|---|---|---|")
    times = {}
    for mode, seeds in runs.items():
        reach = [to_target(rows, target) for rows in seeds]
        times[mode] = [t for t, _ in reach]
        md.append(f"| {mode} | {len(seeds)} | {cell(times[mode])} | {cell([u for _, u in reach], 0)} | "
                  f"{cell([rows[-1][1] * 100 for rows in seeds], 2)} | "
                  f"{cell([rows[-1][0] for rows in seeds])} | "
                  f"{cell([sum(a for _, _, a in rows) for rows in seeds], 0)} |")
    if "sync" in times and "fedbuff" in times:
        pairs = [(s, f) for s, f in zip(times["sync"], times["fedbuff"])
                 if not (math.isnan(s) or math.isnan(f))]
        if pairs:
            speedups = [s / f for s, f in pairs]
            md.append("")
            md.append(f"FedBuff reaches {target:.0%} {statistics.mean(speedups):.2f}x sooner "
                      f"(per seed: {', '.join(f'{x:.2f}x' for x in speedups)}).")
    svg(os.path.join(out, "accuracy-by-time.svg"), sorted(runs.items()),
        f"Test accuracy against wall time (target {target:.0%})")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
