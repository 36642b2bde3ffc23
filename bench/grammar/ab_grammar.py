#!/usr/bin/env python3
"""Before/after for bench_grammar on a noisy machine: runs this tree's bench_grammar and a
baseline build's (an older commit's bench_grammar, batch 1 only) alternately (ABBA), and prints
the medians per case as a markdown table (bench/results/grammar.md).

Usage: ab_grammar.py BASELINE_BENCH [--runs 3] [--model models/default.gguf] [--walks 10]
                     [--groups 2]
BASELINE_BENCH: e.g. a build of the commit before (git archive REV | tar -x -C DIR; cmake; make
bench_grammar)."""
import argparse
import pathlib
import statistics
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def rows(out):
    for line in out.splitlines():
        if line.startswith("| json"):
            yield [x.strip() for x in line.strip().strip("|").split("|")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--walks", default="10")
    ap.add_argument("--groups", default="2")
    a = ap.parse_args()
    new, old, digests = {}, {}, set()
    for r in range(a.runs):
        for which in (("new", "old") if r % 2 == 0 else ("old", "new")):
            if which == "new":
                out = subprocess.run([str(ROOT / "build" / "bench_grammar"), a.model, a.walks,
                                      a.groups], capture_output=True, text=True, check=True).stdout
                for c in rows(out):
                    new.setdefault((c[0], c[1], c[2]), []).append(c)
                digests |= {ln.split(":")[1].strip() for ln in out.splitlines() if "digests" in ln}
            else:
                out = subprocess.run([a.baseline, a.model, a.walks], capture_output=True,
                                     text=True, check=True).stdout
                for c in rows(out):
                    old.setdefault(c[0], []).append(c)
    med = statistics.median
    print("| case | batch | build / keys | tokens | hit rate | mask mean us | mask p50 us | "
          "step masks mean us | states/matcher |\n|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for case in dict.fromkeys(k[0] for k in new):
        if case in old:
            o = old[case]
            print(f"| {case} | 1 | before | {o[0][1]} | {o[0][2]} | "
                  f"{med(float(x[3]) for x in o):.0f} | {med(float(x[4]) for x in o):.1f} | | "
                  f"{o[0][7]} |")
        for b in ("1", "16"):
            for mode in ("state", "mask", "mask+shared"):
                v = new.get((case, b, mode))
                if v:
                    print(f"| {case} | {b} | after / {mode} | {v[0][3]} | {v[0][4]} | "
                          f"{med(float(x[5]) for x in v):.0f} | {med(float(x[6]) for x in v):.1f} | "
                          f"{med(float(x[8]) for x in v):.0f} | {v[0][11]} |")
    print(f"\n{a.runs} runs of each build, medians. Mask digests of this tree's batch-1 walks: "
          f"{', '.join(sorted(digests))}")


if __name__ == "__main__":
    main()
