"""`krserve rpc` (JSON-RPC 2.0 over stdio) on the default model.

Oracles: token ids of a prompt hard-coded from the GGUF vocabulary (the ids tests/model uses);
greedy continuations from `krserve eval-logits --greedy` (the model run directly, no scheduler,
no RPC); non-streaming text vs concatenated streaming chunks; batch items vs the same requests
run alone. Protocol errors are checked against the JSON-RPC 2.0 / kr-serve-mlx codes.
"""
import json
import os
import queue
import subprocess
import tempfile
import threading
import time

import pytest

PROMPT = "One, two, three, four,"
PROMPT_IDS = [2, 4906, 236764, 1156, 236764, 1806, 236764, 2390, 236764]
TIMEOUT = 120  # seconds per awaited message; 2 shared cores can be slow


class Rpc:
    """A `krserve rpc` child: send JSON lines, collect JSON lines from a reader thread."""

    def __init__(self, exe, root, *args):
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(
            [str(exe), "rpc", *args], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.err)
        self.q = queue.Queue()
        self.seen = []  # every message, in arrival order
        self.lines = []  # raw stdout lines
        self.pending = []  # received but not yet consumed by a wait
        self.next_id = 1000
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)
            self.q.put(json.loads(line))
        self.q.put(None)

    def send(self, obj):
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.p.stdin.write(data.encode() + b"\n")
        self.p.stdin.flush()

    def _take(self, pred, timeout=TIMEOUT):
        for i, m in enumerate(self.pending):
            if pred(m):
                return self.pending.pop(i)
        end = time.time() + timeout
        while True:
            try:
                m = self.q.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                raise AssertionError(f"timed out; stderr: {self.stderr()[-2000:]}")
            if m is None:
                raise AssertionError(f"krserve rpc exited; stderr: {self.stderr()[-2000:]}")
            self.seen.append(m)
            if pred(m):
                return m
            self.pending.append(m)

    def response(self, rid, timeout=TIMEOUT):
        return self._take(lambda m: isinstance(m, dict) and "method" not in m and m.get("id") == rid,
                          timeout)

    def any_message(self, timeout=TIMEOUT):
        return self._take(lambda m: True, timeout)

    def call(self, method, params=None, rid=None):
        if rid is None:
            self.next_id += 1
            rid = self.next_id
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return self.response(rid)

    def stream(self, sid, timeout=TIMEOUT):
        """Notifications of stream sid up to and including its stream.event."""
        out = []
        while True:
            m = self._take(lambda m: isinstance(m, dict) and m.get("method", "").startswith(
                "stream.") and m["params"]["stream_id"] == sid, timeout)
            out.append(m)
            if m["method"] == "stream.event":
                return out

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def close(self):
        if self.p.stdin and not self.p.stdin.closed:
            self.p.stdin.close()
        rc = self.p.wait(timeout=TIMEOUT)
        return rc


FIXED = ["--set", "performance.gpuScheduler.mode=fixed", "--set",
         "performance.gpuScheduler.batchSize=4"]


@pytest.fixture(scope="module")
def rpc(krserve, root, default_model):
    r = Rpc(krserve, root, "--model-dir", str(root / "models"), *FIXED)
    yield r
    assert r.close() == 0


@pytest.fixture(scope="module")
def greedy_oracle(krserve, root, default_model):
    out = subprocess.run([str(krserve), "eval-logits", "--tokens", ",".join(map(str, PROMPT_IDS)),
                          "--greedy", "12"], cwd=root, capture_output=True, check=True, text=True)
    return [int(x) for x in out.stdout.strip().split(",")]


def result(resp):
    assert "error" not in resp, resp
    return resp["result"]


def error_code(resp):
    assert "error" in resp and "result" not in resp, resp
    return resp["error"]["code"]


def chunks_of(notes):
    return [n["params"] for n in notes if n["method"] == "stream.chunk"]


def test_runtime_info(rpc):
    info = result(rpc.call("runtime/info"))
    assert info["protocol"] == "json-rpc-2.0"
    assert info["model"] == "default" and info["models"] == ["default"]
    assert info["version"]
    need = {"generate", "batch_generate", "stream", "cancel", "tokenize", "detokenize",
            "load_model", "unload_model", "chat", "logprobs", "priority"}
    assert need <= set(info["capabilities"])


def test_runtime_state(rpc):
    st = result(rpc.call("runtime/state"))
    (m,) = st["models"]
    assert m["model"] == "default" and m["mode"] == "fixed" and m["batch_limit"] == 4
    assert set(m["queued"]) == {"urgent", "default", "background"}
    assert m["kv_blocks_total"] > 0 and 0 <= m["kv_blocks_free"] <= m["kv_blocks_total"]


def test_tokenize_detokenize(rpc):
    toks = result(rpc.call("tokenize", {"text": PROMPT}))["tokens"]
    assert toks == PROMPT_IDS
    assert result(rpc.call("tokenize", {"text": PROMPT, "add_special": False}))["tokens"] == \
        PROMPT_IDS[1:]
    assert result(rpc.call("detokenize", {"tokens": toks}))["text"] == PROMPT
    text = "Grüße, 世界! 😀 tabs\tand  spaces"
    toks = result(rpc.call("tokenize", {"text": text, "model": "default"}))["tokens"]
    assert result(rpc.call("detokenize", {"tokens": toks}))["text"] == text
    assert error_code(rpc.call("detokenize", {"tokens": [1 << 30]})) == -32602
    assert error_code(rpc.call("tokenize", {"text": 5})) == -32602


def gen_params(**kw):
    p = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    p.update(kw)
    return p


def test_generate_nonstream_deterministic(rpc, greedy_oracle):
    a = result(rpc.call("generate", gen_params(stream=False)))
    b = result(rpc.call("generate", gen_params(stream=False, seed=7)))
    assert a["text"] == b["text"] and a["text"].startswith(" five, six, seven")
    assert a["finish_reason"] == "length"
    assert a["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    assert a["stream_id"] != b["stream_id"]
    # The oracle's ids spell the same text.
    assert result(rpc.call("detokenize", {"tokens": greedy_oracle}))["text"] == a["text"]


def test_generate_stream_matches_nonstream(rpc, greedy_oracle):
    full = result(rpc.call("generate", gen_params(stream=False)))["text"]
    sid = result(rpc.call("generate", gen_params(logprobs=True)))["stream_id"]
    notes = rpc.stream(sid)
    chunks = chunks_of(notes)
    assert "".join(c["text"] for c in chunks) == full
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert [c["token"] for c in chunks if "token" in c] == greedy_oracle
    assert all(c["logprob"] <= 0 for c in chunks if "token" in c)
    kinds = [n["method"] for n in notes]
    assert kinds[-2:] == ["stream.stats", "stream.event"]
    stats = notes[-2]["params"]
    assert stats["prompt_tokens"] == 9 and stats["generated_tokens"] == 12
    assert stats["finish_reason"] == "length" and stats["total_ms"] >= stats["ttft_ms"] > 0
    assert stats["tokens_per_second"] > 0
    ev = notes[-1]["params"]
    assert ev["event"] == "completed" and ev["finish_reason"] == "length"


def test_usage_reports_cached_prompt_tokens(rpc):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field) and stream.stats
    cached_tokens: a prompt sent again has its KV from the prefix cache, all of it but the
    16-position block holding its last token."""
    long_prompt = "Count with me slowly and carefully: " + ", ".join(str(i) for i in range(1, 30))
    first = result(rpc.call("generate", gen_params(prompt=long_prompt, max_tokens=2,
                                                   stream=False)))
    n = first["usage"]["prompt_tokens"]
    assert n > 32
    again = result(rpc.call("generate", gen_params(prompt=long_prompt, max_tokens=2,
                                                   stream=False)))
    assert again["text"] == first["text"]
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] <= \
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
    sid = result(rpc.call("generate", gen_params(prompt=long_prompt, max_tokens=2)))["stream_id"]
    stats = rpc.stream(sid)[-2]["params"]
    assert stats["cached_tokens"] == (n - 1) // 16 * 16 and stats["prompt_tokens"] == n


def test_generate_chat_and_stop(rpc):
    r = result(rpc.call("generate", {"messages": [{"role": "user", "content": "Count: one, two,"}],
                                     "max_tokens": 8, "temperature": 0, "stream": False}))
    assert r["usage"]["completion_tokens"] >= 1
    # The chat prompt is the rendered template tokenized with specials parsed (one <bos>).
    assert r["usage"]["prompt_tokens"] > 5
    s = result(rpc.call("generate", gen_params(stream=False, stop=[" seven"])))
    assert s["finish_reason"] == "stop" and s["text"] == " five, six,"


def test_two_concurrent_streams_interleave(rpc):
    rpc.send({"jsonrpc": "2.0", "id": "a", "method": "generate",
              "params": gen_params(max_tokens=16, stream_id="cc-a", ignore_eos=True)})
    rpc.send({"jsonrpc": "2.0", "id": "b", "method": "generate",
              "params": {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0,
                         "stream_id": "cc-b", "ignore_eos": True}})
    assert result(rpc.response("a"))["stream_id"] == "cc-a"
    assert result(rpc.response("b"))["stream_id"] == "cc-b"
    start = len(rpc.seen)
    na, nb = rpc.stream("cc-a"), rpc.stream("cc-b")
    assert na[-1]["params"]["event"] == "completed" and nb[-1]["params"]["event"] == "completed"
    assert len(chunks_of(na)) >= 16 and len(chunks_of(nb)) >= 16
    # Arrival order: b's chunks arrive while a is still streaming (both in the running batch).
    order = [m["params"]["stream_id"] for m in rpc.seen[start:] + rpc.pending
             if m.get("method") == "stream.chunk" and m["params"]["stream_id"] in ("cc-a", "cc-b")]
    last_a = max(i for i, s in enumerate(order) if s == "cc-a")
    first_b = order.index("cc-b")
    assert first_b < last_a, order


def test_cancel_mid_stream(rpc):
    r = result(rpc.call("generate", gen_params(max_tokens=16, ignore_eos=True,
                                               stream_id="to-cancel")))
    assert r["stream_id"] == "to-cancel"
    first = rpc._take(lambda m: m.get("method") == "stream.chunk" and
                      m["params"]["stream_id"] == "to-cancel")
    assert first["params"]["index"] == 0
    assert result(rpc.call("cancel", {"stream_id": "to-cancel"}))["cancelled"] is True
    notes = rpc.stream("to-cancel")
    ev = notes[-1]["params"]
    assert ev["event"] == "cancelled" and ev["finish_reason"] == "cancelled"
    assert ev["message"] == "cancelled by request"
    stats = [n["params"] for n in notes if n["method"] == "stream.stats"][0]
    assert stats["generated_tokens"] < 16
    # Finished or unknown streams cannot be cancelled.
    assert error_code(rpc.call("cancel", {"stream_id": "to-cancel"})) == -32602
    assert error_code(rpc.call("cancel", {"stream_id": "never-was"})) == -32602
    assert error_code(rpc.call("cancel", {})) == -32602


def test_batch_generate(rpc):
    alone = [result(rpc.call("generate", {"prompt": p, "max_tokens": 8, "temperature": 0,
                                          "stream": False}))["text"]
             for p in (PROMPT, "The quick brown fox", "Monday, Tuesday, Wednesday,")]
    reqs = [
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        {"prompt": PROMPT, "max_tokens": 8, "temperature": -1},  # invalid
        {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0},
        {"max_tokens": 8},  # invalid: no prompt
        {"prompt": "Monday, Tuesday, Wednesday,", "max_tokens": 8, "temperature": 0},
    ]
    res = result(rpc.call("batch_generate", {"requests": reqs}))["results"]
    assert len(res) == 5
    assert [r["success"] for r in res] == [True, False, True, False, True]
    assert res[1]["error"]["code"] == -32602 and res[3]["error"]["code"] == -32602
    ok = [res[0], res[2], res[4]]
    assert [r["text"] for r in ok] == alone
    assert all(r["usage"]["completion_tokens"] == 8 for r in ok)
    assert len({r["stream_id"] for r in ok}) == 3
    # Client-chosen ids must be unique within the batch.
    res = result(rpc.call("batch_generate", {"requests": [
        {"prompt": PROMPT, "max_tokens": 2, "stream_id": "dup"},
        {"prompt": PROMPT, "max_tokens": 2, "stream_id": "dup"}]}))["results"]
    assert res[0]["success"] is True and res[0]["stream_id"] == "dup"
    assert res[1]["success"] is False and res[1]["error"]["code"] == -32602
    assert error_code(rpc.call("batch_generate", {"requests": []})) == -32602


def test_protocol_errors(rpc):
    rpc.send("{not json")
    r = rpc.response(None)
    assert error_code(r) == -32700
    rpc.send({"id": 1, "method": "runtime/info"})  # no jsonrpc
    assert error_code(rpc.response(1)) == -32600
    rpc.send({"jsonrpc": "2.0", "id": 2})  # no method
    assert error_code(rpc.response(2)) == -32600
    rpc.send("[]")
    assert error_code(rpc.response(None)) == -32600
    assert error_code(rpc.call("no/such/method")) == -32601
    assert error_code(rpc.call("generate", {"max_tokens": 4})) == -32602
    assert error_code(rpc.call("generate", gen_params(max_tokens="x"))) == -32602
    assert error_code(rpc.call("generate", gen_params(max_tokens=10 ** 9))) == -32602
    assert error_code(rpc.call("generate", gen_params(top_p=0))) == -32602
    assert error_code(rpc.call("generate", gen_params(stop=["a"] * 9))) == -32602
    assert error_code(rpc.call("generate", gen_params(priority="asap"))) == -32602
    assert error_code(rpc.call("generate", gen_params(model="nope"))) == -32005
    assert error_code(rpc.call("tokenize", {"text": "x", "model": "nope"})) == -32005
    assert error_code(rpc.call("unload_model", {"name": "nope"})) == -32005
    # A notification gets no response; the next request's response is the next message.
    rpc.pending.clear()
    rpc.send({"jsonrpc": "2.0", "method": "runtime/info"})
    rpc.send({"jsonrpc": "2.0", "id": "after", "method": "runtime/info"})
    assert rpc.any_message()["id"] == "after"


def test_jsonrpc_batch_array(rpc):
    rpc.send(json.dumps([
        {"jsonrpc": "2.0", "id": 11, "method": "tokenize", "params": {"text": PROMPT}},
        {"jsonrpc": "2.0", "method": "runtime/info"},  # notification: no entry
        {"jsonrpc": "2.0", "id": 12, "method": "nope"},
        5,
        {"jsonrpc": "2.0", "id": 13, "method": "generate", "params": gen_params(max_tokens=4,
                                                                                 stream=False)},
    ]))
    arr = rpc._take(lambda m: isinstance(m, list))
    assert [m["id"] for m in arr] == [11, 12, None, 13]
    assert arr[0]["result"]["tokens"] == PROMPT_IDS
    assert arr[1]["error"]["code"] == -32601 and arr[2]["error"]["code"] == -32600
    assert arr[3]["result"]["text"] == " five, six,"


def test_load_model_confined(rpc, root, cache_dir):
    for bad in ("../etc/passwd", "/etc/passwd", "../models/default.gguf", "", "nope.gguf"):
        code = error_code(rpc.call("load_model", {"path": bad, "name": "x"}))
        assert code in (-32001, -32602), (bad, code)
    assert result(rpc.call("runtime/info"))["models"] == ["default"]


def test_load_model_symlink_escape(krserve, root, cache_dir):
    # A valid model reachable only through a symlink that leaves the model dir is refused.
    d = cache_dir / "rpc_escape"
    d.mkdir(exist_ok=True)
    link = d / "evil.gguf"
    if not link.is_symlink():
        link.symlink_to(root / "models" / "default.gguf")
    r = Rpc(krserve, root, "--model-dir", str(d))
    try:
        resp = r.call("load_model", {"path": "evil.gguf"})
        assert error_code(resp) in (-32001, -32602)
        assert "outside" in resp["error"]["message"]
        assert result(r.call("runtime/info"))["models"] == ["default"]
    finally:
        assert r.close() == 0


def test_load_use_unload(krserve, root):
    r = Rpc(krserve, root, "--model-dir", str(root / "models"))
    try:
        res = result(r.call("load_model", {"path": "default.gguf", "name": "second"}))
        assert res == {"loaded": True, "model": "second"}
        assert error_code(r.call("load_model", {"path": "default.gguf", "name": "second"})) == \
            -32001
        assert set(result(r.call("runtime/info"))["models"]) == {"default", "second"}
        a = result(r.call("generate", gen_params(model="second", stream=False, max_tokens=6)))
        b = result(r.call("generate", gen_params(stream=False, max_tokens=6)))
        assert a["text"] == b["text"]
        # Unloading a model ends its live stream with "cancelled"; afterwards it is unknown.
        sid = result(r.call("generate", gen_params(model="second", max_tokens=16,
                                                   ignore_eos=True)))["stream_id"]
        r._take(lambda m: m.get("method") == "stream.chunk" and m["params"]["stream_id"] == sid)
        assert result(r.call("unload_model", {"name": "second"}))["unloaded"] is True
        ev = r.stream(sid)[-1]["params"]
        assert ev["event"] == "cancelled" and "unloaded" in ev["message"]
        assert error_code(r.call("generate", gen_params(model="second"))) == -32005
        assert result(r.call("unload_model", {"name": "default"}))["unloaded"] is True
        assert error_code(r.call("generate", gen_params())) == -32005
        assert result(r.call("runtime/info"))["models"] == []
    finally:
        assert r.close() == 0


def test_eof_waits_for_streams(krserve, root):
    r = Rpc(krserve, root)
    r.send({"jsonrpc": "2.0", "id": 1, "method": "generate",
            "params": gen_params(max_tokens=6, stream_id="last")})
    r.send({"jsonrpc": "2.0", "id": 2, "method": "generate",
            "params": gen_params(max_tokens=6, stream=False)})
    assert r.close() == 0
    msgs = [json.loads(l) for l in r.lines]
    assert msgs[0]["id"] in (1, 2)
    ids = {m.get("id") for m in msgs if "id" in m}
    assert ids == {1, 2}
    assert msgs[[m.get("id") for m in msgs].index(1)]["result"]["stream_id"] == "last"
    events = [m for m in msgs if m.get("method") == "stream.event"]
    assert len(events) == 1 and events[0]["params"]["event"] == "completed"
    # stdout carries only protocol messages; logs went to stderr.
    assert "loaded" in r.stderr()
