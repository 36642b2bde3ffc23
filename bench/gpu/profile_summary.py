"""Summarise bench/gpu/profile.sh's Nsight Compute CSVs: per phase, time by kernel.

usage: profile_summary.py NCU_CSV [NCU_CSV...]

bench_model under profile.sh runs, in order: the 64-token context prefill of each sequence,
three decode steps (one warm-up, two timed) and four 512-token prefills. Phases are told apart
by the embedding kernel that opens every forward and by its grid (rows = tokens in the step).
Prints, per phase and per kernel name: launches per forward, microseconds per forward, the share
of the forward, and the DRAM bandwidth the kernel reached (bytes read / its duration)."""
import csv
import re
import sys
from collections import defaultdict


def kernels(path):
    rows = defaultdict(dict)
    order = []
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        k = r["ID"]
        if k not in rows:
            order.append(k)
            rows[k]["name"] = re.sub(r"[<(].*", "", r["Kernel Name"]).replace("void ", "")
            rows[k]["grid"] = r["Grid Size"]
        v = float(r["Metric Value"].replace(",", "") or 0)
        unit = r["Metric Unit"]
        if r["Metric Name"] == "gpu__time_duration.sum":
            rows[k]["us"] = v * {"ns": 1e-3, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(unit, 1)
        elif r["Metric Name"] == "dram__bytes_read.sum":
            scale = {"Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit, 1)
            rows[k]["bytes"] = v * scale
    return [rows[k] for k in order]


def forwards(ks):
    """Split at each embedding kernel; label each forward decode/prefill by its token count."""
    out, cur = [], None
    for k in ks:
        if k["name"].startswith("k_embed"):
            cur = []
            out.append((k["grid"], cur))
        if cur is not None:
            cur.append(k)
    return out


def report(path):
    fw = forwards(kernels(path))
    print(f"== {path}: {len(fw)} forwards")
    # decode: the forwards after the context prefills and before the 512-token prefills; take
    # the last decode forward and the last 512-token prefill as representative
    groups = defaultdict(list)
    for grid, ks in fw:
        groups[grid].append(ks)
    for grid, fl in groups.items():
        ks = fl[-1]
        tot = sum(k.get("us", 0) for k in ks)
        by = defaultdict(lambda: [0, 0.0, 0.0])
        for k in ks:
            b = by[k["name"]]
            b[0] += 1
            b[1] += k.get("us", 0)
            b[2] += k.get("bytes", 0)
        print(f"-- embed grid {grid}: {len(fl)} forwards like it; last one: {len(ks)} kernels, "
              f"{tot:.1f} us")
        for name, (n, us, by_) in sorted(by.items(), key=lambda x: -x[1][1]):
            bw = by_ / (us * 1e-6) / 1e9 if us else 0
            print(f"   {name:28s} {n:4d} x  {us:9.1f} us  {100 * us / tot:5.1f}%  {bw:7.0f} GB/s")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        report(p)
