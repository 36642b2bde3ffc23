#!/usr/bin/env python3
"""Time to first token request by request on a fresh server: where does a first request's
extra latency come from? Starts `krserve serve` (ARGS after --), then sends, one at a time,
streamed chat completions whose prompts grow in length, each twice, and prints the TTFT and
end-to-end time of every request. A request slower than its repeat paid a first-sight cost
(a new step shape, a kernel loaded lazily); one as fast as its repeat did not.

usage: ttft_probe.py KRSERVE MODEL [--max-tokens N] [--json OUT] [-- extra serve args]"""
import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "serve"))
import loadgen  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars watch "
         "from far above the quiet hills ").split()


def prompt_of(n_words):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("krserve")
    ap.add_argument("model")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--log", default="/tmp/ttft_probe_server.log")
    a, serve_args = ap.parse_known_args()
    serve_args = [x for x in serve_args if x != "--"]
    rows = []
    with loadgen.ServerProcess(a.krserve, a.model, serve_args, log_path=a.log) as srv:
        for n_words in (4, 4, 20, 20, 60, 60, 150, 150, 400, 400, 7, 33, 97, 211):
            r = loadgen.chat_request(srv.url, prompt_of(n_words), a.max_tokens, ignore_eos=True)
            row = {"words": n_words, "ok": r.ok, "prompt_tokens": r.prompt_tokens,
                   "ttft_ms": round((r.t_first - r.t_send) * 1e3, 2) if r.t_first else None,
                   "e2e_ms": round((r.t_end - r.t_send) * 1e3, 2), "error": r.error}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
