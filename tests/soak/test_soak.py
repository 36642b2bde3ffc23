"""soak/: a bounded soak of `krserve serve` (KRS_SOAK_SECONDS, default 120 s of load).

Mixed load from scripts/soak.py (chat and completions, streaming and not, random max_tokens and
priorities, ~20 % of requests cut by closing the connection mid-stream, every invalid request
shape, a scheduler mode switch every 30 s), then, once idle: the server is alive and shuts down
cleanly; the request counters balance (/stats scheduler.submitted == valid requests sent ==
stop + length + cancelled + error, no error, metrics counters agree, inflight 0); every KV block
is free again; VmRSS and RssAnon grew < 10 % or < 20 MB after the warm-up. The report goes to
tests/.cache/soak/report.md."""
import os
import sys

import pytest

from krs_paths import CACHE, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench" / "serve"))
import loadgen  # noqa: E402
import soak  # noqa: E402

SECONDS = float(os.environ.get("KRS_SOAK_SECONDS", "120"))


@pytest.fixture(scope="module")
def server(krserve, default_model):
    out = CACHE / "soak"
    out.mkdir(parents=True, exist_ok=True)
    srv = loadgen.ServerProcess(krserve, default_model, log_path=out / "server.log")
    srv.start()
    yield srv
    srv.stop()


def test_soak(server):
    args = soak.make_parser().parse_args(
        ["--duration", str(SECONDS), "--workers", "6", "--max-tokens", "16",
         "--mode-switch", "30", "--log-every", "1e9", "--seed", "7"])
    rep = soak.run_soak(server.url, server.pid, SECONDS, args, log=lambda s: None)
    rc = server.stop()
    rep["checks"].append({"check": "clean shutdown", "ok": rc == 0, "detail": f"exit {rc}"})
    rep["passed"] = rep["passed"] and rc == 0
    soak.write_report(CACHE / "soak" / "report.md", rep)
    failed = [f"{c['check']}: {c['detail']}" for c in rep["checks"] if not c["ok"]]
    assert not failed, "\n".join(failed) + "\n" + server.log_tail()
    c = rep["client"]
    # the load really happened: requests completed, connections were cut, invalid ones sent
    assert c["ok"] >= 10, c
    assert c["cancel_closed"] >= 2, c
    assert c["invalid_sent"] >= len(soak.INVALID), c
    assert rep["server_finished_delta"]["cancelled"] >= 1, rep["server_finished_delta"]
    assert c["mode_switches"] >= 1 or SECONDS < 30, c


def test_report_renders(tmp_path):
    """write_report on a synthetic run (no server): the markdown holds every check and interval."""
    rep = {"client": {"valid_sent": 3, "ok": 2, "cancel_closed": 1, "invalid_sent": 1,
                      "invalid_4xx": 1, "monitor_ok": 0, "mode_switches": 0, "tokens": 10,
                      "overload": 0},
           "errors": {}, "server_finished_delta": {"length": 2, "cancelled": 1},
           "duration_s": 60, "load_s": 60, "warmup_s": 12, "t0": 1000.0,
           "args": {"workers": 2}, "url": "http://x", "pid": 1,
           "rss_kb": [(1, 1024, 512), (30, 2048, 600)], "samples": [(1010.0, 0.5, 5)],
           "checks": [{"check": "alive", "ok": True, "detail": "200"},
                      {"check": "kv", "ok": False, "detail": "free 1 / total 2"}],
           "passed": False}
    p = tmp_path / "r.md"
    soak.write_report(p, rep)
    text = p.read_text()
    assert "**FAIL**" in text and "| kv | **NO** | free 1 / total 2 |" in text
    assert text.count("\n| ") >= 2 + 6  # checks + intervals
    assert "| 10-20 | 1 | 0.5 | 0.50 | nan | nan |" in text
