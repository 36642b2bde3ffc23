#!/usr/bin/env python3
"""The batch-size controller against static batch sizes, in one server run.

Starts `krserve serve` once (or --url) and, per client level (--levels, default 16 and 32),
runs the same closed loop (N clients x --per-client streamed chat completions of --max-tokens
tokens, ignore_eos, temperature 0) under each scheduler mode (--modes: auto and fixed 4, 8, 16,
32), switched through POST /admin/scheduler while idle. Per run, side by side:
  - the load generator's figures: tok/s, TTFT p50/p95, inter-token p50/p99, e2e p50/p99;
  - the batch limit over the steady second half of the run (/stats sampled every 100 ms): mean,
    min..max and the variation (max - min) / 2 / mean;
  - the server's own figures for the same requests, from /metrics before and after the run
    (histogram sums and buckets, counters): requests, generated tokens, mean TTFT / e2e /
    inter-token, p95 TTFT interpolated in the buckets;
  - /metrics scraped every 250 ms during the run: latency p50/p99/max and the share of scrapes
    answered in < 50 ms.
Then a mixed workload in auto mode (--mixed-clients, default 16): a quarter of the clients urgent
with short prompts, a quarter default with ~700-token prompts, the rest background with short
prompts; urgent TTFT, everyone's inter-token P99 and the background's progress.

Writes --md and --json. Usage:
  ctrl_bench.py [--exe build/krserve] [--model models/default.gguf] [--threads 2]
      [--levels 16,32] [--modes auto,4,8,16,32] [--max-tokens 32] [--per-client 2]
      [--server-arg=--set ...] [--md bench/results/ctrl.md] [--json bench/results/ctrl.json]"""
import argparse
import json
import math
import os
import pathlib
import platform
import re
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from run_bench import dist  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent

HISTS = {"ttft": "krserve_ttft_seconds", "e2e": "krserve_e2e_latency_seconds",
         "itl": "krserve_inter_token_latency_seconds"}


def prom(url):
    """Histogram buckets/sums/counts and plain samples of one /metrics answer."""
    st, body = loadgen.http_get(url + "/metrics", timeout=10)
    text = body.decode() if isinstance(body, bytes) else body
    out = {}
    for ln in text.splitlines():
        if not ln or ln[0] == "#":
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)', ln)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def hist_delta(a, b, name):
    """(buckets [(le, count)], sum, count) of histogram `name` between two prom() answers,
    summed over label sets other than le."""
    buckets = {}
    for (k, lab), v in b.items():
        if k != name + "_bucket":
            continue
        le = re.search(r'le="([^"]+)"', lab).group(1)
        le = math.inf if le == "+Inf" else float(le)
        buckets[le] = buckets.get(le, 0.0) + v - a.get((k, lab), 0.0)
    s = sum(v - a.get((k, lab), 0.0) for (k, lab), v in b.items() if k == name + "_sum")
    n = sum(v - a.get((k, lab), 0.0) for (k, lab), v in b.items() if k == name + "_count")
    return sorted(buckets.items()), s, n


def hist_quantile(buckets, q):
    """Prometheus histogram_quantile: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1)
        prev_le, prev_c = le, c
    return prev_le


def counter_delta(a, b, name):
    return sum(v - a.get((k, lab), 0.0) for (k, lab), v in b.items() if k == name)


class Scraper:
    """GETs /metrics every `period` s in a thread; keeps (latency s, ok)."""

    def __init__(self, url, period=0.25):
        self.url, self.period, self.samples = url, period, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                st, _ = loadgen.http_get(self.url + "/metrics", timeout=5)
                ok = st == 200
            except OSError:
                ok = False
            self.samples.append((time.perf_counter() - t0, ok))
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()

    def summary(self):
        lat = [s for s, ok in self.samples if ok]
        d = dist(lat)
        d["max"] = round(max(lat) * 1000, 2) if lat else None
        d["scrapes"] = len(self.samples)
        d["under_50ms"] = (round(sum(1 for s, ok in self.samples if ok and s < 0.05)
                                 / len(self.samples), 4) if self.samples else None)
        return d


def limit_stats(samples):
    """Batch limit over the second half of the run's /stats samples taken while busy."""
    lim = [v["limit"] for _, v in samples if v.get("limit") and (v.get("running") or 0) > 0]
    lim = lim[len(lim) // 2:]
    if not lim:
        return {}
    mean = sum(lim) / len(lim)
    return {"mean": round(mean, 2), "min": min(lim), "max": max(lim),
            "variation": round((max(lim) - min(lim)) / 2 / mean, 4), "n": len(lim)}


def server_side(a, b):
    gen = sum(v - a.get((k, lab), 0.0) for (k, lab), v in b.items()
              if k == "krserve_tokens_total" and 'kind="generated"' in lab)
    out = {"requests": counter_delta(a, b, "krserve_requests_total"), "generated_tokens": gen}
    for key, name in HISTS.items():
        buckets, s, n = hist_delta(a, b, name)
        out[key] = {"n": n, "mean": round(s / n * 1000, 2) if n else None,
                    "p50": None if not n else round(hist_quantile(buckets, 0.5) * 1000, 2),
                    "p95": None if not n else round(hist_quantile(buckets, 0.95) * 1000, 2)}
    return out


def client_side(res, wall):
    ok = [r for r in res if r.ok]
    toks = sum(r.completion_tokens or len(r.chunk_times) for r in ok)
    return {
        "requests": len(res), "ok": len(ok),
        "errors": sorted({r.error for r in res if not r.ok})[:3],
        "wall_s": round(wall, 3), "tok_s": round(toks / wall, 2), "tokens": toks,
        "ttft_ms": dist([r.ttft for r in ok]),
        "itl_ms": dist([g for r in ok for g in r.inter_token()]),
        "e2e_ms": dist([r.e2e for r in ok]),
    }


SERVER_PID = None  # set when this script started the server: its CPU time is read per run


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (None when unknown)."""
    if not pid:
        return None
    try:
        f = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def one_run(url, label, fn, sampler):
    loadgen.wait_idle(url)
    before = prom(url)
    load0 = os.getloadavg()[0]
    cpu0 = cpu_seconds(SERVER_PID)
    with Scraper(url) as sc:
        t0 = time.perf_counter()
        res = fn()
        t1 = time.perf_counter()
    load1 = os.getloadavg()[0]
    cpu1 = cpu_seconds(SERVER_PID)
    # CPUs the server actually got while this mode ran (its CPU time / wall time): on a shared
    # host this, more than the load average, says how much of the machine it had.
    cpus = round((cpu1 - cpu0) / (t1 - t0), 2) if cpu0 is not None and cpu1 is not None else None
    loadgen.wait_idle(url)
    after = prom(url)
    # The host's 1-minute load average before and after: on a shared machine it says how much
    # else ran beside this mode (this server alone keeps it near --threads).
    out = {"label": label, "client": client_side(res, t1 - t0),
           "server": server_side(before, after), "limit": limit_stats(sampler.between(t0, t1)),
           "metrics_scrape_ms": sc.summary(), "loadavg": [round(load0, 1), round(load1, 1)],
           "server_cpus": cpus}
    print(f"[{label}] {json.dumps(out['client'])[:300]} limit {out['limit']}", file=sys.stderr,
          flush=True)
    return out, res


def long_prompt(questions, n_tokens):
    words, i = [], 0
    while len(words) < int(n_tokens * 0.72):
        words += questions[i % len(questions)].split()
        i += 1
    return "Read these questions and answer the last one briefly. " + " ".join(words)


def mixed(url, questions, clients, per_client, max_tokens, long_tokens):
    """clients threads: c % 4 == 0 urgent short, == 1 default ~long_tokens prompt, else
    background short. Returns results tagged by class."""
    results = []
    lock = threading.Lock()
    start = threading.Barrier(clients)
    lp = long_prompt(questions, long_tokens)

    def client(c):
        kind = "urgent" if c % 4 == 0 else "long" if c % 4 == 1 else "background"
        prio = {"urgent": "urgent", "long": "default", "background": "background"}[kind]
        start.wait()
        for k in range(per_client):
            q = lp if kind == "long" else questions[(c * per_client + k) % len(questions)]
            r = loadgen.chat_request(url, q, max_tokens, ignore_eos=True, priority=prio, tag=kind)
            with lock:
                results.append(r)

    ts = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return results


def mixed_summary(res):
    out = {}
    for kind in ("urgent", "long", "background"):
        ok = [r for r in res if r.tag == kind and r.ok]
        out[kind] = {"requests": len([r for r in res if r.tag == kind]), "ok": len(ok),
                     "prompt_tokens": max((r.prompt_tokens for r in ok), default=0),
                     "ttft_ms": dist([r.ttft for r in ok]),
                     "itl_ms": dist([g for r in ok for g in r.inter_token()]),
                     "e2e_ms": dist([r.e2e for r in ok])}
    out["all_itl_ms"] = dist([g for r in res if r.ok for g in r.inter_token()])
    return out


def fmt(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def write_md(res, path):
    a = res["args"]
    L = [f"# Batch-size controller vs static batch sizes (bench/serve/ctrl_bench.py)", "",
         f"{res['when']}, {res['machine']}, model `{pathlib.Path(a['model']).name}`, "
         f"{a['threads']} threads, total {res['total_s']:.0f} s. {a['per_client']} streamed chat "
         f"completions per client of {a['max_tokens']} tokens (ignore_eos, temperature 0); "
         f"step P99 target {res.get('target_ms', '?')} ms. One server, modes switched while idle.",
         ""]
    for lvl in res["levels"]:
        c = lvl["clients"]
        L += [f"## {c} clients", "",
              "| mode | tok/s | TTFT p50 / p95 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | "
              "batch limit mean [min..max], variation (2nd half) | host load before / after | "
              "CPUs the server got |", "|---|---|---|---|---|---|---|---|"]
        for r in lvl["runs"]:
            cl, li = r["client"], r["limit"]
            lim = (f"{li['mean']} [{li['min']}..{li['max']}], ±{li['variation'] * 100:.1f} %"
                   if li else "-")
            L.append(f"| {r['label']} | {cl['tok_s']} | {fmt(cl['ttft_ms']['p50'])} / "
                     f"{fmt(cl['ttft_ms']['p95'])} | {fmt(cl['itl_ms']['p50'])} / "
                     f"{fmt(cl['itl_ms']['p99'])} | {fmt(cl['e2e_ms']['p50'])} / "
                     f"{fmt(cl['e2e_ms']['p99'])} | {lim} | "
                     f"{' / '.join(str(x) for x in r.get('loadavg', [])) or '-'} | "
                     f"{r.get('server_cpus') if r.get('server_cpus') is not None else '-'} |")
        runs = {r["label"]: r for r in lvl["runs"]}
        if "auto" in runs:
            au = runs["auto"]["client"]
            best = max((r for r in lvl["runs"] if r["label"] != "auto"),
                       key=lambda r: r["client"]["tok_s"], default=None)
            L.append("")
            if "fixed 4" in runs:
                f4 = runs["fixed 4"]["client"]
                L.append(f"auto vs fixed 4: tok/s {100 * (au['tok_s'] / f4['tok_s'] - 1):+.1f} %, "
                         f"e2e P99 {100 * (au['e2e_ms']['p99'] / f4['e2e_ms']['p99'] - 1):+.1f} %, "
                         f"TTFT p95 {100 * (au['ttft_ms']['p95'] / f4['ttft_ms']['p95'] - 1):+.1f} %.")
            if best:
                L.append(f"auto / best static ({best['label']}, {best['client']['tok_s']} tok/s): "
                         f"{100 * au['tok_s'] / best['client']['tok_s']:.1f} % of its tok/s.")
        L += ["", f"Metrics accuracy at {c} clients (server /metrics deltas vs load generator; "
              "server times start at submission, client times at send):", "",
              "| mode | requests srv / client | tokens srv / client | TTFT mean srv / client ms | "
              "TTFT p95 srv (bucket-interpolated) / client | e2e mean srv / client | "
              "ITL mean srv / client | /metrics scrape p50 / p99 / max ms, < 50 ms |",
              "|---|---|---|---|---|---|---|---|"]
        for r in lvl["runs"]:
            s, cl, sc = r["server"], r["client"], r["metrics_scrape_ms"]
            L.append(f"| {r['label']} | {s['requests']:.0f} / {cl['ok']} | "
                     f"{s['generated_tokens']:.0f} / {cl['tokens']} | {fmt(s['ttft']['mean'])} / "
                     f"{fmt(cl['ttft_ms']['mean'])} | {fmt(s['ttft']['p95'])} / "
                     f"{fmt(cl['ttft_ms']['p95'])} | {fmt(s['e2e']['mean'])} / "
                     f"{fmt(cl['e2e_ms']['mean'])} | {fmt(s['itl']['mean'])} / "
                     f"{fmt(cl['itl_ms']['mean'])} | {fmt(sc['p50'])} / {fmt(sc['p99'])} / "
                     f"{fmt(sc['max'])}, {100 * (sc['under_50ms'] or 0):.1f} % of "
                     f"{sc['scrapes']} |")
        L.append("")
    if res.get("mixed"):
        m = res["mixed"]
        L += [f"## Mixed workload, auto, {a['mixed_clients']} clients", "",
              "A quarter urgent (short prompts), a quarter default with long prompts, half "
              "background (short prompts).", "",
              "| class | ok / sent | prompt tokens | TTFT p50 / p95 ms | ITL p50 / p99 ms | "
              "e2e p50 / p99 ms |", "|---|---|---|---|---|---|"]
        for kind in ("urgent", "long", "background"):
            k = m["summary"][kind]
            L.append(f"| {kind} | {k['ok']} / {k['requests']} | {k['prompt_tokens']} | "
                     f"{fmt(k['ttft_ms']['p50'])} / {fmt(k['ttft_ms']['p95'])} | "
                     f"{fmt(k['itl_ms']['p50'])} / {fmt(k['itl_ms']['p99'])} | "
                     f"{fmt(k['e2e_ms']['p50'])} / {fmt(k['e2e_ms']['p99'])} |")
        al = m["summary"]["all_itl_ms"]
        L += ["", f"Everyone's inter-token p99: {fmt(al['p99'])} ms; tok/s "
              f"{m['client']['tok_s']}; batch limit {m['limit']}; host load "
              f"{' / '.join(str(x) for x in m.get('loadavg', []))}, CPUs the server got "
              f"{m.get('server_cpus')}.", ""]
    if res.get("events"):
        L += ["Last controller events (`/stats` controller.events):", ""]
        L += [f"- {e['kind']} {e['old_limit']} -> {e['new_limit']}: {e['reason']}"
              for e in res["events"][-8:]]
        L.append("")
    pathlib.Path(path).write_text("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--exe", default=str(ROOT / os.environ.get("KRS_BUILD_DIR", "build") /
                                         "krserve"))
    ap.add_argument("--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--levels", default="16,32")
    ap.add_argument("--modes", default="auto,4,8,16,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--mixed-clients", type=int, default=16)
    ap.add_argument("--mixed-per-client", type=int, default=2)
    ap.add_argument("--long-tokens", type=int, default=700)
    ap.add_argument("--md", default=str(ROOT / "bench" / "results" / "ctrl.md"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "ctrl.json"))
    a = ap.parse_args()
    questions = [q.strip() for q in (HERE / "questions.txt").read_text().splitlines()
                 if q.strip()]
    t_start = time.time()
    srv = None
    if not a.url:
        srv = loadgen.ServerProcess(a.exe, a.model, ["--threads", str(a.threads)] + a.server_arg,
                                    log_path="/tmp/ctrl_bench_server.log").start()
        url = srv.url
        global SERVER_PID
        SERVER_PID = srv.proc.pid
    else:
        url = a.url.rstrip("/")
    res = {"args": vars(a), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": f"{os.cpu_count()} CPUs ({platform.machine()})", "levels": []}
    try:
        # warm-up (first requests pay lazy setup)
        loadgen.run_closed_loop(url, questions, 4, 1, 8, ignore_eos=True)
        with loadgen.StatsSampler(url) as sampler:
            for c in [int(x) for x in a.levels.split(",") if x]:
                lvl = {"clients": c, "runs": []}
                for m in a.modes.split(","):
                    if m == "auto":
                        loadgen.wait_idle(url)
                        loadgen.set_mode(url, "auto")
                        label = "auto"
                    else:
                        loadgen.wait_idle(url)
                        loadgen.set_mode(url, "fixed", int(m))
                        label = f"fixed {m}"
                    out, _ = one_run(url, f"{label}", lambda c=c: loadgen.run_closed_loop(
                        url, questions, c, a.per_client, a.max_tokens, ignore_eos=True), sampler)
                    lvl["runs"].append(out)
                    save(res, a, t_start, partial=True)
                res["levels"].append(lvl)
            if a.mixed_clients > 0:
                loadgen.wait_idle(url)
                loadgen.set_mode(url, "auto")
                holder = {}

                def run_mixed():
                    holder["r"] = mixed(url, questions, a.mixed_clients, a.mixed_per_client,
                                        a.max_tokens, a.long_tokens)
                    return holder["r"]

                out, r = one_run(url, "mixed auto", run_mixed, sampler)
                out["summary"] = mixed_summary(r)
                res["mixed"] = out
        st = loadgen.get_json(url + "/stats")
        mdl = st["models"][0] if isinstance(st.get("models"), list) else st
        ctl = mdl.get("controller", {})
        res["events"] = ctl.get("events", [])
        res["controller"] = {k: v for k, v in ctl.items() if k != "events"}
        res["target_ms"] = None
        cfg_target = [x for x in a.server_arg if "p99ThresholdMs" in x]
        res["target_ms"] = cfg_target[-1].split("=")[-1] if cfg_target else "100 (default)"
    finally:
        if srv:
            srv.stop()
    save(res, a, t_start)
    print(pathlib.Path(a.md).read_text())


def save(res, a, t_start, partial=False):
    """Writes what is measured so far (a run cut short keeps its finished levels)."""
    res["total_s"] = time.time() - t_start
    res["partial"] = partial
    pathlib.Path(a.json).write_text(json.dumps(res, indent=1))
    write_md(res, a.md)


if __name__ == "__main__":
    main()
