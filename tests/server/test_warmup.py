"""The warm-up steps a GPU server runs before it says it is ready (src/model/model_warmup.c):
they run on the GPU, leave every KV block free and nothing in the prefix cache, and the
server then answers like any other. On the CPU the warm-up is skipped. The CUDA case is
skipped, with the reason printed, where the build has no CUDA backend or the machine no GPU."""
import json
import subprocess

import pytest

from srv_helpers import BUILD, DEFAULT_MODEL, Server


def cuda_skip_reason():
    p = subprocess.run([str(BUILD / "krserve"), "eval-logits", "-m", str(DEFAULT_MODEL),
                        "--tokens", "1,2", "--device", "cuda"], capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or ["no CUDA"])[-1]
    return None


def sched_of(srv):
    st, _, body = srv.get("/stats")
    assert st == 200
    return json.loads(body)["models"][0]["scheduler"]


def warmup_lines(srv):
    return [ln for ln in srv.stderr + srv.lines if "warm-up" in ln]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_warmup_leaves_kv_free_and_serves(device):
    if device == "cuda":
        reason = cuda_skip_reason()
        if reason:
            pytest.skip(f"no CUDA here: {reason}")
    srv = Server(args=["--device", device, "--log-level", "info", "--set", "performance.prefixCache.enabled=true"])
    try:
        s = sched_of(srv)
        assert s["kv_blocks_free"] == s["kv_blocks_total"], s
        lines = warmup_lines(srv)
        if device == "cpu":
            assert lines == [], lines
        else:
            assert any("step shapes on cuda" in ln for ln in lines), srv.stderr[-20:]
        st, _, body = srv.post("/v1/completions", {"prompt": "Hello there", "max_tokens": 4,
                                                   "temperature": 0})
        assert st == 200, body
        assert json.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        srv.stop()
