#!/usr/bin/env python3
"""Tables and plots for bench/learning_quality.sh (python3 standard library only).

Usage: learning_quality_report.py OUT_DIR

Reads OUT_DIR/<group>/<name>/seed<N>/rounds.csv (+ wall_seconds.txt, faults.csv)
and writes OUT_DIR/report.md (markdown tables: mean +- sample std over seeds)
and OUT_DIR/<group>.svg (test accuracy per round, mean over seeds).
"""

import csv
import math
import os
import statistics
import sys

TARGET = 0.85


def load(out):
    runs = {}
    for group in sorted(os.listdir(out)):
        gdir = os.path.join(out, group)
        if not os.path.isdir(gdir):
            continue
        for name in sorted(os.listdir(gdir)):
            ndir = os.path.join(gdir, name)
            for seed in sorted(os.listdir(ndir)):
                rounds = os.path.join(ndir, seed, "rounds.csv")
                if not os.path.isfile(rounds) or os.path.getsize(rounds) == 0:
                    continue
                with open(rounds) as f:
                    rows = list(csv.DictReader(f))
                acc = [float(r["test_accuracy"]) if r["test_accuracy"] else math.nan for r in rows]
                wall = math.nan
                wpath = os.path.join(ndir, seed, "wall_seconds.txt")
                if os.path.isfile(wpath):
                    try:
                        wall = float(open(wpath).read().strip())
                    except ValueError:
                        pass
                faults = {}
                for col in ("faults_dropout", "faults_straggler", "faults_byzantine"):
                    faults[col] = sum(int(r.get(col) or 0) for r in rows)
                runs.setdefault((group, name), []).append(
                    {
                        "seed": seed,
                        "acc": acc,
                        "wall": wall,
                        "faults": faults,
                        "dropped": sum(int(r["clients_dropped"] or 0) for r in rows),
                        "rejected": sum(int(r["updates_rejected"] or 0) for r in rows),
                    }
                )
    return runs


def mean_sd(values, scale=1.0, prec=2):
    v = [x * scale for x in values if not math.isnan(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{prec}f}"
    return f"{statistics.mean(v):.{prec}f} ± {statistics.stdev(v):.{prec}f}"


def rounds_to(acc, target=TARGET):
    for i, a in enumerate(acc):
        if a >= target:
            return i + 1
    return None


def rounds_to_cell(seeds):
    hits = [rounds_to(s["acc"]) for s in seeds]
    reached = [h for h in hits if h is not None]
    if not reached:
        return f"not reached (0/{len(hits)})"
    cell = mean_sd([float(h) for h in reached], prec=1)
    if len(reached) < len(hits):
        cell += f" ({len(reached)}/{len(hits)} seeds)"
    return cell


def final(seeds):
    return [s["acc"][-1] for s in seeds if s["acc"]]


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def svg_plot(path, title, series, ylabel="test accuracy"):
    """series: list of (label, [y per round]); y in [0, 1]."""
    w, h, left, right, top, bottom = 760, 440, 60, 190, 36, 46
    pw, ph = w - left - right, h - top - bottom
    n = max((len(y) for _, y in series), default=1)
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for i in range(0, 11):
        y = top + ph - ph * i / 10
        lines.append(f'<line x1="{left}" y1="{y}" x2="{left + pw}" y2="{y}" stroke="#ddd"/>')
        lines.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{i / 10:.1f}</text>')
    for r in range(0, n + 1, max(1, n // 10)):
        x = left + pw * r / max(n, 1)
        lines.append(f'<text x="{x}" y="{top + ph + 16}" text-anchor="middle">{r}</text>')
    lines.append(f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">round</text>')
    lines.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
                 f'text-anchor="middle">{ylabel}</text>')
    lines.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    for k, (label, ys) in enumerate(series):
        c = COLOURS[k % len(COLOURS)]
        pts = [f"{left + pw * (i + 1) / n:.1f},{top + ph - ph * min(max(y, 0.0), 1.0):.1f}"
               for i, y in enumerate(ys) if not math.isnan(y)]
        if pts:
            lines.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{" ".join(pts)}"/>')
        ly = top + 14 + 16 * k
        lines.append(f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 30}" y2="{ly - 4}" '
                     f'stroke="{c}" stroke-width="2"/>')
        lines.append(f'<text x="{left + pw + 36}" y="{ly}">{label}</text>')
    lines.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def mean_curve(seeds):
    n = max(len(s["acc"]) for s in seeds)
    out = []
    for i in range(n):
        v = [s["acc"][i] for s in seeds if i < len(s["acc"]) and not math.isnan(s["acc"][i])]
        out.append(statistics.mean(v) if v else math.nan)
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: learning_quality_report.py OUT_DIR")
    out = sys.argv[1]
    runs = load(out)
    md = []
    machine = os.path.join(out, "machine.txt")
    if os.path.isfile(machine):
        md.append(f"Machine: {open(machine).read().strip()}\n")

    noniid = {n: s for (g, n), s in runs.items() if g == "noniid"}
    if noniid:
        md.append("### Non-IID (shards:2)\n")
        md.append("| strategy | seeds | final test accuracy (%) | rounds to 85% | wall time (s) |")
        md.append("|---|---|---|---|---|")
        order = ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold"]
        for name in sorted(noniid, key=lambda n: order.index(n) if n in order else 99):
            s = noniid[name]
            md.append(f"| {name} | {len(s)} | {mean_sd(final(s), 100)} | {rounds_to_cell(s)} | "
                      f"{mean_sd([x['wall'] for x in s], prec=1)} |")
        grid = os.path.join(out, "grid.csv")
        if os.path.isfile(grid):
            rows = list(csv.DictReader(open(grid)))
            md.append("\nServer learning-rate grid (tuning seed, mean test accuracy of the last 5 rounds):\n")
            md.append("| strategy | server lr: accuracy (%) |")
            md.append("|---|---|")
            by = {}
            for r in rows:
                by.setdefault(r["strategy"], []).append(
                    f"{r['server_lr']}: {float(r['last5_accuracy']) * 100:.2f}")
            for k, v in by.items():
                md.append(f"| {k} | {', '.join(v)} |")
        missing = os.path.join(out, "scaffold_missing.txt")
        if os.path.isfile(missing):
            md.append(f"\nSCAFFOLD: {open(missing).read().strip()}")
        svg_plot(os.path.join(out, "noniid.svg"), "MNIST 2NN, shards:2, mean of seeds",
                 [(n, mean_curve(noniid[n])) for n in sorted(
                     noniid, key=lambda n: order.index(n) if n in order else 99)])
        md.append("")

    byz = {n: s for (g, n), s in runs.items() if g == "byzantine"}
    if byz:
        attacks = ["clean", "sign-flip", "scale:10", "scale:-10", "gaussian:1", "alie", "label-flip"]
        defences = ["fedavg", "fedavg-noclip", "median", "trimmed", "krum", "multikrum", "bulyan", "normbounded"]
        md.append("### Byzantine clients (IID, 20% of clients), final test accuracy (%)\n")
        md.append("| defence | " + " | ".join(attacks) + " |")
        md.append("|---|" + "---|" * len(attacks))
        for d in defences:
            cells = []
            for a in attacks:
                s = byz.get(f"{a}.{d}")
                cells.append(mean_sd(final(s), 100, prec=1) if s else "-")
            md.append(f"| {d} | " + " | ".join(cells) + " |")
        md.append("\nDrops of more than 5 points below clean FedAvg (a defence that does not hold):\n")
        clean = byz.get("clean.fedavg")
        if clean:
            ref = statistics.mean(final(clean))
            bad = []
            for d in defences:
                for a in attacks[1:]:
                    s = byz.get(f"{a}.{d}")
                    if s and statistics.mean(final(s)) < ref - 0.05:
                        bad.append(f"{d} under {a}: {statistics.mean(final(s)) * 100:.1f}% "
                                   f"(clean FedAvg {ref * 100:.1f}%)")
            md.extend(f"- {b}" for b in bad) if bad else md.append("- none")
        for a in attacks[1:]:
            series = [(d, mean_curve(byz[f"{a}.{d}"])) for d in defences if f"{a}.{d}" in byz]
            if series:
                svg_plot(os.path.join(out, f"byzantine-{a.replace(':', '')}.svg"),
                         f"MNIST 2NN, IID, 20% Byzantine: {a}", series)
        md.append("")

    faults = {n: s for (g, n), s in runs.items() if g == "faults"}
    if faults:
        md.append("### Dropout and stragglers (IID, FedAvg)\n")
        md.append("| run | final test accuracy (%) | rounds to 85% | wall time (s) | injected dropouts | "
                  "stragglers | clients dropped (aggregator) | updates rejected |")
        md.append("|---|---|---|---|---|---|---|---|")
        for name in ["clean", "dropout0.3", "stragglers"]:
            s = faults.get(name)
            if not s:
                continue
            md.append(
                f"| {name} | {mean_sd(final(s), 100)} | {rounds_to_cell(s)} | "
                f"{mean_sd([x['wall'] for x in s], prec=1)} | "
                f"{mean_sd([float(x['faults']['faults_dropout']) for x in s], prec=1)} | "
                f"{mean_sd([float(x['faults']['faults_straggler']) for x in s], prec=1)} | "
                f"{mean_sd([float(x['dropped']) for x in s], prec=1)} | "
                f"{mean_sd([float(x['rejected']) for x in s], prec=1)} |")
        svg_plot(os.path.join(out, "faults.svg"), "MNIST 2NN, IID: dropout and stragglers",
                 [(n, mean_curve(faults[n])) for n in sorted(faults)])
        md.append("")

    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
