"""server/: monitoring, admin, tokenize, JSON-RPC, client disconnects and graceful shutdown."""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from srv_helpers import Server, free_port, request, wait_for

SEED_MS_NAMES = {f"mlx_latency_{p}_milliseconds" for p in ("p50", "p95", "p99")}


def stats(server):
    st, _, b = server.get("/stats")
    assert st == 200
    return json.loads(b)["models"][0]


def cancelled(server):
    return stats(server)["scheduler"]["finished"]["cancelled"]


def check_promtool(text):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.path.exists(promtool):
        # The GPU machine has no Debian packages (scripts/device-test.sh sets this); the
        # parser's checks still run there. Everywhere else promtool is required.
        if os.environ.get("KRS_TEST_NO_PROMTOOL") == "1":
            return
        pytest.fail("promtool not installed (Debian package prometheus)")
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode in (0, 3), res.stdout + res.stderr
    for ln in (res.stdout + res.stderr).splitlines():
        if ln.strip():
            assert ln.split()[0] in SEED_MS_NAMES and 'base unit "seconds"' in ln, ln


def sample(text, name, labels=None):
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    raise KeyError(name)


def test_metrics(server):
    st, h, b = server.get("/metrics")
    assert st == 200 and h["Content-Type"].startswith("text/plain; version=0.0.4")
    before = b.decode()
    check_promtool(before)
    server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    after = server.get("/metrics")[2].decode()
    check_promtool(after)
    n0 = sample(before, "krserve_tokens_total", {"kind": "generated"}) \
        if "kind=\"generated\"" in before else None
    fams = {f.name for f in text_string_to_metric_families(after)}
    assert "mlx_throughput_tokens_per_second" in fams
    tot = lambda t: sum(s.value for f in text_string_to_metric_families(t)  # noqa: E731
                        if f.name == "krserve_requests" for s in f.samples
                        if s.name == "krserve_requests_total")
    assert tot(after) >= tot(before) + 1
    if n0 is not None:
        assert sample(after, "krserve_tokens_total", {"kind": "generated"}) >= n0 + 3


def test_metrics_cover_every_loaded_model():
    """Two models served: /metrics has each family once, every series labelled by model, and
    each model's counters move with its own requests only."""
    s = Server()
    try:
        st, _, b = s.post("/admin/models/load", {"name": "second",
                                                 "path": "gemma3-270m-q4_k_m.gguf"})
        assert st == 200, b
        st, _, b = s.post("/v1/completions", {"model": "second", "prompt": "Hello",
                                              "max_tokens": 4, "ignore_eos": True})
        assert st == 200, b
        text = s.get("/metrics")[2].decode()
        check_promtool(text)
        fams = list(text_string_to_metric_families(text))
        names = [f.name for f in fams]
        assert len(names) == len(set(names)), "a family is repeated"
        for f in fams:
            assert {x.labels.get("model") for x in f.samples} == {"default", "second"}, f.name
        gen = lambda m: sample(text, "krserve_tokens_total",  # noqa: E731
                               {"kind": "generated", "model": m})
        assert gen("second") == 4 and gen("default") == 0
        assert s.post("/admin/models/unload", {"name": "second"})[0] == 200
        text = s.get("/metrics")[2].decode()
        assert 'model="second"' not in text and 'model="default"' in text
    finally:
        s.stop()


def test_health_ready_stats(server):
    st, _, b = server.get("/health")
    assert st == 200 and json.loads(b)["status"] == "ok"
    st, _, b = server.get("/ready")
    assert st == 200 and json.loads(b)["status"] == "ready"
    s = stats(server)
    assert s["id"] == "default"
    for k in ("metrics", "scheduler", "controller", "requests"):
        assert k in s
    assert isinstance(s["controller"]["events"], list)
    ctl = s["controller"]
    # admission may run past the limit at low load, never below it
    assert ctl["admit_limit"] >= ctl["limit"] >= 1 and ctl["outliers"] >= 0


def test_tokenize_roundtrip(server):
    text = "Hello world, ça va? 日本語"
    st, _, b = server.post("/tokenize", {"prompt": text})
    assert st == 200
    toks = json.loads(b)
    assert toks["count"] == len(toks["tokens"]) > 3
    st, _, b = server.post("/detokenize", {"tokens": toks["tokens"]})
    assert st == 200 and json.loads(b)["prompt"] == text
    st, _, b = server.post("/tokenize", {"prompt": text, "add_special": False})
    assert json.loads(b)["count"] == toks["count"] - 1  # no BOS
    st, _, b = server.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert st == 200 and json.loads(b)["count"] > 3
    st, _, _ = server.post("/detokenize", {"tokens": [-1]})
    assert st == 400


def test_admin_scheduler(server):
    m0 = sample(server.get("/metrics")[2].decode(), "mlx_mode_transitions_total")
    st, _, b = server.post("/admin/scheduler", {"mode": "fixed", "batch_size": 2})
    assert st == 200 and json.loads(b)["mode"] == "fixed"
    assert wait_for(lambda: stats(server)["scheduler"]["mode"] == "fixed")
    st, _, _ = server.post("/admin/scheduler", {"mode": "auto"})
    assert st == 200
    assert wait_for(lambda: stats(server)["scheduler"]["mode"] == "auto")
    assert wait_for(lambda: sample(server.get("/metrics")[2].decode(),
                                   "mlx_mode_transitions_total") >= m0 + 2)
    st, _, _ = server.post("/admin/scheduler", {"mode": "sideways"})
    assert st == 400


def test_admin_load_confined(server):
    st, _, b = server.post("/admin/models/load", {"path": "../etc/passwd"})
    assert st == 400
    st, _, _ = server.post("/admin/models/unload", {"name": "nope"})
    assert st == 404


def test_rpc(server):
    st, h, b = server.post("/rpc", {"jsonrpc": "2.0", "id": 1, "method": "runtime/info"})
    assert st == 200 and h["Content-Type"] == "application/json"
    assert json.loads(b)["id"] == 1
    st, h, b = server.post("/rpc", {"jsonrpc": "2.0", "id": 2, "method": "generate",
                                    "params": {"prompt": "Hello", "max_tokens": 3,
                                               "stream": True}})
    assert st == 200 and h["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(ln) for ln in b.decode().splitlines()]
    assert len(lines) > 1
    assert any(m.get("id") == 2 for m in lines)
    assert any(m.get("method", "").startswith("stream.") for m in lines)


def raw_post(port, path, body):
    s = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return s


def test_disconnect_mid_stream(server):
    c0 = cancelled(server)
    s = raw_post(server.port, "/v1/completions", {"prompt": "Write a long essay",
                                                  "max_tokens": 2000, "ignore_eos": True,
                                                  "stream": True})
    buf = b""
    while buf.count(b"data: ") < 3:
        d = s.recv(4096)
        assert d
        buf += d
    s.close()

    def gone():
        st = stats(server)
        sch = st["scheduler"]
        return (not st["requests"] and sch["kv_blocks_free"] == sch["kv_blocks_total"]
                and sch["finished"]["cancelled"] == c0 + 1)
    assert wait_for(gone, timeout=2.5), stats(server)


def test_disconnect_non_streaming(server):
    c0 = cancelled(server)
    s = raw_post(server.port, "/v1/completions", {"prompt": "Write a long essay",
                                                  "max_tokens": 2000, "ignore_eos": True})
    assert wait_for(lambda: stats(server)["requests"], timeout=5)
    time.sleep(0.3)
    s.close()
    assert wait_for(lambda: cancelled(server) == c0 + 1 and not stats(server)["requests"],
                    timeout=2.5), stats(server)


def test_disconnect_while_queued():
    """A client that leaves while its request still waits in the queue (no token yet, its
    connection suspended) is noticed and the request cancelled at once, not when it would
    have started."""
    s = Server(["--set", "performance.gpuScheduler.enabled=false"])  # one request at a time
    try:
        busy = raw_post(s.port, "/v1/completions", {"prompt": "Write a long essay",
                                                    "max_tokens": 400, "ignore_eos": True})
        assert wait_for(lambda: stats(s)["scheduler"]["running"] == 1, timeout=10)
        c0 = cancelled(s)
        queued = raw_post(s.port, "/v1/completions", {"prompt": "Hello", "max_tokens": 5})
        assert wait_for(lambda: sum(stats(s)["scheduler"]["queued"].values()) == 1, timeout=5)
        queued.close()
        assert wait_for(lambda: cancelled(s) == c0 + 1, timeout=1.5), stats(s)["scheduler"]
        st = stats(s)["scheduler"]
        assert st["running"] == 1 and sum(st["queued"].values()) == 0, st
        busy.close()
        assert wait_for(lambda: cancelled(s) == c0 + 2 and not stats(s)["requests"],
                        timeout=2.5), stats(s)
    finally:
        s.stop()


def test_disconnect_rpc_over_http(server):
    """POST /rpc generate: the client leaves mid-generation; the generation is cancelled."""
    c0 = cancelled(server)
    sock = raw_post(server.port, "/rpc", {"jsonrpc": "2.0", "id": 7, "method": "generate",
                                          "params": {"prompt": "Write a long essay",
                                                     "max_tokens": 2000, "stream": True}})
    assert wait_for(lambda: stats(server)["requests"], timeout=5)
    time.sleep(0.3)
    sock.close()
    assert wait_for(lambda: cancelled(server) == c0 + 1 and not stats(server)["requests"],
                    timeout=2.5), stats(server)


def test_monitoring_port():
    mport = free_port()
    s = Server(["--set", f"monitoring.prometheus.port={mport}",
                "--set", "monitoring.prometheus.path=/prom"])
    try:
        st, h, b = request(f"http://127.0.0.1:{mport}/prom")
        assert st == 200 and b"mlx_throughput_tokens_per_second" in b
        assert request(f"http://127.0.0.1:{mport}/health")[0] == 200
        assert request(f"http://127.0.0.1:{mport}/ready")[0] == 200
        assert request(f"http://127.0.0.1:{mport}/stats")[0] == 200
        assert request(f"http://127.0.0.1:{mport}/v1/models")[0] == 404
    finally:
        s.stop()


def test_sigterm_drains_inflight():
    # A drain timeout far beyond what 80 tokens can take on a starved CPU: what this checks is
    # that the drain lets the stream finish, not how fast a busy machine decodes (with the
    # default 30 s, a 2-core VM under load cancelled it with "shutdown").
    s = Server(["--set", "server.drainTimeoutMs=600000"])
    try:
        assert s.get("/ready")[0] == 200
        result = {}

        def long_stream():
            result["r"] = request(s.url + "/v1/completions", data=json.dumps(
                {"prompt": "Count slowly", "max_tokens": 80, "ignore_eos": True,
                 "stream": True}).encode())
        t = threading.Thread(target=long_stream)
        t.start()
        assert wait_for(lambda: json.loads(s.get("/stats")[2])["models"][0]["requests"],
                        timeout=10)
        s.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: s.get("/ready")[0] == 503, timeout=2)
        st, h, b = s.get("/ready")
        assert st == 503 and json.loads(b)["reason"] == "draining"
        st, h, b = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert st == 503 and json.loads(b)["error"]["code"] == "service_unavailable"
        t.join(timeout=600)
        st, _, body = result["r"]
        assert st == 200
        events = [ln[6:] for ln in body.decode().split("\n\n") if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_sighup_reload():
    s = Server()
    try:
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert s.proc.poll() is None
        assert s.get("/health")[0] == 200
    finally:
        s.stop()
    assert s.proc.returncode == 0


def test_idle_and_slow_connections_do_not_block_others():
    """Thousands of idle or half-sent connections: others are still served at once, the idle
    ones are closed after server.idleTimeoutSec, and a request waiting on tokens longer than
    that timeout is not cut off."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))
    n = min(2000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)
    assert n >= 500, "too few file descriptors for this test"
    s = Server(["--set", "server.idleTimeoutSec=2"])
    socks = []
    try:
        for i in range(n):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            if i % 2:  # slowloris: a request that never finishes its headers
                c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Len")
            socks.append(c)
        t0 = time.monotonic()
        assert s.get("/health")[0] == 200
        st, _, body = request(s.url + "/v1/completions", data=json.dumps(
            {"prompt": "Tell me a story", "max_tokens": 120, "ignore_eos": True}).encode())
        took = time.monotonic() - t0
        assert st == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] == 120
        # The generation itself outlived the idle timeout without being cut off.
        print(f"{n} idle connections open; health + 120-token completion took {took:.2f} s")
        time.sleep(max(0.0, 4.0 - (time.monotonic() - t0)))
        def n_closed():
            closed = 0
            for c in socks:
                c.setblocking(False)
                try:
                    closed += c.recv(1) == b""
                except ConnectionResetError:
                    closed += 1
                except BlockingIOError:
                    pass  # still open
            return closed
        assert wait_for(lambda: n_closed() == n, timeout=5), \
            f"{n - n_closed()} idle connections still open after the timeout"
        assert s.get("/health")[0] == 200
    finally:
        for c in socks:
            c.close()
        s.stop()


def test_ready_while_loading_then_ready():
    """The server listens before the model is loaded: /health 200, /ready 503 "loading model",
    API requests 503 model_loading; then /ready 200 and requests are served."""
    from srv_helpers import BUILD, DEFAULT_MODEL, ROOT
    port = free_port()
    env = dict(os.environ)
    env.pop("KRSERVE_CONFIG", None)
    proc = subprocess.Popen([str(BUILD / "krserve"), "serve", "-m", str(DEFAULT_MODEL), "--port",
                             str(port), "--kv-tokens", "4096", "--log-level", "warn"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    seen, api_during_load = [], None
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                st, _, b = request(url + "/ready")
            except OSError:
                time.sleep(0.002)  # not listening yet
                continue
            seen.append((st, json.loads(b).get("reason")))
            if st == 200:
                break
            if api_during_load is None:
                api_during_load = request(url + "/v1/completions", data=json.dumps(
                    {"prompt": "hi", "max_tokens": 1}).encode())
                assert request(url + "/health")[0] == 200
        assert seen and seen[-1][0] == 200, seen
        assert all(r == (503, "loading model") for r in seen[:-1]), seen
        assert (503, "loading model") in seen, "the loading state was never observed"
        st, _, b = api_during_load
        # 200 only if the load finished between the two requests.
        assert st == 200 or (st == 503 and json.loads(b)["error"]["code"] == "model_loading"), b
        st, _, b = request(url + "/v1/completions", data=json.dumps(
            {"prompt": "hi", "max_tokens": 1}).encode())
        assert st == 200, b
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_device_memory_reported(server):
    """/stats and /metrics carry the compute backend's memory by use (weights, KV pool,
    activations, free, total) and its name; the numbers are the ones the backend reserved."""
    st, _, b = server.get("/stats")
    assert st == 200
    sch = json.loads(b)["models"][0]["scheduler"]
    assert sch["device"] in ("cpu", "cuda")
    dm = sch["device_memory_bytes"]
    # the default model: ~250 MB of weights (on cuda plus the F16 copy of its ~268 M quantized
    # weights that prompt steps and large batches multiply: KRS_CUDA_HALF_COPY); the server's
    # --kv-tokens 4096 pool in F32: 2 (K, V) * 4096 * kv_dim 256 * 4 bytes * 3 full layers, plus
    # the sliding layers' pool
    copies = 2 * 268e6 if sch["device"] == "cuda" else 0
    assert 150e6 + copies < dm["weights"] < 400e6 + copies
    assert dm["kv"] >= 2 * 4096 * 256 * 4 * 3
    assert dm["activations"] > 0 and dm["total"] >= dm["free"] > 0
    text = server.get("/metrics")[2].decode()
    assert sample(text, "krserve_device_memory_bytes", {"use": "weights"}) == dm["weights"]
    assert sample(text, "krserve_device_memory_bytes", {"use": "kv"}) == dm["kv"]
