#!/usr/bin/env python3
"""Before/after throughput of two bench_model binaries, measured in one run on one machine.

Runs BEFORE and AFTER alternately ROUNDS times (so drift and neighbours hit both alike), takes
the median of each figure and writes a markdown table with the after/before ratio.

usage: compare_builds.py BEFORE_BIN AFTER_BIN [--model M] [--rounds N] [--md OUT] [--label TEXT]
                         [--args "ARGS for both"] [--after-args "ARGS for AFTER"]
Where bench_model reports CPU milliseconds per token (process CPU time; with --threads 1 the
cost of the engine on a machine other jobs share), those rows are added (lower is better).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(binary, model, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run([binary, model, "--json", out] + extra, check=True,
                       stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def figures(r):
    d = {f"decode batch {k}": v for k, v in r["decode"].items()}
    d["prefill 512"] = r["prefill_tps"]
    for k, v in r.get("decode_cpu_ms_per_token", {}).items():
        d[f"decode batch {k}, CPU ms/token"] = v
    if "prefill_cpu_ms_per_token" in r:
        d["prefill 512, CPU ms/token"] = r["prefill_cpu_ms_per_token"]
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--model", default="models/default.gguf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md")
    ap.add_argument("--label", default="")
    ap.add_argument("--after-args", default="", help="extra args for AFTER (e.g. --device cpu)")
    ap.add_argument("--args", default="", help="extra args for both (e.g. --threads 1)")
    a = ap.parse_args()
    runs = {"before": [], "after": []}
    for i in range(a.rounds):
        for name, binary, extra in (("before", a.before, a.args.split()),
                                    ("after", a.after, a.args.split() + a.after_args.split())):
            r = figures(run(binary, a.model, extra))
            runs[name].append(r)
            print(f"round {i + 1} {name}: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in r.items()), file=sys.stderr)
    keys = list(runs["before"][0].keys())
    lines = [f"# bench_model before/after{(': ' + a.label) if a.label else ''}", "",
             f"Model `{a.model}`, {a.rounds} alternating rounds per build in one run"
             f"{(', arguments `' + a.args + '`') if a.args else ''}, medians (tok/s; CPU "
             f"ms/token rows: lower is better).", "",
             "| figure | before | after | after/before |", "|---|---|---|---|"]
    for k in keys:
        b = statistics.median(r[k] for r in runs["before"])
        f = statistics.median(r[k] for r in runs["after"])
        lines.append(f"| {k} | {b:.2f} | {f:.2f} | {f / b:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
