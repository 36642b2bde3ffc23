"""kr-serve load generator: OpenAI-compatible HTTP clients, closed/open loop drivers, a /stats
sampler and a server launcher. Standard library only (http.client + threads), so that the
timings are not coloured by a client library and cancellation is exact (closing the socket).

Timings of one streamed request (all time.perf_counter(), seconds):
  t_send   the request line is about to be written
  t_first  the first SSE chunk that carries generated text arrived      -> TTFT = t_first - t_send
  t_end    the terminating `data: [DONE]` (or the end of the body)       -> E2E  = t_end - t_send
  chunk_times  arrival of every text-carrying chunk; inter-token gaps are their differences
  TPOT = (E2E - TTFT) / (completion_tokens - 1), completion_tokens from the usage chunk
         (stream_options.include_usage), else the number of text chunks.

Used by bench/serve/run_bench.py, tests/deploy, tests/soak and scripts/soak.py."""
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field


# ---- HTTP helpers ---------------------------------------------------------------------------------

def _split(url):
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port or 80, u.path + ("?" + u.query if u.query else "")


def http_get(url, timeout=10.0):
    """(status, body bytes). Raises OSError on connection failure."""
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path or "/")
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def http_post(url, body, timeout=30.0, headers=None):
    """POST a JSON object (or raw bytes/str). (status, body bytes)."""
    host, port, path = _split(url)
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get_json(url, timeout=10.0):
    status, body = http_get(url, timeout)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


# ---- one request ----------------------------------------------------------------------------------

@dataclass
class Result:
    ok: bool = False
    status: int = 0
    error: str = ""
    stream: bool = True
    cancelled: bool = False  # we closed the connection on purpose
    t_send: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0
    chunk_times: list = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens (prefix cache)
    finish_reason: str = ""
    text: str = ""
    tag: str = ""

    @property
    def ttft(self):
        return self.t_first - self.t_send if self.t_first else None

    @property
    def e2e(self):
        return self.t_end - self.t_send if self.t_end else None

    @property
    def tpot(self):
        n = self.completion_tokens or len(self.chunk_times)
        if not self.t_first or n < 2:
            return None
        return (self.t_end - self.t_first) / (n - 1)

    def inter_token(self):
        ct = self.chunk_times
        return [b - a for a, b in zip(ct, ct[1:])]


def _content_of(chunk, chat):
    ch = (chunk.get("choices") or [{}])[0] if chunk.get("choices") else {}
    if chat:
        return (ch.get("delta") or {}).get("content") or "", ch.get("finish_reason")
    return ch.get("text") or "", ch.get("finish_reason")


def generate(url, *, prompt=None, messages=None, max_tokens=16, stream=True, priority=None,
             ignore_eos=False, temperature=0.0, extra=None, timeout=300.0, cancel_after_chunks=None,
             tag=""):
    """One /v1/chat/completions (messages) or /v1/completions (prompt) request.

    cancel_after_chunks=k closes the connection after k text chunks (client disconnect).
    Never raises for HTTP or socket errors: they land in Result.error."""
    chat = messages is not None
    body = {"max_tokens": max_tokens, "stream": stream, "temperature": temperature}
    if chat:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    if priority:
        body["priority"] = priority
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    host, port, base = _split(url)
    res = Result(stream=stream, tag=tag)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        payload = json.dumps(body).encode()
        res.t_send = time.perf_counter()
        conn.request("POST", base.rstrip("/") + path, body=payload,
                     headers={"Content-Type": "application/json",
                              "Accept": "text/event-stream" if stream else "application/json"})
        r = conn.getresponse()
        res.status = r.status
        if r.status != 200:
            res.error = f"HTTP {r.status}: {r.read()[:300].decode(errors='replace')}"
            res.t_end = time.perf_counter()
            return res
        if not stream:
            js = json.loads(r.read())
            res.t_end = time.perf_counter()
            ch = js["choices"][0]
            res.text = (ch.get("message") or {}).get("content") or ch.get("text") or ""
            res.finish_reason = ch.get("finish_reason") or ""
            u = js.get("usage") or {}
            res.completion_tokens = u.get("completion_tokens", 0)
            res.prompt_tokens = u.get("prompt_tokens", 0)
            res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            res.t_first = res.t_end  # no streaming: first token seen with the whole answer
            res.ok = True
            return res
        parts = []
        done = False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            now = time.perf_counter()
            if data == b"[DONE]":
                done = True
                res.t_end = now
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res.error = f"stream error: {chunk['error']}"
                res.t_end = now
                return res
            text, fin = _content_of(chunk, chat)
            if text:
                if not res.t_first:
                    res.t_first = now
                res.chunk_times.append(now)
                parts.append(text)
            if fin:
                res.finish_reason = fin
            u = chunk.get("usage")
            if u:
                res.completion_tokens = u.get("completion_tokens", 0)
                res.prompt_tokens = u.get("prompt_tokens", 0)
                res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if cancel_after_chunks is not None and len(res.chunk_times) >= cancel_after_chunks:
                res.cancelled = True
                res.t_end = now
                conn.sock and conn.sock.shutdown(socket.SHUT_RDWR)
                return res
        res.text = "".join(parts)
        if not res.t_end:
            res.t_end = time.perf_counter()
        if not done:
            res.error = "stream ended without [DONE]"
            return res
        res.ok = True
        return res
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
        res.t_end = res.t_end or time.perf_counter()
        return res
    finally:
        conn.close()


def chat_request(url, question, max_tokens=16, **kw):
    return generate(url, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                    **kw)


# ---- drivers --------------------------------------------------------------------------------------

def run_sequential(url, questions, max_tokens, **kw):
    return [chat_request(url, q, max_tokens, **kw) for q in questions]


def run_closed_loop(url, questions, clients, requests_per_client, max_tokens, **kw):
    """`clients` threads, each sending requests_per_client requests back to back."""
    results = [None] * (clients * requests_per_client)
    start = threading.Barrier(clients)

    def client(c):
        start.wait()
        for k in range(requests_per_client):
            i = c * requests_per_client + k
            results[i] = chat_request(url, questions[i % len(questions)], max_tokens, **kw)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_burst(url, questions, n, max_tokens, **kw):
    """n requests fired at once: n one-request clients released together."""
    return run_closed_loop(url, questions, n, 1, max_tokens, **kw)


# ---- /stats -------------------------------------------------------------------------------------

def _dig(js, *paths):
    for p in paths:
        cur = js
        for k in p.split("."):
            if isinstance(cur, dict) and k in cur:
                cur = cur[k]
            else:
                cur = None
                break
        if cur is not None:
            return cur
    return None


def stats_view(js):
    """The few /stats fields the tools use, whatever nesting the server picked:
    running, limit, queued (total), mode, submitted, finished (dict reason -> n), kv_total,
    kv_free, kv_used."""
    if isinstance(js.get("models"), list) and js["models"]:
        js = js["models"][0]  # {"server": {...}, "models": [{id, metrics, scheduler, ...}]}
    m = js.get("metrics", js) if isinstance(js.get("metrics"), dict) else js
    s = js.get("scheduler") if isinstance(js.get("scheduler"), dict) else {}
    v = {}
    v["running"] = _dig(s, "running") if _dig(s, "running") is not None else _dig(m, "batch.running")
    v["limit"] = _dig(s, "batch_limit") if _dig(s, "batch_limit") is not None else _dig(m, "batch.limit")
    q = _dig(s, "queued")
    if isinstance(q, dict):
        q = q.get("total", sum(x for x in q.values() if isinstance(x, (int, float))))
    elif isinstance(q, list):
        q = sum(q)
    v["queued"] = q if q is not None else _dig(m, "queue_depth.total")
    v["mode"] = _dig(s, "mode") or _dig(m, "mode")
    v["submitted"] = _dig(s, "submitted")
    v["finished"] = _dig(s, "finished")
    v["m_submitted"] = _dig(m, "counters.requests_submitted.total")
    v["m_finished"] = _dig(m, "counters.requests_finished")
    v["kv_total"] = _dig(s, "kv_blocks_total", "kv_blocks.total")
    v["kv_free"] = _dig(s, "kv_blocks_free", "kv_blocks.free")
    if v["kv_free"] is None:
        v["kv_free"] = _dig(m, "kv_blocks.free")
    v["kv_used"] = _dig(m, "kv_blocks.used")
    v["idle"] = _dig(s, "idle")
    return v


class StatsSampler:
    """Polls /stats every `period` seconds in a thread; samples are (t, stats_view dict)."""

    def __init__(self, url, period=0.1):
        self.url, self.period = url.rstrip("/") + "/stats", period
        self.samples, self.errors = [], 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        nxt = time.perf_counter()
        while not self._stop.is_set():
            try:
                v = stats_view(get_json(self.url, timeout=5))
                self.samples.append((time.perf_counter(), v))
            except (OSError, RuntimeError, ValueError):
                self.errors += 1
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.perf_counter()))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()

    def between(self, t0, t1):
        return [(t, v) for t, v in self.samples if t0 <= t <= t1]


def wait_idle(url, timeout=120.0, settle=0.3):
    """Waits until nothing runs or waits (two polls `settle` s apart); returns the last view."""
    t_end = time.time() + timeout
    quiet = 0
    while time.time() < t_end:
        v = stats_view(get_json(url.rstrip("/") + "/stats"))
        if not v["running"] and not v["queued"]:
            quiet += 1
            if quiet >= 2:
                return v
        else:
            quiet = 0
        time.sleep(settle)
    raise TimeoutError(f"server not idle after {timeout} s: {v}")


def set_mode(url, mode, batch_size=None):
    body = {"mode": mode}
    if batch_size is not None:
        body["batch_size"] = batch_size
    status, resp = http_post(url.rstrip("/") + "/admin/scheduler", body)
    if status != 200:
        raise RuntimeError(f"/admin/scheduler {body}: HTTP {status}: {resp[:200]!r}")
    return json.loads(resp) if resp.strip() else {}


# ---- the server process ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid, field="VmRSS"):
    """A kB field of /proc/PID/status: VmRSS (all resident pages, the mmap'd model included) or
    RssAnon (heap and other anonymous memory: where a leak shows)."""
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith(field + ":"):
                return int(ln.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


class ServerProcess:
    """`krserve serve -m MODEL --port P [args]` as a context manager: waits for /ready, stops it
    with SIGTERM (SIGKILL after `stop_timeout`) on exit. .url, .pid, .proc, .exit_code."""

    def __init__(self, exe, model, args=(), port=None, log_path=None, ready_timeout=180.0,
                 stop_timeout=40.0, env=None):
        self.exe, self.model, self.args = str(exe), str(model), list(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.ready_timeout, self.stop_timeout = log_path, ready_timeout, stop_timeout
        self.env = env
        self.proc, self.exit_code = None, None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        cmd = [self.exe, "serve", "-m", self.model, "--port", str(self.port)] + self.args
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(self.env or {})))
        if self.log_path:
            log.close()
        t_end = time.time() + self.ready_timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"krserve serve exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                if http_get(self.url + "/ready", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {self.ready_timeout} s: {self.log_tail()}")

    def log_tail(self, n=2000):
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()
