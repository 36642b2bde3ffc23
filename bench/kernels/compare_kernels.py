#!/usr/bin/env python3
"""Before/after kernel times of two bench_kernels binaries, measured alternately in one run.

Runs BEFORE and AFTER alternately ROUNDS times with the same arguments (e.g. --threads 1
--cpu-time --n-in 640 --types Q8_0,Q5_0), takes per format and T the median of the time of one
matrix (T=1 ms per matrix x relative time) and writes a markdown table with after/before.

usage: compare_kernels.py BEFORE_BIN AFTER_BIN [--rounds N] [--md OUT] [--label TEXT] -- ARGS...
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(binary, args):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run([binary, *args, "--json", out], check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def times(r):
    """{(type, isa, T): ms per matrix}"""
    out = {}
    for x in r["results"]:
        for t, rel in x["rel_time"].items():
            out[(x["type"], x["isa"], int(t))] = x["t1_ms_per_matrix"] * rel
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md")
    ap.add_argument("--label", default="")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    args = argv[cut + 1:]
    runs = {"before": [], "after": []}
    meta = None
    for i in range(a.rounds):
        for name, binary in (("before", a.before), ("after", a.after)):
            r = run(binary, args)
            meta = meta or r
            runs[name].append(times(r))
            print(f"round {i + 1} {name} done", file=sys.stderr, flush=True)
    keys = sorted(runs["before"][0].keys(), key=lambda k: (k[0], k[1], k[2]))
    lines = [f"# bench_kernels before/after{(': ' + a.label) if a.label else ''}", "",
             f"CPU: {meta['cpu']}, {meta['threads']} thread(s), matrices of n_in "
             f"{meta['n_in']}, {'process CPU' if meta.get('cpu_time') else 'wall-clock'} time; "
             f"arguments `{' '.join(args)}`; {a.rounds} alternating rounds, medians "
             "[min..max] of ms per 4096-row matrix.", "",
             "| format | path | T | before ms | after ms | after/before |", "|---|---|---|---|---|---|"]
    for k in keys:
        b = [r[k] for r in runs["before"]]
        f = [r[k] for r in runs["after"] if k in r]
        if not f:
            continue
        mb, mf = statistics.median(b), statistics.median(f)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {mb:.3f} [{min(b):.3f}..{max(b):.3f}] | "
                     f"{mf:.3f} [{min(f):.3f}..{max(f):.3f}] | {mf / mb:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
