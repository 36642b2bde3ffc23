"""metrics/: the Prometheus text rendered by the C collector, checked by independent parsers.

The C test (metrics_test_metrics, built by CMake) renders a busy collector and writes the text
to tests/.cache/metrics/sample.prom (it finds the repo through KRS_SOURCE_DIR). This test runs it,
then checks the file with `promtool check metrics` (Prometheus' own linter) and with
prometheus_client's text parser."""
import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from krs_paths import BUILD, CACHE, ROOT

# The seed's dashboard names keep milliseconds; promtool's lint says "use base unit seconds".
# That lint (and only that) is accepted.
SEED_MS_NAMES = {f"mlx_latency_{p}_milliseconds" for p in ("p50", "p95", "p99")}


@pytest.fixture(scope="module")
def sample_prom():
    exe = BUILD / "metrics_test_metrics"
    if not exe.exists():
        pytest.fail(f"{exe} not built; run `make build` first")
    out = CACHE / "metrics" / "sample.prom"
    if out.exists():
        out.unlink()
    env = dict(os.environ, KRS_SOURCE_DIR=str(ROOT))
    res = subprocess.run([str(exe)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.exists(), "the C test did not write sample.prom"
    return out.read_text()


def test_promtool_check_metrics(sample_prom):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.path.exists(promtool):
        pytest.fail("promtool not installed (Debian package prometheus)")
    res = subprocess.run([promtool, "check", "metrics"], input=sample_prom,
                         capture_output=True, text=True, timeout=60)
    # rc 0: clean; rc 3: lint findings only; anything else (1: parse error) fails.
    assert res.returncode in (0, 3), res.stdout + res.stderr
    problems = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    for ln in problems:
        name = ln.split()[0]
        assert name in SEED_MS_NAMES and 'base unit "seconds"' in ln, ln
    if res.returncode == 3:
        assert problems


def test_prometheus_client_parser(sample_prom):
    fams = {f.name: f for f in text_string_to_metric_families(sample_prom)}
    # prometheus_client strips _total from counter family names
    want = {
        "mlx_throughput_tokens_per_second": "gauge",
        "mlx_latency_p50_milliseconds": "gauge",
        "mlx_latency_p95_milliseconds": "gauge",
        "mlx_latency_p99_milliseconds": "gauge",
        "mlx_batch_size_current": "gauge",
        "mlx_gpu_scheduler_mode": "gauge",
        "mlx_auto_tuning_adjustments": "counter",
        "mlx_queue_depth": "gauge",
        "mlx_mode_transitions": "counter",
        "krserve_queue_depth": "gauge",
        "krserve_kv_blocks": "gauge",
        "krserve_requests": "counter",
        "krserve_requests_by_priority": "counter",
        "krserve_preemptions": "counter",
        "krserve_degradation_events": "counter",
        "krserve_tokens": "counter",
        "krserve_ttft_seconds": "histogram",
        "krserve_inter_token_latency_seconds": "histogram",
        "krserve_e2e_latency_seconds": "histogram",
        "krserve_queue_wait_seconds": "histogram",
        "krserve_step_seconds": "histogram",
        "krserve_batch_size": "histogram",
        "krserve_request_prompt_tokens": "histogram",
        "krserve_request_generated_tokens": "histogram",
    }
    for name, typ in want.items():
        assert name in fams, f"missing {name}"
        assert fams[name].type == typ, (name, fams[name].type)

    tp = {s.labels["window"]: s.value for s in fams["mlx_throughput_tokens_per_second"].samples}
    assert set(tp) == {"5s", "30s", "60s"}
    assert tp["5s"] == pytest.approx(140.0)  # 80 events * 7 tokens over a 4 s span

    mode = {s.labels["mode"]: s.value for s in fams["mlx_gpu_scheduler_mode"].samples}
    assert mode == {"on": 0.0, "off": 0.0, "fixed": 1.0}

    reasons = {s.labels["reason"]: s.value for s in fams["krserve_requests"].samples
               if s.name == "krserve_requests_total"}
    assert reasons == {"stop": 30.0, "length": 30.0, "cancelled": 30.0, "error": 30.0}

    # every histogram: cumulative buckets, +Inf last and equal to _count, sum present
    for name, fam in fams.items():
        if fam.type != "histogram":
            continue
        buckets = [s for s in fam.samples if s.name == name + "_bucket"]
        les = [float(s.labels["le"]) for s in buckets]
        counts = [s.value for s in buckets]
        assert les == sorted(les) and les[-1] == float("inf"), name
        assert all(a <= b for a, b in zip(counts, counts[1:])), name
        count = [s.value for s in fam.samples if s.name == name + "_count"]
        total = [s.value for s in fam.samples if s.name == name + "_sum"]
        assert count == [counts[-1]] and len(total) == 1, name
        assert counts[-1] == 120.0, name  # the C test records 120 of each

    e2e = fams["krserve_e2e_latency_seconds"]
    s = [x.value for x in e2e.samples if x.name.endswith("_sum")][0]
    assert s == pytest.approx(sum(0.1 + 0.003 * i for i in range(120)), rel=1e-6)
