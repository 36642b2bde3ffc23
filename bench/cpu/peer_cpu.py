#!/usr/bin/env python3
"""kr-serve's CPU engine vs llama.cpp's CPU build, one after the other in one run, same GGUF.

Each round runs, in turn and with the same thread count:
  kr-serve  bench_model: aggregate decode tok/s at BATCHES concurrent sequences (64-token
            context) and prefill of a 512-token prompt (--prefill-chunk, default 512 like
            llama-bench's ubatch);
  llama.cpp llama-bench: pp512 and tg128 (batch-1 decode);
            llama-batched-bench: S_TG (aggregate decode tok/s) at the same sequence counts, each
            sequence with a 64-token prompt and 32 generated tokens.
Rounds alternate the engines so that drift and neighbours on a shared machine hit both alike;
the table holds per engine the median (and the range) over rounds and the kr/llama ratio of the
medians. Needs only python3's standard library, the kr-serve build and the llama.cpp binaries
(../shared/peers/build-llama.sh cpu DIR builds them): no network, no packages.

usage: bench/cpu/peer_cpu.py --llama-bin DIR --model GGUF [--threads N] [--rounds R]
           [--batches 1,2,4,8,16,32] [--bench-model build/bench_model] [--md OUT] [--json OUT]
           [--prefill-chunk 512] [--timeout S] [--llama-reps N] [--llama-build LABEL]
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout):
    log(" ".join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.stdout


def kr_round(a):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        run([a.bench_model, a.model, "--threads", str(a.threads), "--batches", a.batches,
             "--prefill-chunk", str(a.prefill_chunk), "--json", out], a.timeout)
        with open(out) as f:
            r = json.load(f)
    finally:
        os.unlink(out)
    fig = {"decode batch 1": r["decode"]["1"], "prefill 512": r["prefill_tps"]}
    for b, v in r["decode"].items():
        fig[f"aggregate decode {b} seq"] = v
    fig["_bandwidth_gbs"] = r.get("bandwidth_gbs")
    return fig


def llama_round(a):
    fig = {}
    bench = os.path.join(a.llama_bin, "llama-bench")
    out = run([bench, "-m", a.model, "-t", str(a.threads), "-p", "512", "-n", "128", "-r",
               str(a.llama_reps), "-o", "json"], a.timeout)
    build = ""
    for t in json.loads(out):
        build = t.get("build_commit", build)
        if t.get("n_prompt") == 512 and t.get("n_gen") == 0:
            fig["prefill 512"] = t["avg_ts"]
        elif t.get("n_gen") == 128 and t.get("n_prompt") == 0:
            fig["decode batch 1"] = t["avg_ts"]
    npl = [int(x) for x in a.batches.split(",")]
    ctx = max(npl) * (64 + 32) + 256
    out = run([os.path.join(a.llama_bin, "llama-batched-bench"), "-m", a.model, "-t",
               str(a.threads), "-tb", str(a.threads), "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npp", "64", "-ntg", "32", "-npl", a.batches, "--output-format", "jsonl"],
              a.timeout)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            fig[f"aggregate decode {r['pl']} seq"] = r["speed_tg"]
    fig["_build"] = build
    return fig


def machine():
    info = {"platform": platform.platform(), "cpus_online": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        m = re.search(r"^model name\s*:\s*(.*)$", txt, re.M)
        info["cpu"] = m.group(1).strip() if m else "?"
        m = re.search(r"^flags\s*:\s*(.*)$", txt, re.M)
        flags = set(m.group(1).split()) if m else set()
        info["simd"] = " ".join(sorted(f for f in flags if re.match(
            r"(avx|amx|fma|f16c|sse4_2)", f)))
    except OSError:
        pass
    try:
        info["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", required=True, help="llama.cpp build's bin/ directory")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--bench-model", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "bench_model"))
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--llama-reps", type=int, default=2, help="llama-bench -r per round")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per program run")
    ap.add_argument("--llama-build", default="", help="label of the llama.cpp build (a tarball "
                    "build reports 'unknown'), e.g. d32676d")
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args()

    info = machine()
    runs = {"kr-serve": [], "llama.cpp": []}
    build = ""
    for i in range(a.rounds):
        order = (("kr-serve", kr_round), ("llama.cpp", llama_round))
        if i % 2:
            order = order[::-1]
        for name, fn in order:
            r = fn(a)
            build = r.pop("_build", build)
            r.pop("_bandwidth_gbs", None)
            runs[name].append(r)
            log(f"round {i + 1} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    if a.llama_build and build in ("", "unknown"):
        build = a.llama_build
    try:
        info["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass

    keys = ["decode batch 1"] + [f"aggregate decode {b} seq" for b in a.batches.split(",")
                                 if b != "1"] + ["prefill 512"]
    rows = []
    for k in keys:
        kv = [r[k] for r in runs["kr-serve"] if k in r]
        lv = [r[k] for r in runs["llama.cpp"] if k in r]
        if not kv or not lv:
            continue
        km, lm = statistics.median(kv), statistics.median(lv)
        rows.append({"figure": k, "kr": km, "kr_min": min(kv), "kr_max": max(kv), "llama": lm,
                     "llama_min": min(lv), "llama_max": max(lv), "ratio": km / lm})

    lines = [
        "# kr-serve CPU engine vs llama.cpp CPU (bench/cpu/peer_cpu.py)", "",
        f"Machine: {info.get('cpu', '?')}, {info['cpus_online']} CPUs online, SIMD flags: "
        f"{info.get('simd', '?')}; {info['platform']}. Load average at start "
        f"{' '.join(info.get('loadavg_start', []))}, at end {' '.join(info.get('loadavg_end', []))}.",
        "",
        f"Model `{a.model}`, {a.threads} threads each, {a.rounds} rounds alternating the engines; "
        f"llama.cpp build {build or '?'}. kr-serve: bench_model (decode with a 64-token context, "
        f"prefill in chunks of {a.prefill_chunk}); llama.cpp: llama-bench tg128 / pp512 and "
        "llama-batched-bench S_TG (-npp 64 -ntg 32). Median tok/s [min..max] over rounds.", "",
        "| figure | llama.cpp | kr-serve | kr / llama |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['llama']:.1f} [{r['llama_min']:.1f}..{r['llama_max']:.1f}]"
                     f" | {r['kr']:.1f} [{r['kr_min']:.1f}..{r['kr_max']:.1f}] | {r['ratio']:.2f}x |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "model": a.model, "threads": a.threads,
                       "llama_build": build, "rows": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
