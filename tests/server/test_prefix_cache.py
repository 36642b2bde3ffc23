"""Prefix cache, through the OpenAI API: outputs with the cache equal outputs without it.

Each model is served twice, one server at a time: with `performance.prefixCache.enabled` off
(the reference) and on. Token-id prompts share prefixes, diverge at and around block
boundaries (blocks are 16 positions), and are as long as several sliding windows of the tiny
Gemma 3 (window 16); every prompt runs greedy and with a seed, with logprobs, and the texts
and logprobs must match the reference: run once (misses and partial hits), again (full hits),
concurrently (batched with shared blocks), and on a server with so little KV memory that
requests are preempted mid-generation and cached blocks are evicted.
"""
import concurrent.futures as cf
import json
import pathlib

import pytest

from srv_helpers import DEFAULT_MODEL, ROOT, Server, wait_for

BS = 16
TINY = ROOT / "tests" / ".cache" / "models"


def tiny_model(name):
    found = sorted(TINY.glob(f"*/{name}/F32.gguf"))
    if not found:
        pytest.skip(f"tiny model {name} not generated (tests/model creates them)")
    return found[0]


def base_tokens(n, salt):
    # ids in [3, 380): valid in the tiny vocabularies (384) and in Gemma 3's
    return [2] + [3 + (salt * 7919 + i * 131 + (i * i) % 97) % 377 for i in range(n - 1)]


def prompts():
    a = base_tokens(240, 1)
    b = base_tokens(240, 2)
    out = []
    for n in (15, 16, 17, 31, 32, 33, 48, 49, 100, 200):  # block boundaries, long windows
        out.append(a[:n])
    for div in (1, 15, 16, 17, 40):  # branches off a
        p = a[:div] + b[div:div + 30]
        out.append(p)
    out.append(b[:64])
    return out


def complete(srv, model, prompt, seed):
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "logprobs": 1}
    if seed is None:
        body["temperature"] = 0
    else:
        body.update(temperature=1.0, seed=seed)
    st, _, raw = srv.post("/v1/completions", body)
    assert st == 200, raw
    r = json.loads(raw)
    c = r["choices"][0]
    return {"text": c["text"], "lp": c["logprobs"]["token_logprobs"],
            "cached": r["usage"]["prompt_tokens_details"]["cached_tokens"]}


def run_all(srv, model, jobs, workers=1):
    with cf.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda j: complete(srv, model, j[0], j[1]), jobs))


def same(ref, got):
    assert len(ref) == len(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert g["text"] == r["text"], f"job {i}: {g['text']!r} != {r['text']!r}"
        worst = max((abs(x - y) for x, y in zip(r["lp"], g["lp"])), default=0)
        assert worst <= 1e-5, f"job {i}: logprobs differ by {worst}"


def metric(srv, name, labels=""):
    st, _, raw = srv.get("/metrics")
    total = 0.0
    for ln in raw.decode().splitlines():
        if ln.startswith(name + "{") and labels in ln:
            total += float(ln.rsplit(" ", 1)[1])
    return total


def serve(model_path, env, kv_tokens=4096, args=()):
    s = Server(args=("-m", str(model_path), "--kv-tokens", str(kv_tokens), *args), env=env)
    st, _, raw = s.get("/v1/models")
    model = json.loads(raw)["data"][0]["id"]
    return s, model


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_cache_equals_no_cache_tiny(name):
    path = tiny_model(name)
    jobs = [(p, None) for p in prompts()] + [(p, 1000 + i) for i, p in enumerate(prompts())]
    s, model = serve(path, {"KRSERVE_PREFIX_CACHE": "0"})
    try:
        ref = run_all(s, model, jobs)
        assert all(r["cached"] == 0 for r in ref)
        assert metric(s, "krserve_prefix_cache_requests_total") == 0
    finally:
        s.stop()

    s, model = serve(path, {})
    try:
        first = run_all(s, model, jobs)
        same(ref, first)
        assert any(r["cached"] > 0 for r in first)  # shared prefixes hit on the first pass
        again = run_all(s, model, jobs)
        same(ref, again)
        # every prompt is cached now: all of it but the block holding its last token
        for (p, _), r in zip(jobs, again):
            assert r["cached"] == (len(p) - 1) // BS * BS, (len(p), r["cached"])
        together = run_all(s, model, jobs, workers=8)
        same(ref, together)
        assert metric(s, "krserve_prefix_cache_requests_total", 'result="hit"') > len(jobs)
        assert metric(s, "krserve_prefix_cache_tokens_total", 'result="hit"') > 0
        assert metric(s, "krserve_prefix_cache_blocks") > 0
    finally:
        s.stop()

    # Little KV memory and a small cap: preemptions in the middle of generations, and cached
    # blocks evicted under pressure; outputs unchanged.
    s, model = serve(path, {"KRSERVE_PREFIX_CACHE_MAX_TOKENS": "64"}, kv_tokens=256,
                     args=("--set", "performance.gpuScheduler.mode=fixed",
                           "--set", "performance.gpuScheduler.batchSize=12"))
    try:
        pressed = run_all(s, model, jobs, workers=12)
        same(ref, pressed)
        assert metric(s, "krserve_preemptions_total") > 0
        assert metric(s, "krserve_prefix_cache_evictions_total") > 0
        assert metric(s, "krserve_prefix_cache_requests_total", 'result="hit"') > 0
    finally:
        s.stop()


def test_cache_equals_no_cache_default_model():
    """The default model (Gemma 3 270M, window 512): a chat-like shared prefix, short turns."""
    sysp = base_tokens(90, 3)
    jobs = [(sysp + base_tokens(8 + 5 * i, 10 + i)[1:], None if i % 2 else 50 + i)
            for i in range(6)]
    s, model = serve(DEFAULT_MODEL, {"KRSERVE_PREFIX_CACHE": "0"})
    try:
        ref = run_all(s, model, jobs)
    finally:
        s.stop()
    s, model = serve(DEFAULT_MODEL, {})
    try:
        got = run_all(s, model, jobs)
        same(ref, got)
        assert all(r["cached"] >= 80 for r in got[1:])  # the shared 90 tokens, whole blocks
        together = run_all(s, model, jobs, workers=6)
        same(ref, together)
    finally:
        s.stop()


def test_chat_usage_reports_cached_tokens(server):
    """The session server (default config: cache on) reports cached prompt tokens in usage,
    streaming included, and /stats carries the hit rates."""
    msgs = [{"role": "system", "content": "You answer in one word. " * 12},
            {"role": "user", "content": "Colour of the sky?"}]
    body = {"model": "default", "messages": msgs, "max_tokens": 2, "temperature": 0}
    st, _, raw = server.post("/v1/chat/completions", body)
    assert st == 200
    u1 = json.loads(raw)["usage"]
    st, _, raw = server.post("/v1/chat/completions", body)
    u2 = json.loads(raw)["usage"]
    assert u2["prompt_tokens"] == u1["prompt_tokens"]
    assert u2["prompt_tokens_details"]["cached_tokens"] == (u1["prompt_tokens"] - 1) // BS * BS
    st, _, raw = server.post("/v1/chat/completions",
                             dict(body, stream=True, stream_options={"include_usage": True}))
    events = [json.loads(ln[6:]) for ln in raw.decode().splitlines()
              if ln.startswith("data: {")]
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage and usage[-1]["prompt_tokens_details"]["cached_tokens"] > 0
    st, _, raw = server.get("/stats")
    pc = json.loads(raw)["models"][0]["metrics"]["prefix_cache"]
    assert pc["hit_requests"] >= 2 and 0 < pc["token_hit_rate"] <= 1


def test_n_choices_share_the_prompt():
    """`n` > 1: one generation per choice, each with its own sampler (seed + i), the prompt
    computed once and shared; streamed chunks carry their choice's index."""
    path = tiny_model("gemma3")
    s, model = serve(path, {})
    try:
        p = base_tokens(100, 7)
        body = {"model": model, "prompt": p, "max_tokens": 10, "temperature": 1.0, "seed": 40,
                "logprobs": 1}
        before = metric(s, "krserve_prefix_cache_requests_total", 'result="hit"')
        st, _, raw = s.post("/v1/completions", dict(body, n=4))
        assert st == 200, raw
        r = json.loads(raw)
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        # choices 1..3 attached the prompt the first choice computed (96 = whole blocks)
        assert metric(s, "krserve_prefix_cache_requests_total", 'result="hit"') - before >= 3
        assert r["usage"]["prompt_tokens"] == 100
        assert r["usage"]["completion_tokens"] == 40
        texts = [c["text"] for c in r["choices"]]
        # choice i is what a single request with seed 40 + i gives
        for i in range(4):
            st, _, raw = s.post("/v1/completions", dict(body, seed=40 + i))
            one = json.loads(raw)["choices"][0]
            assert one["text"] == texts[i]
            assert one["logprobs"]["token_logprobs"] == \
                r["choices"][i]["logprobs"]["token_logprobs"]
        assert len(set(texts)) > 1  # distinct seeds, distinct samples
        # greedy: every choice the same
        st, _, raw = s.post("/v1/completions", dict(body, temperature=0, n=3))
        g = [c["text"] for c in json.loads(raw)["choices"]]
        assert g[0] == g[1] == g[2]
        # streaming, chat-shaped counts per index
        st, _, raw = s.post("/v1/completions",
                            dict(body, n=2, stream=True, stream_options={"include_usage": True}))
        assert st == 200
        events = [json.loads(ln[6:]) for ln in raw.decode().splitlines()
                  if ln.startswith("data: {")]
        got = {0: "", 1: ""}
        fins = {}
        for e in events:
            for c in e.get("choices", []):
                got[c["index"]] += c["text"]
                if c["finish_reason"]:
                    fins[c["index"]] = c["finish_reason"]
        assert got[0] == texts[0] and got[1] == texts[1]
        assert fins == {0: "length", 1: "length"}
        assert events[-1]["usage"]["completion_tokens"] == 20
        assert raw.decode().rstrip().endswith("data: [DONE]")
    finally:
        s.stop()
