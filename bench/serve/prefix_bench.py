#!/usr/bin/env python3
"""Prefix-cache benchmark: the same workloads with the cache off and on, in one run.

Two servers, one after the other, on the same machine and model: `performance.prefixCache.
enabled` false (KRSERVE_PREFIX_CACHE=0), then true (the default). Each gets a warm-up request,
then:
  shared   --clients closed-loop clients (default 16), --per-client requests each, every request
           = one shared system prompt (~500 tokens, the same for all) + a short user question
           from questions.txt; max_tokens --shared-tokens.
  chat     --chat-clients conversations of --turns turns; every turn resends the whole
           history (system, earlier questions and the server's own answers) plus a new
           question; max_tokens --chat-tokens.
Streamed chat completions, temperature 0, ignore_eos (every request generates exactly
max_tokens, so both servers do the same generation work).

Per (cache, workload): TTFT P50/P95 (client side, loadgen.py), end-to-end P50, prompt tokens/s
= sum of usage.prompt_tokens / workload wall time (first send to last [DONE]) — the prompt
work the server got through, whether it computed it or reused it —, requests/s, and the cached
share = sum(cached_tokens) / sum(prompt_tokens) from usage.prompt_tokens_details. The ratios
(off / on for TTFT, on / off for throughput) go in the summary.

Writes <out>/prefix_cache.json and <out>/prefix_cache.md.
Usage: prefix_bench.py [--exe build/krserve] [--model models/default.gguf] [--out bench/results]
"""
import argparse
import json
import os
import pathlib
import platform
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from run_bench import pct  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def system_prompt():
    """About 500 tokens of a fixed, plausible system prompt."""
    rules = [
        "Answer in plain English and keep the answer short unless the user asks for detail.",
        "Never invent facts; when you are not sure, say so and suggest where to check.",
        "Use metric units, and give both units when the user used imperial ones.",
        "Quote numbers with the precision the source has, no more.",
        "When the user asks for code, give a complete, runnable example with comments.",
        "Prefer standard libraries over third-party packages unless asked otherwise.",
        "Refuse politely when a request is harmful, and explain what you can do instead.",
        "Summaries come first, details after, and a list only when order matters.",
        "Dates are written as year-month-day; times in 24-hour format with the zone.",
        "If a question is ambiguous, answer the most likely reading and name the others.",
    ]
    parts = ["You are Atlas, the support assistant of the Example Travel Company. "
             "Follow these rules in every answer."]
    for rep in range(2):
        for i, r in enumerate(rules):
            parts.append(f"Rule {rep * len(rules) + i + 1}: {r}")
    parts.append("Company facts: offices in Lisbon, Oslo and Montreal; support hours 08:00 to "
                 "20:00 local time on working days; refunds within 14 days of booking; "
                 "travel insurance is optional and sold by a partner.")
    return " ".join(parts)


def summarize(results, t0, t1):
    ok = [r for r in results if r.ok]
    wall = max(t1 - t0, 1e-9)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": round(wall, 3),
        "ttft_p50_ms": round(pct([r.ttft for r in ok], 0.5) * 1000, 1) if ok else None,
        "ttft_p95_ms": round(pct([r.ttft for r in ok], 0.95) * 1000, 1) if ok else None,
        "e2e_p50_ms": round(pct([r.e2e for r in ok], 0.5) * 1000, 1) if ok else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": round(cached / prompt, 3) if prompt else 0,
        "prompt_tok_s": round(prompt / wall, 1),
        "req_s": round(len(ok) / wall, 3),
    }


def run_clients(n, client, results):
    """Runs client(0..n-1) on threads (they start together at their barrier) and summarizes
    `results` over the wall time."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, t0, time.perf_counter())


def shared_workload(url, questions, args):
    sysmsg = system_prompt()
    results = [None] * (args.clients * args.per_client)
    barrier = threading.Barrier(args.clients)

    def client(c):
        barrier.wait()
        for k in range(args.per_client):
            i = c * args.per_client + k
            q = questions[i % len(questions)]
            results[i] = loadgen.generate(
                url, messages=[{"role": "system", "content": sysmsg},
                               {"role": "user", "content": q}],
                max_tokens=args.shared_tokens, ignore_eos=True, timeout=args.timeout)

    return run_clients(args.clients, client, results)


def chat_workload(url, questions, args):
    sysmsg = ("You are a patient tutor. Explain things step by step, check what the student "
              "already knows, and end each answer with one short question back.")
    results = []
    lock = threading.Lock()
    barrier = threading.Barrier(args.chat_clients)

    def client(c):
        msgs = [{"role": "system", "content": sysmsg}]
        barrier.wait()
        for t in range(args.turns):
            msgs.append({"role": "user",
                         "content": questions[(c * args.turns + t) % len(questions)]})
            r = loadgen.generate(url, messages=list(msgs), max_tokens=args.chat_tokens,
                                 ignore_eos=True, timeout=args.timeout)
            with lock:
                results.append(r)
            msgs.append({"role": "assistant", "content": r.text if r.ok else ""})

    return run_clients(args.chat_clients, client, results)


def write_md(path, res):
    a = res["args"]
    lines = [
        "# Prefix cache: on vs off",
        "",
        f"`bench/serve/prefix_bench.py`, {res['date']}, host `{res['host']}` "
        f"({res['cpus']} CPUs), model `{res['model']}`, build `{res['exe']}`. Both servers "
        "ran one after the other in the same run, same flags except "
        "`KRSERVE_PREFIX_CACHE`.",
        "",
        f"- shared: {a['clients']} clients x {a['per_client']} requests, one ~500-token system "
        f"prompt + a short question, max_tokens {a['shared_tokens']} (ignore_eos)",
        f"- chat: {a['chat_clients']} conversations x {a['turns']} turns, history resent every "
        f"turn, max_tokens {a['chat_tokens']} (ignore_eos)",
        "",
        "| workload | cache | ok | TTFT p50 ms | TTFT p95 ms | E2E p50 ms | prompt tok/s | "
        "req/s | cached share | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in ("shared", "chat"):
        for c in ("off", "on"):
            r = res["runs"][c][w]
            lines.append(f"| {w} | {c} | {r['ok']}/{r['requests']} | {r['ttft_p50_ms']} | "
                         f"{r['ttft_p95_ms']} | {r['e2e_p50_ms']} | {r['prompt_tok_s']} | "
                         f"{r['req_s']} | {r['cached_share']} | {r['wall_s']} |")
    lines += ["", "| workload | TTFT p50 off/on | TTFT p95 off/on | prompt tok/s on/off | "
              "req/s on/off |", "|---|---|---|---|---|"]
    for w, s in res["speedup"].items():
        lines.append(f"| {w} | {s['ttft_p50']}x | {s['ttft_p95']}x | {s['prompt_tok_s']}x | "
                     f"{s['req_s']}x |")
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exe", default=str(ROOT / os.environ.get("KRS_BUILD_DIR", "build") /
                                         "krserve"))
    ap.add_argument("--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--shared-tokens", type=int, default=8)
    ap.add_argument("--chat-clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--chat-tokens", type=int, default=24)
    ap.add_argument("--server-args", default="--kv-tokens 16384")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per request, seconds")
    args = ap.parse_args(argv)
    questions = [q.strip() for q in (ROOT / "bench" / "serve" / "questions.txt").read_text()
                 .splitlines() if q.strip()]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
           "cpus": os.cpu_count(), "model": pathlib.Path(args.model).name,
           "exe": os.path.relpath(args.exe, ROOT), "args": vars(args), "runs": {}}
    for cache in ("off", "on"):
        env = {"KRSERVE_PREFIX_CACHE": "1" if cache == "on" else "0"}
        log = out / f"prefix_cache_{cache}.log"
        with loadgen.ServerProcess(args.exe, args.model, args.server_args.split(),
                                   log_path=str(log), env=env) as srv:
            loadgen.generate(srv.url, messages=[{"role": "user", "content": "Hello"}],
                             max_tokens=4)  # warm-up: weights paged in
            runs = {}
            for name, fn in (("shared", shared_workload), ("chat", chat_workload)):
                loadgen.wait_idle(srv.url)
                runs[name] = fn(srv.url, questions, args)
                print(f"cache {cache:3} {name:6} {json.dumps(runs[name])}", flush=True)
            st, body = loadgen.http_get(srv.url + "/stats")
            runs["stats_prefix_cache"] = json.loads(body)["models"][0]["metrics"].get(
                "prefix_cache")
            res["runs"][cache] = runs
        log.unlink(missing_ok=True)
    res["speedup"] = {}
    for w in ("shared", "chat"):
        off, on = res["runs"]["off"][w], res["runs"]["on"][w]
        res["speedup"][w] = {
            "ttft_p50": ratio(off["ttft_p50_ms"], on["ttft_p50_ms"]),
            "ttft_p95": ratio(off["ttft_p95_ms"], on["ttft_p95_ms"]),
            "prompt_tok_s": ratio(on["prompt_tok_s"], off["prompt_tok_s"]),
            "req_s": ratio(on["req_s"], off["req_s"]),
        }
    (out / "prefix_cache.json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(out / "prefix_cache.md", res)
    print(json.dumps(res["speedup"]))


if __name__ == "__main__":
    main()
