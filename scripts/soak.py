#!/usr/bin/env python3
"""kr-serve soak: mixed load for a fixed duration, then leak and bookkeeping checks.

Load (--workers threads until --duration ends): chat and plain completions, streaming and not,
random max_tokens (1..--max-tokens), random priorities (urgent/default/background), about
--cancel-rate of the streaming requests cancelled by closing the connection mid-stream, about
--invalid-rate invalid requests (bad JSON, bad types, out-of-range values: each must get a 4xx
JSON error), monitoring reads, (with --mode-switch S) a scheduler mode switch every S seconds
(auto -> fixed -> off -> ...) through POST /admin/scheduler, and (with --sighup S) a SIGHUP
(configuration reload) to the server every S seconds, each followed by a /health read.

Afterwards, once the server is idle, the checks (any failure makes the exit status 1):
  alive       the process still runs and /health answers 200
  errors      no valid request failed (HTTP error, broken stream, socket error) and every invalid
              request got a 4xx (never a 5xx, never a dropped connection)
  counters    from /stats, as deltas over the run: scheduler.submitted == the valid requests we
              sent; submitted == stop + length + cancelled + error (every request ended once);
              error == 0; cancelled <= the connections we closed; the same balance in the
              metrics counters (requests_submitted.total == requests_finished.total); server
              inflight == 0
  kv          every KV block is back: scheduler.kv_blocks_free == kv_blocks_total, metrics
              kv_blocks.used == 0
  rss         VmRSS of the server (/proc/PID/status) at the end vs after the warm-up phase
              (--warmup, default 20 % of the run): growth < 10 % or < 20 MB; the same for RssAnon
              (anonymous memory only: the mmap'd model's file pages do not hide a heap leak)
The report (--report, markdown) holds the checks, error counts, throughput and RSS over time.

Usage: scripts/soak.py --duration 2h [--url URL | --exe build/krserve] [--report soak.md]"""
import argparse
import json
import os
import signal
import pathlib
import random
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "serve"))
import loadgen  # noqa: E402

QUESTIONS = [q.strip() for q in (ROOT / "bench" / "serve" / "questions.txt").read_text()
             .splitlines() if q.strip()]
PRIORITIES = ["urgent", "default", "background"]

# Invalid bodies for /v1/chat/completions; each must get a 4xx.
INVALID = [
    b"{not json",
    b'{"messages": "hello", "max_tokens": 4}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "priority": "vip"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": -1}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "timeout": -1}',
    b'{"messages": [], "max_tokens": 4}',
    b'{"messages": [{"role": "user", "content": "\xff\xfe"}], "max_tokens": 4}',
    b'{"max_tokens": 4}',
    b'[1, 2, 3]',
]


def parse_duration(s):
    s = str(s).strip()
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if s and s[-1] in mult:
        return float(s[:-1]) * mult[s[-1]]
    return float(s)


def stats_counters(url):
    """Counters and gauges the checks use, from /stats (first model)."""
    js = loadgen.get_json(url + "/stats")
    m = js["models"][0]
    sc, mc = m["scheduler"], m["metrics"]["counters"]
    return {
        "submitted": sc["submitted"],
        "finished": dict(sc["finished"]),
        "m_submitted": mc["requests_submitted"]["total"],
        "m_finished": mc["requests_finished"]["total"],
        "generated_tokens": mc["generated_tokens"],
        "kv_total": sc["kv_blocks_total"], "kv_free": sc["kv_blocks_free"],
        "kv_used_metrics": m["metrics"]["kv_blocks"]["used"],
        "running": sc["running"], "queued": sum(sc["queued"].values()),
        "inflight": js["server"]["inflight"],
        "mode": sc["mode"],
    }


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {"valid_sent": 0, "ok": 0, "cancel_closed": 0, "invalid_sent": 0,
                  "invalid_4xx": 0, "monitor_ok": 0, "mode_switches": 0, "reloads": 0, "tokens": 0,
                  "overload": 0}
        self.errors = {}
        self.samples = []  # per finished valid request: (t, e2e, tokens)

    def add(self, key, n=1):
        with self.lock:
            self.c[key] += n

    def error(self, what):
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1


def worker(url, deadline, rng, tally, args):
    while time.time() < deadline:
        x = rng.random()
        if x < args.invalid_rate:
            body = rng.choice(INVALID)
            tally.add("invalid_sent")
            try:
                status, resp = loadgen.http_post(url + "/v1/chat/completions", body, timeout=60)
                if 400 <= status < 500 and b"error" in resp:
                    tally.add("invalid_4xx")
                else:
                    tally.error(f"invalid request got HTTP {status}")
            except OSError as e:
                tally.error(f"invalid request: {type(e).__name__}")
            continue
        if x < args.invalid_rate + 0.03:
            path = rng.choice(["/health", "/metrics", "/stats", "/v1/models"])
            try:
                status, _ = loadgen.http_get(url + path, timeout=30)
                if status == 200:
                    tally.add("monitor_ok")
                else:
                    tally.error(f"GET {path}: HTTP {status}")
            except OSError as e:
                tally.error(f"GET {path}: {type(e).__name__}")
            continue
        stream = rng.random() < 0.6
        max_tokens = rng.randint(1, args.max_tokens)
        cancel = None
        # only streams can be cut mid-way: 60 % of requests stream, so cut cancel_rate / 0.6
        # of them, after 1-3 chunks of a request long enough to still be generating
        if stream and rng.random() < min(1.0, args.cancel_rate / 0.6):
            max_tokens = max(max_tokens, 8)
            cancel = rng.randint(1, 3)
        kw = dict(max_tokens=max_tokens, stream=stream, priority=rng.choice(PRIORITIES),
                  temperature=rng.choice([0.0, 0.7, 1.0]), cancel_after_chunks=cancel,
                  ignore_eos=rng.random() < 0.5, timeout=600)
        q = rng.choice(QUESTIONS)
        if rng.random() < 0.7:
            r = loadgen.generate(url, messages=[{"role": "user", "content": q}], **kw)
        else:
            r = loadgen.generate(url, prompt=q, **kw)
        tally.add("valid_sent")
        if r.cancelled:
            tally.add("cancel_closed")
        elif r.ok:
            tally.add("ok")
            n = r.completion_tokens or len(r.chunk_times)
            tally.add("tokens", n)
            with tally.lock:
                tally.samples.append((time.time(), r.e2e, n))
        elif r.status in (429, 503):
            tally.add("overload")  # counted, reported; the checks treat it as an error too
            tally.error(f"overload HTTP {r.status}")
        else:
            tally.error(f"valid request failed: {r.error[:80]}")


def run_soak(url, pid, duration, args, log=print):
    """Runs the load and the checks; returns the report dict (report['passed'] is the verdict)."""
    rng = random.Random(args.seed)
    tally = Tally()
    c0 = stats_counters(url)
    t0 = time.time()
    deadline = t0 + duration
    warmup = args.warmup if args.warmup is not None else 0.2 * duration
    rss = []  # (t - t0, kB)
    stop = threading.Event()

    def monitor():
        modes = ["fixed", "off", "auto"]
        next_switch = t0 + args.mode_switch if args.mode_switch else None
        next_hup = t0 + args.sighup if args.sighup else None
        k = 0
        while not stop.wait(args.sample_interval):
            try:
                rss.append((time.time() - t0, loadgen.rss_kb(pid),
                            loadgen.rss_kb(pid, "RssAnon")))
            except (OSError, RuntimeError):
                tally.error("server process gone")
                return
            if next_switch and time.time() >= next_switch and time.time() < deadline:
                mode = modes[k % len(modes)]
                try:
                    loadgen.set_mode(url, mode, 4 if mode == "fixed" else None)
                    tally.add("mode_switches")
                except (OSError, RuntimeError) as e:
                    tally.error(f"mode switch: {e}")
                k += 1
                next_switch += args.mode_switch
            if next_hup and time.time() >= next_hup and time.time() < deadline:
                try:
                    os.kill(pid, signal.SIGHUP)
                    time.sleep(0.2)
                    status, _ = loadgen.http_get(url + "/health", timeout=30)
                    if status != 200:
                        tally.error(f"/health {status} after SIGHUP")
                    tally.add("reloads")
                except OSError as e:
                    tally.error(f"SIGHUP: {e}")
                next_hup += args.sighup

    for body in INVALID:  # every invalid shape once, then at random during the load
        tally.add("invalid_sent")
        status, resp = loadgen.http_post(url + "/v1/chat/completions", body, timeout=60)
        if 400 <= status < 500 and b"error" in resp:
            tally.add("invalid_4xx")
        else:
            tally.error(f"invalid request {body[:40]!r} got HTTP {status}")
    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    threads = [threading.Thread(target=worker, args=(url, deadline, random.Random(rng.random()),
                                                     tally, args), daemon=True)
               for _ in range(args.workers)]
    for t in threads:
        t.start()
    last_log = t0
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        if time.time() - last_log >= args.log_every:
            last_log = time.time()
            log(f"[{time.time() - t0:7.0f} s] sent {tally.c['valid_sent']} ok {tally.c['ok']} "
                f"cancelled {tally.c['cancel_closed']} invalid {tally.c['invalid_sent']} "
                f"errors {sum(tally.errors.values())} rss {rss[-1][1] / 1024 if rss else 0:.1f} MB")
    load_s = time.time() - t0
    if args.mode_switch:
        loadgen.set_mode(url, "auto")
    try:
        loadgen.wait_idle(url, timeout=300)
    except TimeoutError as e:
        tally.error(str(e)[:120])
    time.sleep(args.sample_interval * 1.5)
    stop.set()
    mon.join()
    c1 = stats_counters(url)
    rss_end, anon_end = loadgen.rss_kb(pid), loadgen.rss_kb(pid, "RssAnon")
    rss.append((time.time() - t0, rss_end, anon_end))
    warm = [(kb, anon) for t, kb, anon in rss if t >= warmup] or [(rss_end, anon_end)]
    rss_warm, anon_warm = warm[0]

    d = lambda k: c1[k] - c0[k]
    fin = {k: c1["finished"][k] - c0["finished"].get(k, 0) for k in c1["finished"]}
    fin_total = sum(fin.values())
    checks = []

    def check(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    try:
        health = loadgen.http_get(url + "/health", timeout=10)[0]
    except OSError as e:
        health = f"{type(e).__name__}"
    check("alive", health == 200, f"/health -> {health}")
    check("no errors", not tally.errors, json.dumps(tally.errors) if tally.errors else "none")
    check("invalid requests -> 4xx", tally.c["invalid_4xx"] == tally.c["invalid_sent"],
          f"{tally.c['invalid_4xx']}/{tally.c['invalid_sent']}")
    check("submitted == valid requests sent", d("submitted") == tally.c["valid_sent"],
          f"server {d('submitted')} vs client {tally.c['valid_sent']}")
    check("submitted == finished (stop+length+cancelled+error)", d("submitted") == fin_total,
          f"{d('submitted')} vs {fin_total} {fin}")
    check("no request ended in error", fin.get("error", 0) == 0, f"error {fin.get('error', 0)}")
    check("cancelled <= connections closed", fin.get("cancelled", 0) <= tally.c["cancel_closed"],
          f"cancelled {fin.get('cancelled', 0)}, closed {tally.c['cancel_closed']}")
    check("metrics counters balance", d("m_submitted") == d("m_finished") == d("submitted"),
          f"metrics submitted {d('m_submitted')} finished {d('m_finished')}")
    check("server inflight == 0", c1["inflight"] == 0, f"inflight {c1['inflight']}")
    check("generated tokens >= client-counted", d("generated_tokens") >= tally.c["tokens"],
          f"server {d('generated_tokens')} vs client {tally.c['tokens']}")
    check("KV blocks all free", c1["kv_free"] == c1["kv_total"] and c1["kv_used_metrics"] == 0,
          f"free {c1['kv_free']} / total {c1['kv_total']}, metrics used {c1['kv_used_metrics']}")
    growth = rss_end - rss_warm
    check("RSS flat after warm-up", growth < 0.10 * rss_warm or growth < 20 * 1024,
          f"{rss_warm / 1024:.1f} MB at {warmup:.0f} s -> {rss_end / 1024:.1f} MB at end "
          f"({growth / 1024:+.1f} MB, {100.0 * growth / rss_warm:+.1f} %)")
    growth = anon_end - anon_warm
    check("RssAnon (heap) flat after warm-up", growth < 0.10 * anon_warm or growth < 20 * 1024,
          f"{anon_warm / 1024:.1f} MB -> {anon_end / 1024:.1f} MB ({growth / 1024:+.1f} MB)")

    return {
        "url": url, "pid": pid, "duration_s": duration, "load_s": round(load_s, 1),
        "warmup_s": warmup, "args": {k: v for k, v in vars(args).items()},
        "client": dict(tally.c), "errors": tally.errors, "server_finished_delta": fin,
        "server_before": c0, "server_after": c1, "rss_kb": rss, "samples": tally.samples,
        "t0": t0, "checks": checks, "passed": all(c["ok"] for c in checks),
    }


def write_report(path, rep):
    c = rep["client"]
    lines = ["# kr-serve soak report", "",
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rep['t0']))}: "
             f"{rep['duration_s']:.0f} s of load ({rep['args']['workers']} workers) against "
             f"{rep['url']} (pid {rep['pid']}). Verdict: **{'PASS' if rep['passed'] else 'FAIL'}**.",
             "", "| check | ok | detail |", "|---|---|---|"]
    for ch in rep["checks"]:
        lines.append(f"| {ch['check']} | {'yes' if ch['ok'] else '**NO**'} | {ch['detail']} |")
    lines += ["", "## Load", "",
              f"valid requests {c['valid_sent']} (completed {c['ok']}, closed mid-stream "
              f"{c['cancel_closed']}), invalid {c['invalid_sent']} ({c['invalid_4xx']} got 4xx), "
              f"monitoring reads {c['monitor_ok']}, mode switches {c['mode_switches']}, "
              f"SIGHUP reloads {c.get('reloads', 0)}, "
              f"generated tokens seen {c['tokens']}. Server finish reasons: "
              f"{json.dumps(rep['server_finished_delta'])}.", "",
              "Errors: " + (json.dumps(rep["errors"]) if rep["errors"] else "none"), ""]
    # throughput and RSS per interval
    n_int = 12 if rep["duration_s"] >= 120 else 6
    step = max(1.0, rep["load_s"] / n_int)
    lines += ["## Over time", "", "| interval (s) | requests done | tokens/s | mean e2e (s) |"
              " RSS (MB) | RssAnon (MB) |", "|---|---|---|---|---|---|"]
    for i in range(n_int):
        a, b = i * step, (i + 1) * step
        s = [x for x in rep["samples"] if a <= x[0] - rep["t0"] < b]
        r = [kb for t, kb, _ in rep["rss_kb"] if a <= t < b]
        ra = [anon for t, _, anon in rep["rss_kb"] if a <= t < b]
        toks = sum(x[2] for x in s)
        e2e = sum(x[1] for x in s) / len(s) if s else 0
        lines.append(f"| {a:.0f}-{b:.0f} | {len(s)} | {toks / step:.1f} | {e2e:.2f} | "
                     f"{(r[-1] / 1024 if r else float('nan')):.1f} | "
                     f"{(ra[-1] / 1024 if ra else float('nan')):.1f} |")
    lines.append("")
    pathlib.Path(path).write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ax.plot([x[0] for x in rep["rss_kb"]], [x[1] / 1024 for x in rep["rss_kb"]], label="VmRSS")
        ax.plot([x[0] for x in rep["rss_kb"]], [x[2] / 1024 for x in rep["rss_kb"]],
                label="RssAnon")
        ax.axvline(rep["warmup_s"], color="grey", ls="--", lw=0.8, label="end of warm-up")
        ax.set(xlabel="seconds", ylabel="MB", title="kr-serve RSS during the soak")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(str(path).rsplit(".", 1)[0] + "_rss.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass


def make_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", default="600", help="seconds, or with s/m/h/d (e.g. 8h)")
    ap.add_argument("--url", help="target a running server (its pid: --pid, for RSS)")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--exe", default=str(ROOT / os.environ.get("KRS_BUILD_DIR", "build") /
                                         "krserve"))
    ap.add_argument("--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--cancel-rate", type=float, default=0.2)
    ap.add_argument("--invalid-rate", type=float, default=0.05)
    ap.add_argument("--mode-switch", type=float, default=0.0,
                    help="switch scheduler mode every S seconds (0 = never)")
    ap.add_argument("--sighup", type=float, default=0.0,
                    help="send the server SIGHUP (configuration reload) every S seconds")
    ap.add_argument("--warmup", type=float, default=None, help="seconds (default 20 %% of run)")
    ap.add_argument("--sample-interval", type=float, default=1.0)
    ap.add_argument("--log-every", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report", default="soak-report.md")
    return ap


def main(argv=None):
    args = make_parser().parse_args(argv)
    duration = parse_duration(args.duration)
    srv = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
        if not pid:
            sys.exit("--url needs --pid (RSS is read from /proc/PID/status)")
    else:
        log_path = pathlib.Path(args.report).with_suffix(".server.log")
        srv = loadgen.ServerProcess(args.exe, args.model, args.server_arg, log_path=log_path)
        srv.start()
        url, pid = srv.url, srv.pid
        print(f"started {args.exe} serve on {url} (pid {pid}), log {log_path}", flush=True)
    try:
        rep = run_soak(url, pid, duration, args, log=lambda s: print(s, flush=True))
    finally:
        if srv:
            rc = srv.stop()
            print(f"server exit code {rc}")
    if srv:
        rep["checks"].append({"check": "clean shutdown", "ok": rc == 0, "detail": f"exit {rc}"})
        rep["passed"] = rep["passed"] and rc == 0
    write_report(args.report, rep)
    for ch in rep["checks"]:
        print(f"{'ok  ' if ch['ok'] else 'FAIL'} {ch['check']}: {ch['detail']}")
    print(f"report: {args.report}")
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
