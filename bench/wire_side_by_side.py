#!/usr/bin/env python3
"""The table of bench/wire_side_by_side.sh: per point (K, P), every pair's seconds
per round for fedquic and Flower, the speed-up per pair, the median speed-up (ratio
of the medians), and the distance of our median to the floor that `wire_floor`
measured in the same session. Prints Markdown; exits non-zero when a run failed.

    python3 bench/wire_side_by_side.py OUT_DIR
"""
import re
import statistics
import sys
from pathlib import Path

MEDIAN = re.compile(r"median seconds per round:\s*([0-9.]+)")
FILE = re.compile(r"(ours|flower)_(\d+)_(\d+)_(\d+)\.txt$")
FLOOR_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+\d+\s+([0-9.]+)\s*$")
PER_BYTE = re.compile(r"Floor at the cheaper size, ([0-9.]+) ns per byte")
TARGET = 3.3


def median_of(path):
    match = MEDIAN.search(path.read_text(errors="replace"))
    return float(match.group(1)) if match else None


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    runs = {}  # (k, p) -> pair -> {side: seconds}
    failed = []
    for path in sorted(out.glob("*.txt")):
        match = FILE.match(path.name)
        if not match:
            continue
        side, k, p, pair = match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4))
        seconds = median_of(path)
        if seconds is None or seconds <= 0:
            failed.append(path.name)
            continue
        runs.setdefault((k, p), {}).setdefault(pair, {})[side] = seconds
    floors, per_byte = {}, None
    floor_file = out / "floor.txt"
    if floor_file.exists():
        text = floor_file.read_text(errors="replace")
        if m := PER_BYTE.search(text):
            per_byte = float(m.group(1))
        for line in text.splitlines():
            if m := FLOOR_ROW.match(line):
                floors[(int(m.group(1)), int(m.group(2)))] = float(m.group(3))
    machine = out / "machine.txt"
    if machine.exists():
        print(machine.read_text().strip().replace("\n", "; "))
        print()
    print("| K | P | fedquic s/round (per pair) | Flower s/round (per pair) "
          "| speed-up per pair | median speed-up | floor | ours / floor |")
    print("|---|---|---|---|---|---|---|---|")
    below = []
    for (k, p) in sorted(runs, key=lambda kp: (kp[1] * kp[0], kp[0])):
        pairs = [v for _, v in sorted(runs[(k, p)].items()) if "ours" in v and "flower" in v]
        if not pairs:
            continue
        ours = [v["ours"] for v in pairs]
        flower = [v["flower"] for v in pairs]
        ratios = [f / o for o, f in zip(ours, flower)]
        median = statistics.median(flower) / statistics.median(ours)
        floor = floors.get((k, p))
        floor_cells = (f"{floor:.3f} s", f"{statistics.median(ours) / floor:.1f}x") if floor else ("-", "-")
        print(f"| {k} | {p:,} | {', '.join(f'{s:.3f}' for s in ours)} "
              f"| {', '.join(f'{s:.3f}' for s in flower)} "
              f"| {', '.join(f'{r:.1f}x' for r in ratios)} | **{median:.1f}x** "
              f"| {floor_cells[0]} | {floor_cells[1]} |")
        if median < TARGET:
            below.append(f"K={k} P={p}: median {median:.2f}x")
        below += [f"K={k} P={p}: one pair {r:.2f}x" for r in ratios if r < TARGET and median >= TARGET]
    print()
    if per_byte:
        print(f"Floor: {per_byte} ns of CPU per byte (wire_floor, same session), over 2 x K x P x 4 bytes and the cores.")
    print(f"Below the {TARGET}x target: " + ("; ".join(below) if below else "none"))
    if failed:
        print("FAILED runs (no median in the output): " + ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
