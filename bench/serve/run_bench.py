#!/usr/bin/env python3
"""kr-serve serving benchmark: one server run, three scheduler modes, three workloads each.

For each mode (off, fixed with --fixed-batch, auto), switched at run time through
POST /admin/scheduler after the server went idle:
  (a) seq      --seq-n questions one after another (bench/serve/questions.txt)
  (b) cN       N concurrent clients for N in --clients (closed loop, --per-client requests each)
  (c) burst    --burst small requests (--burst-tokens) fired at once
Every request is a streamed chat completion with ignore_eos (so each generates exactly
max_tokens and the modes do the same work) at temperature 0.

Measured per (mode, workload), from the client side (see loadgen.py for the exact timestamps):
TTFT, TPOT, inter-token gap, end-to-end latency (P50/P95/P99), requests/s and generated
tokens/s over the workload's wall time, goodput = requests/s that met BOTH SLOs
(TTFT <= --slo-ttft, TPOT <= --slo-tpot), and batch efficiency from /stats sampled every 100 ms:
  batch_efficiency = mean over the samples taken while requests were queued (queue depth > 0)
                     of running / batch_limit
(1.0 = every batch slot was busy whenever work was waiting; undefined (null) when nothing ever
queued). mean_running is the mean running batch over the samples with running > 0.

Writes <out>/serve.json, <out>/serve.md and PNGs under <out>/serve/.
Usage: run_bench.py [--url URL | --exe build/krserve --model models/default.gguf] [--quick]"""
import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import loadgen  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pct(xs, q):
    """Nearest-rank percentile (the ceil(q*n)-th smallest), None when empty."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = max(1, math.ceil(q * len(xs)))
    return xs[k - 1]


def dist(xs, scale=1000.0):
    xs = [x for x in xs if x is not None]
    out = {"n": len(xs)}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        v = pct(xs, q)
        out[name] = None if v is None else round(v * scale, 2)
    out["mean"] = round(sum(xs) / len(xs) * scale, 2) if xs else None
    return out


def summarize(results, t0, t1, samples, slo_ttft, slo_tpot):
    ok = [r for r in results if r.ok]
    wall = t1 - t0
    toks = sum(r.completion_tokens or len(r.chunk_times) for r in ok)
    good = [r for r in ok if r.ttft is not None and r.ttft <= slo_ttft
            and (r.tpot is None or r.tpot <= slo_tpot)]
    itl = [g for r in ok for g in r.inter_token()]
    queued = [v for _, v in samples if (v.get("queued") or 0) > 0 and v.get("limit")]
    busy = [v["running"] for _, v in samples if (v.get("running") or 0) > 0]
    eff = (sum(min(1.0, v["running"] / v["limit"]) for v in queued) / len(queued)) if queued else None
    errors = {}
    for r in results:
        if not r.ok:
            key = r.error.split(":")[0][:60]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results), "ok": len(ok), "errors": errors,
        "wall_s": round(wall, 3),
        "ttft_ms": dist([r.ttft for r in ok]),
        "tpot_ms": dist([r.tpot for r in ok]),
        "itl_ms": dist(itl),
        "e2e_ms": dist([r.e2e for r in ok]),
        "req_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "tok_per_s": round(toks / wall, 2) if wall > 0 else None,
        "generated_tokens": toks,
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "goodput_req_per_s": round(len(good) / wall, 3) if wall > 0 else None,
        "slo_attainment": round(len(good) / len(results), 3) if results else None,
        "batch_efficiency": None if eff is None else round(eff, 3),
        "queued_samples": len(queued),
        "mean_running": round(sum(busy) / len(busy), 2) if busy else None,
        "max_running": max(busy) if busy else 0,
        "limit_seen": sorted({v["limit"] for _, v in samples if v.get("limit") is not None}),
    }


def run_mode(url, mode, args, questions, sampler, log):
    loadgen.wait_idle(url)
    loadgen.set_mode(url, mode, args.fixed_batch if mode == "fixed" else None)
    time.sleep(0.3)
    view = loadgen.wait_idle(url)
    log(f"== mode {mode}: server reports mode={view.get('mode')} limit={view.get('limit')}")
    kw = dict(ignore_eos=True, temperature=0.0)
    out = {}

    def phase(name, fn):
        loadgen.wait_idle(url)
        t0 = time.perf_counter()
        res = fn()
        t1 = time.perf_counter()
        s = summarize(res, t0, t1, sampler.between(t0, t1), args.slo_ttft, args.slo_tpot)
        s["t0"], s["t1"] = t0, t1
        out[name] = s
        log(f"   {name:6s} {s['ok']}/{s['requests']} ok in {s['wall_s']:.1f} s: "
            f"{s['tok_per_s']} tok/s, TTFT p50 {s['ttft_ms']['p50']} ms p99 {s['ttft_ms']['p99']}"
            f" ms, TPOT p50 {s['tpot_ms']['p50']} ms, eff {s['batch_efficiency']}"
            + (f" errors {s['errors']}" if s["errors"] else ""))

    phase("seq", lambda: loadgen.run_sequential(url, questions[:args.seq_n], args.seq_tokens, **kw))
    for c in args.clients:
        phase(f"c{c}", lambda c=c: loadgen.run_closed_loop(url, questions, c, args.per_client,
                                                           args.conc_tokens, **kw))
    phase("burst", lambda: loadgen.run_burst(url, questions, args.burst, args.burst_tokens, **kw))
    return out


def write_md(path, res):
    a = res["args"]
    lines = [
        "# kr-serve serving benchmark",
        "",
        f"{res['started']}, {res['host']['cpus']} CPUs ({res['host']['machine']}), model "
        f"`{res['model']}`, total {res['total_s']:.0f} s. Streaming chat completions, "
        f"temperature 0, ignore_eos. Workloads: seq = {a['seq_n']} questions one at a time "
        f"(max_tokens {a['seq_tokens']}); cN = N closed-loop clients x {a['per_client']} requests "
        f"(max_tokens {a['conc_tokens']}); burst = {a['burst']} requests at once (max_tokens "
        f"{a['burst_tokens']}). Modes switched with POST /admin/scheduler (fixed batch "
        f"{a['fixed_batch']}).",
        "",
        f"SLOs for goodput: TTFT <= {a['slo_ttft']} s and TPOT <= {a['slo_tpot'] * 1000:.0f} ms. "
        "Batch efficiency = mean of running/limit over the /stats samples (every 100 ms) taken "
        "while requests were queued. Latencies in ms (nearest-rank percentiles).",
        "",
        "| mode | load | ok/n | TTFT p50 | TTFT p95 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 |"
        " ITL p99 | E2E p50 | E2E p95 | E2E p99 | req/s | tok/s | goodput req/s | SLO met |"
        " batch eff | mean running |",
        "|" + "---|" * 19,
    ]
    f = lambda v: "-" if v is None else (f"{v:.0f}" if isinstance(v, (int, float)) and abs(v) >= 100
                                        else f"{v}")
    for mode, phases in res["modes"].items():
        for name, s in phases.items():
            lines.append(
                f"| {mode} | {name} | {s['ok']}/{s['requests']} | {f(s['ttft_ms']['p50'])} | "
                f"{f(s['ttft_ms']['p95'])} | {f(s['ttft_ms']['p99'])} | {f(s['tpot_ms']['p50'])} | "
                f"{f(s['tpot_ms']['p99'])} | {f(s['itl_ms']['p50'])} | {f(s['itl_ms']['p99'])} | "
                f"{f(s['e2e_ms']['p50'])} | {f(s['e2e_ms']['p95'])} | {f(s['e2e_ms']['p99'])} | "
                f"{f(s['req_per_s'])} | {f(s['tok_per_s'])} | {f(s['goodput_req_per_s'])} | "
                f"{f(s['slo_attainment'])} | {f(s['batch_efficiency'])} | {f(s['mean_running'])} |")
    errs = {f"{m}/{p}": s["errors"] for m, ph in res["modes"].items() for p, s in ph.items()
            if s["errors"]}
    lines += ["", "Errors: " + (json.dumps(errs) if errs else "none"), ""]
    lines += ["Plots: `serve/latency_percentiles.png`, `serve/throughput_vs_concurrency.png`, "
              "`serve/batch_size_over_time.png`.", ""]
    path.write_text("\n".join(lines))


def plots(outdir, res, samples, t_origin):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(res["modes"])
    phases = list(next(iter(res["modes"].values())))
    colors = {"off": "tab:red", "fixed": "tab:blue", "auto": "tab:green"}

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "E2E")):
        for m in modes:
            for q, ls in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                ys = [res["modes"][m][p][key][q] for p in phases]
                ax.plot(phases, [y if y is not None else float("nan") for y in ys], ls, marker="o",
                        color=colors.get(m), label=f"{m} {q}")
        ax.set_title(f"{title} (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3)
    fig.suptitle("Latency percentiles per mode and workload")
    fig.tight_layout()
    fig.savefig(outdir / "latency_percentiles.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in modes:
        pts = [(1, res["modes"][m]["seq"])]
        pts += [(int(p[1:]), res["modes"][m][p]) for p in phases if p.startswith("c")]
        pts += [(res["args"]["burst"], res["modes"][m]["burst"])]
        pts.sort(key=lambda x: x[0])
        xs = [x for x, _ in pts]
        axes[0].plot(xs, [s["tok_per_s"] for _, s in pts], marker="o", color=colors.get(m),
                     label=m)
        axes[1].plot(xs, [s["req_per_s"] for _, s in pts], marker="o", color=colors.get(m),
                     label=f"{m} all")
        axes[1].plot(xs, [s["goodput_req_per_s"] for _, s in pts], "--", marker="x",
                     color=colors.get(m), label=f"{m} goodput")
    axes[0].set(xscale="log", xlabel="concurrent requests", ylabel="generated tokens/s",
                title="Throughput vs concurrency")
    axes[1].set(xscale="log", xlabel="concurrent requests", ylabel="requests/s",
                title="Requests/s and goodput")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "throughput_vs_concurrency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(14, 4.5))
    ts = [t - t_origin for t, _ in samples]
    ax.step(ts, [v.get("running") or 0 for _, v in samples], where="post", label="running",
            lw=0.8, color="tab:blue")
    ax.step(ts, [v.get("limit") or 0 for _, v in samples], where="post", label="batch limit",
            lw=1.4, color="tab:orange")
    ax2 = ax.twinx()
    ax2.step(ts, [v.get("queued") or 0 for _, v in samples], where="post", label="queued (right)",
             lw=0.6, alpha=0.5, color="tab:purple")
    ax2.set_ylabel("queued requests")
    for m in modes:
        ph = res["modes"][m]
        t0 = min(s["t0"] for s in ph.values()) - t_origin
        t1 = max(s["t1"] for s in ph.values()) - t_origin
        ax.axvspan(t0, t1, color=colors.get(m), alpha=0.08)
        ax.text(t0, 1.01, m, fontsize=9, transform=ax.get_xaxis_transform())
    ax.set(xlabel="seconds", ylabel="sequences in the running batch", ylim=(0, None))
    ax.set_title("Batch size over time (/stats every 100 ms)", pad=14)
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(outdir / "batch_size_over_time.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="target a running server instead of starting one")
    ap.add_argument("--exe", default=str(ROOT / os.environ.get("KRS_BUILD_DIR", "build") /
                                         "krserve"))
    ap.add_argument("--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `krserve serve` (repeat)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--modes", default="off,fixed,auto")
    ap.add_argument("--fixed-batch", type=int, default=4)
    ap.add_argument("--seq-n", type=int, default=50)
    ap.add_argument("--seq-tokens", type=int, default=16)
    ap.add_argument("--clients", default="10,25,50")
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--conc-tokens", type=int, default=12)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--burst-tokens", type=int, default=8)
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    ap.add_argument("--quick", action="store_true",
                    help="tiny run (seq 5, clients 2,4, burst 8) to check the tooling")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_n, args.clients, args.per_client, args.burst = 5, "2,4", 1, 8
        args.seq_tokens = args.conc_tokens = args.burst_tokens = 4
    args.clients = [int(x) for x in args.clients.split(",") if x]
    questions = [q.strip() for q in (pathlib.Path(__file__).parent / "questions.txt")
                 .read_text().splitlines() if q.strip()]
    out = pathlib.Path(args.out)
    (out / "serve").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / ".work").mkdir(exist_ok=True)  # git-ignored scratch
    log = lambda s: print(s, flush=True)

    srv = None
    if not args.url:
        srv = loadgen.ServerProcess(args.exe, args.model, args.server_arg,
                                    log_path=ROOT / "bench" / ".work" / "serve-server.log").start()
        url = srv.url
        log(f"started {args.exe} serve on {url} (pid {srv.pid})")
    else:
        url = args.url.rstrip("/")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_start = time.perf_counter()
    res = {"started": started, "url": url, "model": pathlib.Path(args.model).name,
           "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                    "loadavg_start": os.getloadavg()},
           "args": {k: v for k, v in vars(args).items() if k not in ("url",)},
           "definitions": {
               "ttft": "first text-carrying SSE chunk - request sent",
               "tpot": "(e2e - ttft) / (completion_tokens - 1)",
               "itl": "gap between consecutive text-carrying SSE chunks",
               "e2e": "[DONE] received - request sent",
               "goodput": "requests meeting ttft <= slo_ttft and tpot <= slo_tpot, per second",
               "batch_efficiency": "mean of running/limit over /stats samples with queue > 0",
           },
           "modes": {}}
    try:
        with loadgen.StatsSampler(url, 0.1) as sampler:
            for mode in args.modes.split(","):
                res["modes"][mode] = run_mode(url, mode, args, questions, sampler, log)
            loadgen.wait_idle(url)
        final = loadgen.get_json(url + "/stats")
    finally:
        if srv:
            rc = srv.stop()
            log(f"server exit code {rc}")
            res["server_exit_code"] = rc
    res["total_s"] = time.perf_counter() - t_start
    res["host"]["loadavg_end"] = os.getloadavg()
    res["stats_samples"] = len(sampler.samples)
    res["stats_errors"] = sampler.errors
    res["final_stats"] = final
    plots(out / "serve", res, sampler.samples, t_start)
    for ph in res["modes"].values():
        for s in ph.values():
            s["t0"] = round(s["t0"] - t_start, 3)
            s["t1"] = round(s["t1"] - t_start, 3)
    (out / "serve.json").write_text(json.dumps(res, indent=1))
    write_md(out / "serve.md", res)
    log(f"wrote {out / 'serve.json'}, {out / 'serve.md'}, {out / 'serve'}/*.png "
        f"in {res['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
