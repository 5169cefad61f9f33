#!/usr/bin/env python3
"""Tabulates bench/population.sh's runs as Markdown (stdout)."""
import csv
import re
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/population")


def load(name):
    d = out / name
    if not (d / "time.txt").exists():
        return None
    time = (d / "time.txt").read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", time).group(1)
    parts = [float(p) for p in wall.split(":")]
    wall_s = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rows = list(csv.DictReader(open(d / "rounds.csv")))
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    phase = [float(r["seconds"]) for r in rows]
    per_round = [b - a for a, b in zip(elapsed, elapsed[1:])]
    stdout = (d / "stdout.txt").read_text()
    m = re.search(r"materialised (\d+) client sessions", stdout)
    acc = rows[-1]["test_accuracy"]
    return {
        "command": (d / "command.txt").read_text().strip(),
        "rss_mb": rss_kb / 1024,
        "wall": wall_s,
        "rounds": len(rows),
        # Round 1 also carries start-up; the steady state is rounds 2..R.
        "round_wall": statistics.median(per_round) if per_round else elapsed[0],
        "round_phase": statistics.median(phase[1:] or phase),
        "selected": rows[-1]["clients_selected"],
        "materialised": int(m.group(1)) if m else None,
        "accuracy": 100 * float(acc) if acc else None,
    }


runs = {n: load(n) for n in [
    "pop_10k", "pop_100k", "pop_1m", "pop_10m", "floor_1m", "e5_1m",
    "all_1000", "all_2000", "small_10k", "small_100k"]}
machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else "?"
print(f"Machine: {machine}\n")
print("| run | clients | per round | peak memory (MB) | s/round (median, rounds 2-10) | "
      "of which the round itself | sessions created | final accuracy (%) | total s |")
print("|---|---|---|---|---|---|---|---|---|")
labels = {
    "pop_10k": "2NN, 600 ex/client", "pop_100k": "2NN, 600 ex/client",
    "pop_1m": "2NN, 600 ex/client", "pop_10m": "2NN, 600 ex/client",
    "floor_1m": "2NN, 1 ex/client (floor)", "e5_1m": "2NN, 600 ex/client, E = 5",
    "all_1000": "2NN, all connected",
    "all_2000": "2NN, all connected", "small_10k": "logreg, 10 ex/client",
    "small_100k": "logreg, 10 ex/client",
}
for name, r in runs.items():
    if r is None:
        continue
    clients = re.search(r"--clients (\d+)", r["command"]).group(1)
    acc = f"{r['accuracy']:.2f}" if r["accuracy"] is not None else "-"
    print(f"| {labels[name]} | {int(clients):,} | {r['selected']} | {r['rss_mb']:.0f} | "
          f"{r['round_wall']:.2f} | {r['round_phase']:.2f} | {r['materialised'] or '-'} | "
          f"{acc} | {r['wall']:.1f} |")
print()
p10k, p10m, f1m, p1m = runs["pop_10k"], runs["pop_10m"], runs["floor_1m"], runs["pop_1m"]
if p10k and p10m:
    per = (p10m["rss_mb"] - p10k["rss_mb"]) * 1024 * 1024 / (10_000_000 - 10_000)
    print(f"- Memory per idle client, selected: ({p10m['rss_mb']:.0f} - {p10k['rss_mb']:.0f}) MB "
          f"over 9,990,000 more clients = {per:.1f} bytes.")
a1, a2 = runs["all_1000"], runs["all_2000"]
if a1 and a2:
    per = (a2["rss_mb"] - a1["rss_mb"]) * 1024 / 1000
    print(f"- Memory per idle client, all connected: ({a2['rss_mb']:.0f} - {a1['rss_mb']:.0f}) MB "
          f"over 1,000 more clients = {per:.0f} KB.")
for name in ["pop_1m", "e5_1m"]:
    r = runs.get(name)
    if f1m and r:
        share = 1 - f1m["round_wall"] / r["round_wall"]
        print(f"- Local work's share of a 1M-client round ({name}): 1 - {f1m['round_wall']:.2f} / "
              f"{r['round_wall']:.2f} = {100 * share:.0f}% (the floor run keeps everything but "
              f"the examples: check-in, transfers, aggregation, central evaluation).")
if f1m:
    print(f"- Check-in (certificates, handshakes, the cohort draw) between rounds at 1M with one "
          f"example each: {f1m['round_wall'] - f1m['round_phase']:.2f} s a round.")
print()
for name, r in runs.items():
    if r:
        print(f"- `{name}`: `{r['command']} --out DIR`")
