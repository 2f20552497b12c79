#!/usr/bin/env python3
"""Where a decode step's device time goes, kernel by kernel.

Reads the CSV that `ncu --metrics gpu__time_duration.sum --csv --print-units base` writes for
the decode bench's `SPARSEKV_BENCH_PROFILE` run (the session script's NCUSTEP part), finds the
last whole step (the launch sequence repeats from step to step), and prints the step's kernel
time summed by kernel name, largest first, with launch counts and grid x block shapes.

    python3 scripts/ncu_step.py ncu_step_sparse.csv [ncu_step_dense.csv]

Given two files, the second's sums are printed beside the first's.
"""
import collections
import csv
import sys


def launches(path):
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    rows = []
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r["Kernel Name"].split("(")[0].split("<")[0].strip()
        ns = float(r["Metric Value"].replace(",", ""))
        rows.append((name, ns, f'{r["Grid Size"]}x{r["Block Size"]}'))
    return rows


def last_step(rows):
    """The last `L` launches, for the smallest `L` whose names repeat three times at the end."""
    names = [r[0] for r in rows]
    n = len(names)
    for period in range(20, n // 3 + 1):
        a, b, c = names[n - period:], names[n - 2 * period:n - period], names[n - 3 * period:n - 2 * period]
        if a == b == c:
            return rows[n - period:]
    raise SystemExit(f"no repeating step found in {n} launches")


def summary(path):
    step = last_step(launches(path))
    sums = collections.defaultdict(lambda: [0, 0.0, set()])
    for name, ns, shape in step:
        s = sums[name]
        s[0] += 1
        s[1] += ns
        s[2].add(shape)
    return len(step), sum(r[1] for r in step), sums


def main():
    first = summary(sys.argv[1])
    other = summary(sys.argv[2]) if len(sys.argv) > 2 else None
    n, total, sums = first
    print(f"{sys.argv[1]}: a step of {n} launches, {total / 1e6:.3f} ms of kernel time")
    if other:
        print(f"{sys.argv[2]}: a step of {other[0]} launches, {other[1] / 1e6:.3f} ms")
    names = sorted(set(sums) | set(other[2] if other else ()), key=lambda k: -sums[k][1])
    for name in names:
        count, ns, shapes = sums[name]
        line = f"{name:36s} {count:5d} x {ns / 1e3:10.1f} us"
        if other:
            oc, ons, _ = other[2][name]
            line += f"   | {oc:5d} x {ons / 1e3:10.1f} us   diff {(ns - ons) / 1e3:+9.1f} us"
        print(line + "   " + " ".join(sorted(shapes)[:3]))


if __name__ == "__main__":
    main()
