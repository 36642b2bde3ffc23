#!/usr/bin/env python3
"""kr-serve under hostile load: a 1,000-client burst, a disconnect storm and slowloris, then the
same leak and bookkeeping checks as scripts/soak.py.

Phases, against one server started here (or --url/--pid):
  burst       --clients (1000) streaming chat requests sent at once, one thread each. Every one
              must either stream to its end (finish_reason length) or be refused at once with a
              JSON 429 (the queue bound, server.maxQueue); nothing else.
  disconnect  --storm (300) streaming requests that close their connection after the first chunk,
              beside 16 ordinary ones that must all complete.
  slowloris   --slow (300) sockets that dribble a request header one byte every 2 s for
              --slow-secs (30); meanwhile ordinary requests, one after another, must complete
              (their TTFT is reported).
Checks once idle: alive, every ordinary request ok, no 5xx, submitted == finished from /stats
deltas, cancelled <= connections closed, inflight 0, every KV block free, RSS after the run vs
after the burst (< 10 % or < 20 MB growth).

Usage: scripts/storm.py [--exe build/krserve] [--report storm.md]"""
import argparse
import json
import os
import pathlib
import resource
import socket
import statistics
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "serve"))
import loadgen  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from soak import stats_counters  # noqa: E402

MSG = [{"role": "user", "content": "Name a colour."}]


def parallel(n, fn):
    out = [None] * n
    ths = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i)), daemon=True)
           for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return out


def burst(url, n, max_tokens):
    gate = threading.Event()

    def one(i):
        gate.wait()
        return loadgen.generate(url, messages=MSG, max_tokens=max_tokens, ignore_eos=True,
                                timeout=900, tag=str(i))
    t = threading.Thread(target=lambda: (time.sleep(0.5), gate.set()), daemon=True)
    t.start()
    res = parallel(n, one)
    ok = sum(r.ok and r.finish_reason == "length" for r in res)
    refused = sum(r.status == 429 for r in res)
    other = [r for r in res if not (r.ok and r.finish_reason == "length") and r.status != 429]
    return {"sent": n, "completed": ok, "refused_429": refused,
            "other": [f"{r.status} {r.error[:80]}" for r in other[:10]], "n_other": len(other)}


def disconnect(url, n, max_tokens):
    def one(i):
        if i < 16:
            return loadgen.generate(url, messages=MSG, max_tokens=max_tokens, ignore_eos=True,
                                    timeout=900, tag="keep")
        return loadgen.generate(url, messages=MSG, max_tokens=64, ignore_eos=True,
                                timeout=900, cancel_after_chunks=1, tag="drop")
    res = parallel(n + 16, one)
    keep = [r for r in res if r.tag == "keep"]
    drop = [r for r in res if r.tag == "drop"]
    return {"ordinary": len(keep), "ordinary_ok": sum(r.ok for r in keep),
            "dropped": len(drop), "closed": sum(r.cancelled for r in drop),
            "refused_429": sum(r.status == 429 for r in drop),
            "other": [f"{r.status} {r.error[:80]}" for r in drop
                      if not r.cancelled and r.status != 429][:10]}


def slowloris(url, n, secs, max_tokens):
    host, port = url.split("//")[1].split(":")
    socks, stop = [], threading.Event()
    for _ in range(n):
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError:
            break
    opened = len(socks)

    def dribble():
        while not stop.wait(2.0):
            for s in list(socks):
                try:
                    s.sendall(b"X")
                except OSError:
                    socks.remove(s)
    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    t_end = time.time() + secs
    res = []
    while time.time() < t_end:
        res.append(loadgen.generate(url, messages=MSG, max_tokens=max_tokens, ignore_eos=True,
                                    timeout=120))
    stop.set()
    t.join()
    still_open = len(socks)
    for s in socks:
        s.close()
    ttft = [r.ttft for r in res if r.ok]
    return {"slow_sockets": opened, "still_open_at_end": still_open, "ordinary": len(res),
            "ordinary_ok": sum(r.ok for r in res),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
            "ttft_max_ms": round(1000 * max(ttft), 1) if ttft else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", default=str(ROOT / os.environ.get("KRS_BUILD_DIR", "build") /
                                         "krserve"))
    ap.add_argument("--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--storm", type=int, default=300)
    ap.add_argument("--slow", type=int, default=300)
    ap.add_argument("--slow-secs", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--report", default="storm-report.md")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per client
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log_path = pathlib.Path(a.report).with_suffix(".server.log")
    srv = loadgen.ServerProcess(a.exe, a.model, a.server_arg, log_path=log_path)
    srv.start()
    url, pid = srv.url, srv.pid
    print(f"server {url} pid {pid}", flush=True)
    rep, checks = {}, []

    def check(name, ok, detail):
        checks.append((name, bool(ok), detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    try:
        c0 = stats_counters(url)
        t0 = time.time()
        rep["burst"] = burst(url, a.clients, a.max_tokens)
        rep["burst"]["seconds"] = round(time.time() - t0, 1)
        print("burst", json.dumps(rep["burst"]), flush=True)
        loadgen.wait_idle(url, timeout=600)
        rss_after_burst = loadgen.rss_kb(pid, "RssAnon")
        rep["disconnect"] = disconnect(url, a.storm, a.max_tokens)
        print("disconnect", json.dumps(rep["disconnect"]), flush=True)
        loadgen.wait_idle(url, timeout=600)
        rep["slowloris"] = slowloris(url, a.slow, a.slow_secs, a.max_tokens)
        print("slowloris", json.dumps(rep["slowloris"]), flush=True)
        loadgen.wait_idle(url, timeout=600)
        time.sleep(1)
        c1 = stats_counters(url)
        rss_end = loadgen.rss_kb(pid, "RssAnon")
        status, _ = loadgen.http_get(url + "/health")
        b, d, s = rep["burst"], rep["disconnect"], rep["slowloris"]
        check("alive", status == 200, f"/health -> {status}")
        check("burst: each request streamed to its end or got a JSON 429",
              b["n_other"] == 0 and b["completed"] + b["refused_429"] == b["sent"],
              f"{b['completed']} completed, {b['refused_429']} refused (429), {b['n_other']} "
              f"other {b['other']}, {b['seconds']} s")
        check("disconnect storm: ordinary requests all completed",
              d["ordinary_ok"] == d["ordinary"] and not d["other"],
              f"{d['ordinary_ok']}/{d['ordinary']} ok; {d['closed']} of {d['dropped']} closed "
              f"mid-stream, {d['refused_429']} refused; other {d['other']}")
        check("slowloris: ordinary requests served meanwhile",
              s["ordinary"] > 0 and s["ordinary_ok"] == s["ordinary"],
              f"{s['ordinary_ok']}/{s['ordinary']} ok beside {s['slow_sockets']} slow sockets "
              f"({s['still_open_at_end']} still open at the end), TTFT p50 {s['ttft_p50_ms']} ms, "
              f"max {s['ttft_max_ms']} ms")
        d_ = lambda k: c1[k] - c0[k]  # noqa: E731
        fin = sum(c1["finished"][k] - c0["finished"].get(k, 0) for k in c1["finished"])
        check("submitted == finished", d_("submitted") == fin,
              f"{d_('submitted')} vs {fin} {json.dumps({k: c1['finished'][k] - c0['finished'].get(k, 0) for k in c1['finished']})}")
        check("no request ended in error", c1["finished"].get("error", 0) ==
              c0["finished"].get("error", 0), f"error {c1['finished'].get('error', 0)}")
        check("inflight 0", c1["inflight"] == 0, f"inflight {c1['inflight']}")
        check("KV blocks all free", c1["kv_free"] == c1["kv_total"],
              f"free {c1['kv_free']} / {c1['kv_total']}")
        grow = rss_end - rss_after_burst
        check("RssAnon flat after the burst", grow < 20 * 1024 or grow < 0.1 * rss_after_burst,
              f"{rss_after_burst / 1024:.1f} MB -> {rss_end / 1024:.1f} MB")
    finally:
        rc = srv.stop()
    check("clean shutdown", rc == 0, f"exit {rc}")
    ok = all(c[1] for c in checks)
    lines = ["# kr-serve storm report", "",
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}: `scripts/storm.py` (clients {a.clients}, "
             f"storm {a.storm}, slowloris {a.slow} for {a.slow_secs:.0f} s, max_tokens "
             f"{a.max_tokens}) against `{a.exe} serve` on {a.model} (server args "
             f"{a.server_arg}). Verdict: **{'PASS' if ok else 'FAIL'}**.", "",
             "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {n} | {'yes' if o else '**NO**'} | {dt} |" for n, o, dt in checks]
    lines += ["", "Raw: `" + json.dumps(rep) + "`", ""]
    pathlib.Path(a.report).write_text("\n".join(lines))
    print(f"report: {a.report}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
