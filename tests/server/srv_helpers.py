"""server/ test helpers: run `krserve serve` on a free port, plain HTTP requests."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BUILD = pathlib.Path(os.environ.get("KRS_BUILD_DIR", ROOT / "build"))
DEFAULT_MODEL = ROOT / "models" / "default.gguf"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args=(), env=None):
        exe = BUILD / "krserve"
        if not exe.exists():
            pytest.fail(f"{exe} not built")
        if not DEFAULT_MODEL.exists():
            pytest.fail("default model missing; run `make deps`")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(exe), "serve", "-m", str(DEFAULT_MODEL), "--port", str(self.port),
               "--kv-tokens", "4096", "--log-level", "warn", *args]
        e = dict(os.environ)
        e.pop("KRSERVE_CONFIG", None)
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=10)
            pytest.fail(f"server did not start: {line}{out}{err}")
        self.lines.append(line)
        # Keep draining stdout/stderr so the pipes never fill up.
        self.stderr = []
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.lines),
                         daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr),
                         daemon=True).start()

    @staticmethod
    def _drain(f, sink):
        for ln in f:
            sink.append(ln)

    def get(self, path, headers=None):
        return request(self.url + path, headers=headers)

    def post(self, path, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return request(self.url + path, data=data, headers=headers)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def request(url, data=None, headers=None, method=None):
    """(status, headers, body bytes) without raising on HTTP errors."""
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}), method=method)
    if data is not None and "Content-Type" not in req.headers:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_for(cond, timeout=3.0, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()
