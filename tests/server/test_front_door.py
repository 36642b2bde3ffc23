"""One front door: the OpenAI endpoints and JSON-RPC build requests through the engine's one
request builder, so they agree on names, aliases, ranges, defaults and the context limit, and
say the same thing (field + reason) when a request is refused."""
import json

import pytest

from srv_helpers import Server

CTX = 64  # a small context so that the limit is easy to reach


@pytest.fixture(scope="module")
def srv():
    s = Server(["--set", f"model.contextLength={CTX}"])
    yield s
    s.stop()


def http(srv, params, api="completions"):
    body = dict(params)
    if api == "chat":
        body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    else:
        body.setdefault("prompt", "Hello")
    st, _, b = srv.post(f"/v1/{api}", body)
    return st, json.loads(b)


def rpc(srv, params):
    p = dict(params)
    if "messages" not in p:
        p.setdefault("prompt", "Hello")
    p["stream"] = False
    st, _, b = srv.post("/rpc", {"jsonrpc": "2.0", "id": 1, "method": "generate", "params": p})
    assert st == 200
    return json.loads(b)


@pytest.mark.parametrize("name", ["urgent", "default", "background", "high", "normal", "low"])
def test_priority_names_and_aliases_accepted_by_both(srv, name):
    st, b = http(srv, {"max_tokens": 1, "priority": name})
    assert st == 200, b
    r = rpc(srv, {"max_tokens": 1, "priority": name})
    assert "result" in r and r["result"]["usage"]["completion_tokens"] == 1, r


BAD = [
    ({"priority": "asap"}, "priority"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"timeout": 0}, "timeout"),
    ({"timeout_ms": 0}, "timeout_ms"),
    ({"seed": 1.5}, "seed"),
]


@pytest.mark.parametrize("params, field", BAD, ids=[f for _, f in BAD])
def test_same_ranges_and_same_reason(srv, params, field):
    st, b = http(srv, params)
    assert st == 400, b
    assert b["error"]["param"] == field
    reason = b["error"]["message"]
    assert field in reason
    r = rpc(srv, params)
    assert r["error"]["code"] == -32602
    assert r["error"]["message"] == "invalid params: " + reason


def test_rpc_extras_now_on_http_and_openai_names_on_rpc(srv):
    """stop_token_ids, timeout_ms, repetition_context_size (RPC's) work over HTTP;
    max_completion_tokens and timeout in seconds (OpenAI's) work over RPC."""
    st, b = http(srv, {"max_tokens": 2, "stop_token_ids": [1], "timeout_ms": 60000,
                       "repetition_context_size": 8, "temperature": 0})
    assert st == 200, b
    r = rpc(srv, {"max_completion_tokens": 2, "timeout": 60, "temperature": 0,
                  "ignore_eos": True})
    assert r["result"]["usage"]["completion_tokens"] == 2, r


def test_context_limit_is_one_and_the_same(srv):
    prompt = list(range(10, 10 + 40))  # 40 token ids
    over = {"prompt": prompt, "max_tokens": CTX - 40 + 1}
    st, b = http(srv, over)
    assert st == 400 and b["error"]["code"] == "context_length_exceeded", b
    assert b["error"]["param"] == "max_tokens"
    assert f"exceeds the context length {CTX}" in b["error"]["message"]
    r = rpc(srv, over)
    assert r["error"]["code"] == -32602
    assert r["error"]["message"] == "invalid params: " + b["error"]["message"]
    # exactly the context fits, on both
    fit = {"prompt": prompt, "max_tokens": CTX - 40, "ignore_eos": True, "temperature": 0}
    st, b = http(srv, fit)
    assert st == 200 and b["usage"]["completion_tokens"] == CTX - 40, b
    r = rpc(srv, fit)
    assert r["result"]["usage"]["completion_tokens"] == CTX - 40, r
    # a token id outside the vocabulary
    st, b = http(srv, {"prompt": [1, 999999999]})
    assert st == 400 and b["error"]["param"] == "prompt", b
    r = rpc(srv, {"prompt": [1, 999999999]})
    assert r["error"]["message"] == "invalid params: " + b["error"]["message"]
    # a prompt that fills the context
    full = {"prompt": list(range(10, 10 + CTX))}
    st, b = http(srv, full)
    assert st == 400 and b["error"]["code"] == "context_length_exceeded", b
    assert b["error"]["param"] == "prompt"
    r = rpc(srv, full)
    assert r["error"]["message"] == "invalid params: " + b["error"]["message"]


def test_defaults_are_capped_by_the_room_left_never_refused(srv):
    """The documented defaults (completions 16, JSON-RPC 256, chat the rest of the context)
    shrink to the room left in the context; only explicit values are refused."""
    prompt = list(range(10, 10 + CTX - 5))  # room for 5 tokens
    st, b = http(srv, {"prompt": prompt, "ignore_eos": True})
    assert st == 200 and b["usage"]["completion_tokens"] == 5, b
    r = rpc(srv, {"prompt": prompt, "ignore_eos": True})
    assert r["result"]["usage"]["completion_tokens"] == 5, r
    st, b = http(srv, {"prompt": [10, 11, 12], "max_tokens": None, "ignore_eos": True})
    assert st == 200 and b["usage"]["completion_tokens"] == 16, b
