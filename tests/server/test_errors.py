"""server/: every error status, always in OpenAI's envelope."""
import json
import socket
import threading

import openai
import pytest

from srv_helpers import Server, request


def envelope(body):
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert isinstance(e["message"], str) and e["message"]
    return e


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b'[1, 2]', None),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "n": 17}).encode(), "n"),
    (json.dumps({"prompt": "hi", "n": 0}).encode(), "n"),
    (json.dumps({"prompt": "hi", "temperature": 5}).encode(), "temperature"),
    (json.dumps({"prompt": 12}).encode(), "prompt"),
    (json.dumps({"prompt": "hi", "stop": ["a"] * 9}).encode(), "stop"),
    (json.dumps({"prompt": "hi", "stop": "x" * 65}).encode(), "stop"),
    (json.dumps({"prompt": "hi", "logit_bias": {"5": 101}}).encode(), "logit_bias"),
    (json.dumps({"prompt": "hi", "logit_bias": {"abc": 1}}).encode(), "logit_bias"),
    (json.dumps({"prompt": "hi", "priority": "vip"}).encode(), "priority"),
    (json.dumps({"prompt": "hi", "max_tokens": 100000}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": 4096}).encode(), "max_tokens"),  # > context
    (b'{"prompt": "\xff\xfe bad utf8", "max_tokens": 2}', "prompt"),
    (json.dumps({"prompt": "hi", "response_format": {"type": "yaml"}}).encode(),
     "response_format"),
    (json.dumps({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "patternProperties": {}}}}}).encode(),
     "response_format"),
    (json.dumps({"prompt": "hi", "grammar": "root ::= (\"a\""}).encode(), "grammar"),
    (json.dumps({"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]})
     .encode(), "tools"),
    (json.dumps({"prompt": "hi", "tool_choice": "required"}).encode(), "tool_choice"),
])
def test_400(server, body, param):
    st, _, b = server.post("/v1/completions", body)
    assert st == 400, b
    e = envelope(b)
    assert e["type"] == "invalid_request_error"
    assert e["param"] == param


def test_text_response_format_and_no_tools_accepted(server):
    """The defaults clients send explicitly stay accepted."""
    st, _, b = server.post("/v1/completions", {
        "prompt": "hi", "max_tokens": 2, "response_format": {"type": "text"}, "tools": [],
        "tool_choice": "none"})
    assert st == 200, b


def test_400_chat(server):
    st, _, b = server.post("/v1/chat/completions", {"messages": "hi"})
    assert st == 400 and envelope(b)["param"] == "messages"
    st, _, b = server.post("/v1/chat/completions",
                           b'{"messages":[{"role":"user","content":"\xc3\x28"}]}')
    assert st == 400 and envelope(b)["param"] == "messages"
    st, _, b = server.post("/v1/chat/completions", {"messages": [{"role": "user",
                                                                  "content": "hi"}],
                                                    "top_logprobs": 2})
    assert st == 400 and envelope(b)["param"] == "top_logprobs"


def test_400_prompt_too_long():
    s = Server(["--set", "server.maxPromptTokens=8"])
    try:
        st, _, b = s.post("/v1/completions", {"prompt": "word " * 50, "max_tokens": 2})
        assert st == 400 and envelope(b)["code"] == "context_length_exceeded"
    finally:
        s.stop()


def test_404(server, client):
    st, _, b = server.post("/v1/completions", {"model": "nope", "prompt": "hi"})
    assert st == 404 and envelope(b)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    st, _, b = server.get("/v1/models/nope")
    assert st == 404
    st, _, b = server.get("/no/such/route")
    assert st == 404 and envelope(b)["code"] == "not_found"


def test_405(server):
    st, h, b = server.get("/v1/completions")
    assert st == 405 and h.get("Allow") == "POST"
    envelope(b)
    st, _, _ = server.post("/health", {})
    assert st == 405


def test_413(server):
    big = json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()
    st, _, b = server.post("/v1/completions", big)
    assert st == 413 and envelope(b)["code"] == "request_too_large"


def test_body_in_many_chunks(server):
    """A body sent in small pieces (chunked transfer) is accumulated before parsing."""
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 2,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for i in range(0, len(body), 7):
            part = body[i:i + 7]
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        s.sendall(b"0\r\n\r\n")
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(payload)["usage"]["completion_tokens"] == 2


def test_401():
    s = Server(["--api-key", "s3cret"])
    try:
        st, h, b = s.get("/v1/models")
        assert st == 401 and envelope(b)["code"] == "invalid_api_key"
        st, _, _ = s.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert st == 401
        st, _, _ = s.post("/admin/scheduler", {"mode": "auto"})
        assert st == 401
        st, _, b = s.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert st == 200 and json.loads(b)["data"][0]["id"] == "default"
        cl = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            cl.models.list()
        cl = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        r = cl.completions.create(model="default", prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens >= 1
        st, _, _ = s.get("/health")  # monitoring stays open
        assert st == 200
    finally:
        s.stop()


def test_429_queue_full():
    # One request at a time, one waiting: a burst of long requests must overflow the queue.
    s = Server(["--set", "server.maxQueue=1", "--set", "performance.gpuScheduler.mode=off"])
    try:
        results = []

        def one():
            results.append(s.post("/v1/completions", {"prompt": "Tell me a long story",
                                                      "max_tokens": 48, "ignore_eos": True}))
        ts = [threading.Thread(target=one) for _ in range(5)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        codes = sorted(r[0] for r in results)
        assert 429 in codes and 200 in codes, codes
        for st, h, b in results:
            if st == 429:
                assert h.get("Retry-After") == "1"
                assert envelope(b)["code"] == "queue_full"
    finally:
        s.stop()


def test_device_error_fails_requests_and_health():
    """A forward that fails for a device reason (injected: KRSERVE_FAULT_FORWARD_AFTER) ends
    the step's requests with a server error at once, never a hang, and /health and /ready turn
    503 naming it; later requests fail fast too."""
    s = Server(env={"KRSERVE_FAULT_FORWARD_AFTER": "3"})
    try:
        st, _, _ = s.get("/health")
        assert st == 200
        body = {"prompt": "Hello there", "max_tokens": 20, "ignore_eos": True}
        st, _, raw = s.post("/v1/completions", body)
        assert st >= 500, (st, raw[:300])
        err = json.loads(raw)["error"]
        assert "forward" in err["message"]
        st, _, raw = s.get("/health")
        assert st == 503
        m = json.loads(raw)["models"][0]
        assert "forward failed" in m["device_error"]
        st, _, raw = s.get("/ready")
        assert st == 503 and json.loads(raw)["reason"] == "engine unhealthy"
        st, _, _ = s.post("/v1/completions", body)
        assert st >= 500
    finally:
        s.stop()
