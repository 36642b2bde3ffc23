#!/usr/bin/env python3
"""kr-serve vs llama-server: the same model, machine, load generator and workload, one run.

Starts `krserve serve` and `llama-server` (one after the other, never both at once, each on
its own free port), and for each client count runs the same closed loop (bench/serve/loadgen.py:
N clients, each sending --per-client streamed chat completions of --max-tokens tokens with
ignore_eos at temperature 0, so both servers do the same work). Per server and level: output
tok/s over the wall time, TTFT p50/p95, inter-token gap p50/p99, end-to-end p99; then the
ratios kr-serve / llama-server. Writes --md and --json.

Usage:
  peer_compare.py --model M.gguf --krserve build/krserve --llama-server PATH/llama-server \
      [--device cuda] [--clients 1,16,64,256] [--max-tokens 128] [--per-client 2] \
      [--md OUT.md] [--json OUT.json] [--krserve-arg=--set ...] [--llama-arg=-ngl ...]
The llama-server gets -np = the largest client count (one slot per client), -c = slots * 512,
-ngl 999 when --device cuda (else 0, and CUDA_VISIBLE_DEVICES hidden from it)."""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from run_bench import dist  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def wait_ready(url, proc, timeout=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        # kr-serve answers /health while it loads its model and /ready once it can serve;
        # llama-server has no /ready and answers /health 200 only when loaded.
        try:
            st, _ = loadgen.http_get(url + "/ready", timeout=2.0)
            if st == 404:
                st, _ = loadgen.http_get(url + "/health", timeout=2.0)
            if st == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server not ready in time")


def measure(url, questions, clients, per_client, max_tokens):
    # warm-up at this level (first requests pay lazy setup on either server)
    loadgen.run_closed_loop(url, questions, clients, 1, 8, ignore_eos=True)
    t0 = time.perf_counter()
    res = loadgen.run_closed_loop(url, questions, clients, per_client, max_tokens,
                                  ignore_eos=True)
    wall = time.perf_counter() - t0
    ok = [r for r in res if r.ok]
    toks = sum(r.completion_tokens or len(r.chunk_times) for r in ok)
    gaps = [g for r in ok for g in r.inter_token()]
    return {
        "clients": clients, "requests": len(res), "ok": len(ok),
        "errors": sorted({r.error for r in res if not r.ok})[:3],
        "wall_s": round(wall, 3), "output_tok_s": round(toks / wall, 1),
        "ttft_ms": dist([r.t_first - r.t_send for r in ok if r.t_first]),
        "itl_ms": dist(gaps),
        "e2e_ms": dist([r.t_end - r.t_send for r in ok]),
    }


def run_server(name, cmd, env, port, levels, questions, a, log):
    url = f"http://127.0.0.1:{port}"
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(url, proc)
            out = []
            for c in levels:
                m = measure(url, questions, c, a.per_client, a.max_tokens)
                print(f"[{name}] {c:4d} clients: {m['output_tok_s']:9.1f} tok/s, TTFT p95 "
                      f"{m['ttft_ms']['p95']} ms, ITL p99 {m['itl_ms']['p99']} ms, ok "
                      f"{m['ok']}/{m['requests']} {m['errors']}", file=sys.stderr, flush=True)
                out.append(m)
            return out
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--krserve", default="build/krserve")
    ap.add_argument("--llama-server")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--krserve-arg", action="append", default=[])
    ap.add_argument("--llama-arg", action="append", default=[])
    ap.add_argument("--md")
    ap.add_argument("--json")
    ap.add_argument("--logs", default="/tmp")
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    slots = max(levels)
    questions = [q for q in (HERE / "questions.txt").read_text().splitlines() if q.strip()]
    results = {}
    env = dict(os.environ)
    kcmd = [a.krserve, "serve", "--model", a.model, "--device", a.device,
            "--port", str(loadgen.free_port()),
            "--set", f"performance.gpuScheduler.autoTune.maxBatch={slots}",
            "--set", f"performance.gpuScheduler.batchSize={min(slots, 64)}",
            "--set", f"server.maxQueue={max(256, 2 * slots)}",
            "--set", f"server.threads={min(1024, slots + 8)}"] + a.krserve_arg
    if a.threads:
        kcmd += ["--threads", str(a.threads)]
    kport = int(kcmd[kcmd.index("--port") + 1])
    results["krserve"] = run_server("krserve", kcmd, env, kport, levels, questions, a,
                                    f"{a.logs}/peer_krserve.log")
    if a.llama_server:
        lport = loadgen.free_port()
        lenv = dict(env)
        ngl = "999" if a.device == "cuda" else "0"
        if a.device != "cuda":
            lenv["CUDA_VISIBLE_DEVICES"] = ""
        lcmd = [a.llama_server, "-m", a.model, "--port", str(lport), "-np", str(slots),
                "-c", str(slots * 512), "-ngl", ngl, "--no-webui"] + a.llama_arg
        if a.threads:
            lcmd += ["-t", str(a.threads)]
        results["llama-server"] = run_server("llama-server", lcmd, lenv, lport, levels,
                                             questions, a, f"{a.logs}/peer_llama.log")
    lines = [f"# kr-serve vs llama-server ({a.device}, {pathlib.Path(a.model).name})", "",
             f"Same run, same machine, same loadgen: closed loop, {a.per_client} streamed chat "
             f"completions per client, {a.max_tokens} tokens each (ignore_eos, temperature 0).",
             "", "| clients | server | output tok/s | TTFT p50 / p95 ms | inter-token p50 / p99 "
             "ms | e2e p99 ms | ok |", "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(levels):
        for name, rs in results.items():
            m = rs[i]
            lines.append(f"| {c} | {name} | {m['output_tok_s']} | {m['ttft_ms']['p50']} / "
                         f"{m['ttft_ms']['p95']} | {m['itl_ms']['p50']} / {m['itl_ms']['p99']} | "
                         f"{m['e2e_ms']['p99']} | {m['ok']}/{m['requests']} |")
    if "llama-server" in results:
        lines += ["", "| clients | tok/s ratio (kr-serve / llama-server) | TTFT p95 ratio | "
                  "inter-token p99 ratio |", "|---|---|---|---|"]
        for i, c in enumerate(levels):
            k, l_ = results["krserve"][i], results["llama-server"][i]

            def ratio(x, y):
                return f"{x / y:.2f}x" if x and y else "n/a"
            lines.append(f"| {c} | {ratio(k['output_tok_s'], l_['output_tok_s'])} | "
                         f"{ratio(k['ttft_ms']['p95'], l_['ttft_ms']['p95'])} | "
                         f"{ratio(k['itl_ms']['p99'], l_['itl_ms']['p99'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        pathlib.Path(a.md).write_text(text)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
