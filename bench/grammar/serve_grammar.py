#!/usr/bin/env python3
"""Constrained decoding end to end: generated tokens/s with a JSON schema vs without, at batch
1 and 16, on one server (CPU, fixed batch 16, the default model).

Every request is a streamed chat completion of exactly --tokens tokens: unconstrained ones with
ignore_eos, constrained ones with a schema whose shortest reply is longer than that (an array
of 24 strings), so both do the same number of decode steps. B requests start together; decode
tok/s = tokens generated after each request's first token / (last token - first first token).
Rounds alternate plain / schema in ABBA order so that machine load drifts affect both alike;
the table gives medians over the rounds (the shared 2-core dev VM is noisy).

Writes bench/results/grammar_serve.json and prints a markdown table. With --server-log FILE
the server logs at debug level to FILE and the constrained requests' own mask statistics (the
scheduler's "grammar:" line per request: masks, cached, shared, ms computing) are summed too.
Usage: serve_grammar.py [--exe build/krserve] [--model models/default.gguf] [--rounds 3]
                        [--server-log FILE]"""
import argparse
import json
import re
import pathlib
import platform
import socket
import statistics
import subprocess
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "string", "maxLength": 40},
              "minItems": 24, "maxItems": 24}}, "required": ["items"]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(url, body, out):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if ch.get("choices") and ch["choices"][0]["delta"].get("content"):
                times.append(time.time())
            if ch.get("usage"):
                out["tokens"] = ch["usage"]["completion_tokens"]
    out["times"] = times


def batch(url, n, constrained, tokens, seed0):
    outs = [{} for _ in range(n)]
    ths = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": "List things you like, as JSON."}],
                "max_tokens": tokens, "temperature": 0.8, "seed": seed0 + i, "stream": True,
                "stream_options": {"include_usage": True}}
        if constrained:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "l", "schema": SCHEMA}}
        else:
            body["ignore_eos"] = True
        ths.append(threading.Thread(target=one, args=(url, body, outs[i])))
    t0 = time.time()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    t1 = time.time()
    firsts = [o["times"][0] for o in outs if o.get("times")]
    lasts = [o["times"][-1] for o in outs if o.get("times")]
    toks = sum(o.get("tokens", 0) for o in outs)
    dec = sum(max(o.get("tokens", 0) - 1, 0) for o in outs)
    return {"tokens": toks, "wall_s": t1 - t0, "e2e_tok_s": toks / (t1 - t0),
            "decode_tok_s": dec / (max(lasts) - min(firsts)) if lasts else None,
            "all_full_length": all(o.get("tokens") == tokens for o in outs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", default=str(ROOT / "build" / "krserve"))
    ap.add_argument("--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grammar_serve.json"))
    ap.add_argument("--server-log", default=None)
    a = ap.parse_args()
    port = free_port()
    log = open(a.server_log, "w") if a.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [a.exe, "serve", "-m", a.model, "--device", a.device, "--port", str(port),
         "--kv-tokens", "16384",
         "--log-level", "debug" if a.server_log else "warn",
         "--set", "performance.gpuScheduler.mode=fixed",
         "--set", "performance.gpuScheduler.batchSize=16"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        if "listening on" not in proc.stdout.readline():
            raise SystemExit("server did not start")
        url = f"http://127.0.0.1:{port}"
        batch(url, 2, True, 8, 1)  # warm-up: vocabulary table, caches
        res = {}
        for b in (1, 16):
            for r in range(a.rounds):
                for c in ((False, True) if r % 2 == 0 else (True, False)):  # ABBA
                    x = batch(url, b, c, a.tokens, 100 * r + 1)
                    res.setdefault(f"{b}/{'schema' if c else 'plain'}", []).append(x)
        rows = []
        for b in (1, 16):
            p, s = res[f"{b}/plain"], res[f"{b}/schema"]
            med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
            dp, ds = med(p, "decode_tok_s"), med(s, "decode_tok_s")
            ep, es = med(p, "e2e_tok_s"), med(s, "e2e_tok_s")
            rows.append({"batch": b, "plain_decode_tok_s": round(dp, 2),
                         "schema_decode_tok_s": round(ds, 2),
                         "decode_slowdown_pct": round(100 * (1 - ds / dp), 1),
                         "plain_e2e_tok_s": round(ep, 2), "schema_e2e_tok_s": round(es, 2),
                         "e2e_slowdown_pct": round(100 * (1 - es / ep), 1),
                         "full_length": all(x["all_full_length"] for x in p + s)})
        doc = {"machine": platform.node(), "cpu_count": __import__("os").cpu_count(),
               "device": a.device,
               "tokens_per_request": a.tokens, "rounds": a.rounds, "schema": SCHEMA,
               "rows": rows, "raw": res}
        pathlib.Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
        print("| batch | plain decode tok/s | schema decode tok/s | slower | plain e2e tok/s | "
              "schema e2e tok/s | slower |\n|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['batch']} | {r['plain_decode_tok_s']} | {r['schema_decode_tok_s']} | "
                  f"{r['decode_slowdown_pct']} % | {r['plain_e2e_tok_s']} | "
                  f"{r['schema_e2e_tok_s']} | {r['e2e_slowdown_pct']} % |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if a.server_log:
            log.close()
            grammar_stats(a.server_log)


def grammar_stats(path):
    """Sums the scheduler's per-request grammar lines of the server log."""
    pat = re.compile(r"grammar: (\d+) masks \((\d+) cached, (\d+) from the shared cache\), "
                     r"([\d.]+) ms computing them")
    n = masks = cached = shared = 0
    ms = 0.0
    for line in open(path, errors="replace"):
        m = pat.search(line)
        if m:
            n += 1
            masks += int(m[1])
            cached += int(m[2])
            shared += int(m[3])
            ms += float(m[4])
    if n:
        print(f"\nserver: {n} constrained requests, {masks} masks, {cached} from the matcher's "
              f"cache, {shared} from the shared cache, {ms:.1f} ms computing the others "
              f"({1000 * ms / masks:.1f} us per mask, all masks counted)")


if __name__ == "__main__":
    main()
