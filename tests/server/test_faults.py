"""Faults while serving: allocation failures, KV exhaustion, a bad model file, a full disk.

Each fault must end with a clear error and the server must keep serving what it can:
- allocation failures (util/alloc.h's injector, armed once the server listens): each
  allocation site a request sequence meets fails in turn (KRSERVE_FAULT_ALLOC_SITE=n: the
  first allocation of the n-th site met), and every k-th allocation fails under a mixed
  concurrent load (KRSERVE_FAULT_ALLOC_EVERY=k): every request is answered, either as usual or
  with an "out of memory" error (HTTP 500/503 JSON, a JSON-RPC error, a stream's error event);
  no dropped connection, no crash; afterwards every KV block is free, every request counted
  as finished, and SIGTERM exits 0 (with an ASan build, KRS_BUILD_DIR=build-asan, that exit
  also proves no leak);
- KV exhaustion: many concurrent requests on a KV pool that holds about one of them: they
  are queued and preempted, all complete in full, and every block comes back;
- a truncated or corrupt GGUF: `krserve serve` exits non-zero with a message, no crash; the
  same files through /admin/models/load are a JSON error while the loaded model keeps serving;
- the disk full while writing logs (stdout and stderr on /dev/full, debug logging): the
  server keeps answering.
The tiny Gemma 3 of tests/.cache keeps the load fast (the model tests generate it).
"""
import concurrent.futures as cf
import json
import os
import pathlib
import signal
import struct
import subprocess
import time

import pytest

from srv_helpers import BUILD, ROOT, Server, free_port, request, wait_for

TINY = ROOT / "tests" / ".cache" / "models"


def tiny_model():
    found = sorted(TINY.glob("*/gemma3/F32.gguf"))
    if not found:
        pytest.skip("tiny model gemma3 not generated (tests/model creates them)")
    return found[0]


def prompt_ids(n, salt):
    # ids valid in the tiny vocabulary (384)
    return [2] + [3 + (salt * 7919 + i * 131) % 377 for i in range(n - 1)]


def stats(srv):
    """/stats, retried: it may itself meet an injected allocation failure."""
    for _ in range(50):
        st, _, raw = srv.get("/stats")
        if st == 200:
            return json.loads(raw)
        assert st in (500, 503) and b"out of memory" in raw, (st, raw[:300])
    pytest.fail("/stats never answered")


def engine_stats(srv):
    return stats(srv)["models"][0]


def balanced(srv):
    """Idle engine: every KV block free and every submitted request finished."""
    s = engine_stats(srv)["scheduler"]
    return (s["kv_blocks_free"] == s["kv_blocks_total"] and s["running"] == 0
            and s["submitted"] == sum(s["finished"].values()))


def says_oom(raw):
    return b"out of memory" in raw


def check_answer(kind, st, raw):
    """One request's answer: as usual, or a clear out of memory error. Returns 'ok' / 'oom'."""
    if st in (500, 503):
        assert says_oom(raw), (kind, st, raw[:300])
        json.loads(raw)  # a JSON error envelope
        return "oom"
    assert st == 200, (kind, st, raw[:300])
    if kind == "stream":
        text = raw.decode()
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        for ln in text.splitlines():
            if ln.startswith("data: {"):
                ev = json.loads(ln[6:])
                if "error" in ev:
                    assert "out of memory" in ev["error"]["message"], ev
                    return "oom"
        return "ok"
    if kind == "rpc":
        lines = [json.loads(ln) for ln in raw.decode().splitlines() if ln.strip()]
        oom = False
        for msg in lines:
            items = msg if isinstance(msg, list) else [msg]
            for m in items:
                if "error" in m:
                    assert "out of memory" in m["error"]["message"], m
                    oom = True
                elif m.get("method") == "stream.event":
                    p = m["params"]
                    if p["event"] != "completed":
                        assert p["event"] == "error" and "out of memory" in p["message"], p
                        oom = True
                else:
                    for r in (m.get("result") or {}).get("results", []):
                        if not r["success"]:
                            assert "out of memory" in r["error"]["message"], r
                            oom = True
        return "oom" if oom else "ok"
    body = json.loads(raw)
    if kind == "completion":
        assert body["usage"]["completion_tokens"] == 8, body
    return "ok"


def mixed_request(srv, model, i):
    ids = prompt_ids(12 + i % 5, i)
    k = i % 7
    if k == 0:
        kind, st, _, raw = ("completion",) + srv.post("/v1/completions", {
            "model": model, "prompt": ids, "max_tokens": 8, "ignore_eos": True})
    elif k == 1:
        kind, st, _, raw = ("stream",) + srv.post("/v1/completions", {
            "model": model, "prompt": ids, "max_tokens": 8, "stream": True})
    elif k == 2:
        kind, st, _, raw = ("chat",) + srv.post("/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "hello %d" % i}],
            "max_tokens": 6})
    elif k == 3:
        kind, st, _, raw = ("rpc",) + srv.post("/rpc", [
            {"jsonrpc": "2.0", "id": 1, "method": "generate",
             "params": {"prompt": ids, "max_tokens": 6, "stream": True}},
            {"jsonrpc": "2.0", "id": 2, "method": "batch_generate",
             "params": {"requests": [{"prompt": ids, "max_tokens": 3},
                                     {"prompt": ids[:5], "max_tokens": 3}]}}])
    elif k == 4:
        kind, st, _, raw = ("json",) + srv.post("/tokenize", {"model": model, "prompt": "abc"})
    elif k == 5:
        kind, st, _, raw = ("metrics",) + srv.get("/metrics")
        if st == 200:
            return "ok"
    else:
        kind, st, _, raw = ("json",) + srv.get("/v1/models")
    return check_answer(kind, st, raw)


def faulted_server(path, env):
    """The tiny model served with an allocation fault armed by env (prefix cache off: every KV
    block must come back)."""
    return Server(["-m", str(path), "--kv-tokens", "512",
                   "--set", "performance.prefixCache.enabled=false"], env=env)


def check_whole_and_stop(srv):
    """Up, balanced (every KV block free, every request finished); then SIGTERM: exit 0 and
    nothing from a sanitizer. Returns the server's stderr lines."""
    try:
        assert srv.proc.poll() is None, "the server died"
        assert wait_for(lambda: balanced(srv), timeout=20), engine_stats(srv)
    finally:
        srv.stop()
    err = "".join(srv.stderr)
    assert srv.proc.returncode == 0, err[-3000:]
    assert "Sanitizer" not in err and "runtime error" not in err, err[-3000:]
    return srv.stderr


@pytest.mark.parametrize("every", [11, 37, 101])
def test_allocation_failures_while_serving(every):
    path = tiny_model()
    srv = faulted_server(path, {"KRSERVE_FAULT_ALLOC_EVERY": str(every)})
    try:
        with cf.ThreadPoolExecutor(8) as ex:  # the model's id: its file stem
            outcomes = list(ex.map(lambda i: mixed_request(srv, path.stem, i), range(140)))
    finally:
        check_whole_and_stop(srv)
    n_oom = outcomes.count("oom")
    print(f"every {every}: {len(outcomes) - n_oom} answered as usual, {n_oom} out of memory")
    assert n_oom > 0, "no injected failure reached a request"
    assert n_oom < len(outcomes), "nothing was served"


def normalize(kind, st, raw):
    """An answer reduced to what must not change between runs ("oom" for a clear out of
    memory error): texts, finish reasons, usage, token ids; not ids, times or stream names."""
    if st in (500, 503) and says_oom(raw):
        json.loads(raw)
        return "oom"
    assert st == 200, (kind, st, raw[:300])
    if kind == "metrics":
        return "metrics"
    text = raw.decode()
    if "out of memory" in text:
        check_answer("rpc" if kind == "rpc" else "stream" if kind == "sse" else "json", st, raw)
        return "oom"
    if kind == "sse":
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        parts = {}
        for ln in text.splitlines():
            if ln.startswith("data: {"):
                for ch in json.loads(ln[6:])["choices"]:
                    d = ch.get("delta", ch)
                    t = parts.setdefault(ch["index"], [])
                    t.append(d.get("content") or d.get("text") or "")
                    if ch.get("finish_reason"):
                        t.append("|" + ch["finish_reason"])
                    if ch.get("logprobs"):
                        t.append(json.dumps(ch["logprobs"], sort_keys=True))
        return json.dumps(parts, sort_keys=True)
    if kind == "rpc":
        out, streams = [], {}
        for ln in text.splitlines():
            for m in (lambda v: v if isinstance(v, list) else [v])(json.loads(ln)):
                if m.get("method") == "stream.chunk":
                    streams.setdefault(m["params"]["stream_id"], []).append(
                        (m["params"]["index"], m["params"]["text"]))
                elif m.get("method") == "stream.event":
                    out.append(("end", m["params"]["event"],
                                [t for _, t in streams.get(m["params"]["stream_id"], [])],
                                [i for i, _ in streams.get(m["params"]["stream_id"], [])]))
                elif "result" in m or "error" in m:
                    r = json.loads(json.dumps(m.get("result") or m.get("error")))
                    for x in [r] + list(r.get("results", []) if isinstance(r, dict) else []):
                        if isinstance(x, dict):
                            x.pop("timing", None)
                            x.pop("stream_id", None)
                    out.append((m.get("id"), r))
        return json.dumps(out, sort_keys=True)
    body = json.loads(raw)
    body.pop("id", None)

    def drop_created(v):
        if isinstance(v, dict):
            return {k: drop_created(x) for k, x in v.items() if k != "created"}
        return [drop_created(x) for x in v] if isinstance(v, list) else v
    return json.dumps(drop_created(body), sort_keys=True)


def sequence(srv, model):
    """A fixed, deterministic (greedy) request sequence, one at a time, over every route that
    allocates; each answer normalized (normalize)."""
    ids = prompt_ids(14, 5)
    chat = [{"role": "user", "content": "hello there"}]
    steps = [
        ("json", "/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0,
                                     "ignore_eos": True, "logprobs": 2}),
        ("sse", "/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0,
                                    "ignore_eos": True, "stream": True}),
        ("json", "/v1/chat/completions", {"messages": chat, "max_tokens": 6, "temperature": 0,
                                          "ignore_eos": True}),
        ("sse", "/v1/chat/completions", {"messages": chat, "max_tokens": 6, "temperature": 0,
                                         "ignore_eos": True, "stream": True, "logprobs": True,
                                         "top_logprobs": 2}),
        ("json", "/v1/completions", {"prompt": ids[:9], "max_tokens": 4, "temperature": 0,
                                     "ignore_eos": True, "n": 2}),
        ("rpc", "/rpc", [{"jsonrpc": "2.0", "id": 1, "method": "generate",
                          "params": {"prompt": ids, "max_tokens": 6, "temperature": 0,
                                     "ignore_eos": True}},
                         {"jsonrpc": "2.0", "id": 2, "method": "batch_generate",
                          "params": {"requests": [
                              {"prompt": ids, "max_tokens": 3, "temperature": 0},
                              {"prompt": ids[:5], "max_tokens": 3, "temperature": 0}]}},
                         {"jsonrpc": "2.0", "id": 3, "method": "tokenize",
                          "params": {"text": "abc"}}]),
        ("json", "/tokenize", {"prompt": "abc"}),
        ("json", "/tokenize", {"messages": chat}),
        ("json", "/detokenize", {"tokens": [2, 100, 200]}),
        ("json", "/v1/models", None),
        ("metrics", "/metrics", None),
    ]
    out = []
    for kind, route, body in steps:
        if isinstance(body, dict):
            body = dict(body, model=model)
        st, _, raw = srv.get(route) if body is None else srv.post(route, body)
        out.append(normalize(kind, st, raw))
    return out


def serve_sequence(path, env):
    """Starts a server with env, runs the sequence, checks it stays whole, stops it; returns
    (outcomes, what the server said about the injection)."""
    srv = faulted_server(path, env)
    try:
        outcomes = sequence(srv, path.stem)  # the model's id: its file stem
    finally:
        lines = check_whole_and_stop(srv)
    said = [ln for ln in lines if ln.startswith("fault injection:")]
    assert said, "".join(lines)[-2000:]
    return outcomes, said[-1]


def test_every_allocation_site_while_serving():
    """A dry run counts the distinct allocation sites a served request sequence meets
    (KRSERVE_FAULT_ALLOC_SITE=0); then, one server each, the first allocation of the n-th site
    fails for n = 1..count: every answer is the dry run's or a clear out of memory error, the
    server stays up, every KV block and request balance, and it exits 0."""
    path = tiny_model()
    dry, said = serve_sequence(path, {"KRSERVE_FAULT_ALLOC_SITE": "0"})
    assert "oom" not in dry
    count = int(said.split()[2])
    assert count > 20, said
    fired = oom = 0
    for n in range(1, count + 1):
        got, said = serve_sequence(path, {"KRSERVE_FAULT_ALLOC_SITE": str(n)})
        fired += said.rstrip().endswith("fired")
        oom += "oom" in got
        for i, (g, d) in enumerate(zip(got, dry)):
            # as in the dry run, or a clear out of memory error: never silently different
            assert g == d or g == "oom", (n, i, g[:800], d[:800])
    print(f"{count} sites: {fired} injected failures fired, {oom} runs answered out of memory")
    # Threads make the order in which sites are first met vary a little between runs; nearly
    # every run must still fail one.
    assert fired >= count * 9 // 10, (fired, count)


def test_kv_exhaustion_under_load():
    """24 concurrent requests of 40 + 48 positions on a 128-position KV pool: queued and
    preempted, each completes in full, and every block comes back."""
    path = tiny_model()
    srv = Server(["-m", str(path), "--kv-tokens", "128",
                  "--set", "performance.prefixCache.enabled=false"])
    try:
        st, _, raw = srv.get("/v1/models")
        model = json.loads(raw)["data"][0]["id"]

        def one(i):
            return srv.post("/v1/completions", {"model": model, "prompt": prompt_ids(40, i),
                                                "max_tokens": 48, "ignore_eos": True,
                                                "temperature": 0})
        with cf.ThreadPoolExecutor(24) as ex:
            res = list(ex.map(one, range(24)))
        for st, _, raw in res:
            assert st == 200, raw[:300]
            body = json.loads(raw)
            assert body["usage"]["completion_tokens"] == 48, body
            assert body["choices"][0]["finish_reason"] == "length"
        s = engine_stats(srv)["scheduler"]
        assert s["preemptions"] > 0, s  # the pool really ran out
        assert wait_for(lambda: balanced(srv), timeout=10), engine_stats(srv)
        st, _, raw = srv.get("/metrics")
        used = [ln for ln in raw.decode().splitlines()
                if ln.startswith("krserve_kv_blocks{") and 'state="used"' in ln]
        assert used and all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in used), used
    finally:
        srv.stop()


def corrupt_variants(good):
    """(name, bytes) of broken copies of a GGUF file."""
    data = good.read_bytes()
    out = []
    for cut in (0, 3, 8, 16, 24, 200, len(data) // 2, len(data) - 1):
        out.append((f"truncated_at_{cut}", data[:cut]))
    out.append(("bad_magic", b"GGUX" + data[4:]))
    out.append(("bad_version", data[:4] + struct.pack("<I", 99) + data[8:]))
    out.append(("huge_tensor_count", data[:8] + struct.pack("<Q", 1 << 62) + data[16:]))
    out.append(("huge_kv_count", data[:16] + struct.pack("<Q", 1 << 62) + data[24:]))
    out.append(("huge_key_length", data[:24] + struct.pack("<Q", 1 << 62) + data[32:]))
    return out


def test_corrupt_gguf_at_load(tmp_path):
    for name, blob in corrupt_variants(tiny_model()):
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        p = subprocess.run([str(BUILD / "krserve"), "serve", "-m", str(bad), "--port",
                            str(free_port()), "--kv-tokens", "256"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode > 0, (name, p.returncode, p.stderr[-2000:])  # < 0: a signal
        assert "cannot load" in p.stderr, (name, p.stderr[-2000:])
        assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr


def test_corrupt_gguf_admin_load_keeps_serving(tmp_path):
    variants = corrupt_variants(tiny_model())
    for name, blob in variants:
        (tmp_path / f"{name}.gguf").write_bytes(blob)
    srv = Server(["-m", str(tiny_model()), "--kv-tokens", "256", "--model-dir", str(tmp_path)])
    try:
        st, _, raw = srv.get("/v1/models")
        model = json.loads(raw)["data"][0]["id"]
        for name, _ in variants:
            st, _, raw = srv.post("/admin/models/load", {"name": f"{name}.gguf"})
            assert 400 <= st < 600, (name, st, raw[:300])
            assert json.loads(raw)["error"]["message"], raw
            st, _, raw = srv.post("/v1/completions", {"model": model, "prompt": prompt_ids(8, 1),
                                                      "max_tokens": 4, "ignore_eos": True})
            assert st == 200, (name, raw[:300])
        st, _, raw = srv.get("/v1/models")
        assert [m["id"] for m in json.loads(raw)["data"]] == [model]
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


def test_disk_full_while_logging():
    """stdout and stderr on /dev/full with debug logging: every write fails (ENOSPC) and the
    server keeps serving, then drains and exits 0 on SIGTERM."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.pop("KRSERVE_CONFIG", None)
    with open("/dev/full", "w") as full:
        proc = subprocess.Popen([str(BUILD / "krserve"), "serve", "-m", str(tiny_model()),
                                 "--port", str(port), "--kv-tokens", "256",
                                 "--log-level", "debug"],
                                cwd=ROOT, env=env, stdout=full, stderr=full)
    try:
        def ready():
            try:
                return request(url + "/ready")[0] == 200
            except OSError:
                return False
        assert wait_for(ready, timeout=60), "server did not become ready"
        st, _, raw = request(url + "/v1/models")
        model = json.loads(raw)["data"][0]["id"]
        for i in range(20):
            body = {"model": model, "prompt": prompt_ids(10, i), "max_tokens": 5,
                    "ignore_eos": True, "stream": i % 2 == 1}
            st, _, raw = request(url + "/v1/completions", data=json.dumps(body).encode())
            assert st == 200, raw[:300]
            st, _, _ = request(url + "/nonexistent")  # an error path that logs
            assert st == 404
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
