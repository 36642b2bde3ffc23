"""deploy/: the Grafana dashboard and the Prometheus scrape config, checked against the server.

Every PromQL expression of deploy/grafana/kr-serve-dashboard.json is
  1. syntax-checked by Prometheus' own parser (`promtool check rules` on a rules file holding each
     expression, Grafana variables substituted), and
  2. reduced to the metric names it selects, each of which must be a sample name the server
     exports, with every label it matches on (and the label values it compares with `=`).
The exported names come from a live `krserve serve` /metrics scrape (one small request first so
that histograms hold data) when the binary has the `serve` command, else from the text the
metrics C test renders (tests/.cache/metrics/sample.prom, produced by tests/metrics)."""
import json
import os
import re
import shutil
import subprocess

import pytest

from krs_paths import BUILD, CACHE, ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "kr-serve-dashboard.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
    "unless", "inf", "nan", "atan2",
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Suffixes Prometheus derives from one histogram / summary family.
HIST_SUFFIXES = ("_bucket", "_sum", "_count")
GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "${datasource}": "x",
    "$job": "kr-serve", "$instance": ".*",  # the "All" value
}


def promtool():
    exe = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.path.exists(exe):
        pytest.fail("promtool not installed (Debian package prometheus)")
    return exe


# ---- PromQL helpers ----------------------------------------------------------------------------

def substitute(expr):
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def selectors(expr):
    """(metric_name, [(label, op, value)]) for every vector selector in expr.

    A tiny PromQL lexer: skips string literals, durations in [...], numbers, function names (an
    identifier followed by '('), keywords, and the label lists of by/without/on/ignoring/group_*
    clauses; what remains are metric names, each optionally followed by a {matchers} block."""
    out = []
    i, n = 0, len(expr)
    ident = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
    matcher = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
    while i < n:
        c = expr[i]
        if c in "\"'`":
            j = expr.index(c, i + 1)
            i = j + 1
        elif c == "[":
            i = expr.index("]", i) + 1
        elif c == "{":  # a selector without a metric name: {__name__=...}; not used here
            raise AssertionError(f"name-less selector in {expr!r}")
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            m = re.compile(r"[0-9.eE+-]+[a-z]*").match(expr, i)
            i = m.end()
        elif ident.match(expr, i):
            m = ident.match(expr, i)
            word, i = m.group(0), m.end()
            k = i
            while k < n and expr[k] == " ":
                k += 1
            if word.lower() in PROMQL_KEYWORDS:
                if word in GROUPING and k < n and expr[k] == "(":
                    i = expr.index(")", k) + 1  # label list, not metric names
                continue
            if k < n and expr[k] == "(":
                continue  # function or aggregation
            if word in AGGREGATIONS and re.match(r"(by|without)\s*\(", expr[k:]):
                continue  # `sum by (le) (...)`: the clause is skipped as the next word
            labels = []
            if k < n and expr[k] == "{":
                end = expr.index("}", k)
                body = expr[k + 1:end]
                pos = 0
                while pos < len(body):
                    mm = matcher.match(body, pos)
                    assert mm, f"cannot parse matchers {body!r} in {expr!r}"
                    labels.append((mm.group(1), mm.group(2), mm.group(3)))
                    pos = mm.end()
                i = end + 1
            out.append((word, labels))
        else:
            i += 1
    return out


def grouping_labels(expr):
    """Label names named in by(...)/without(...)/on(...)/ignoring(...) clauses."""
    out = set()
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        out.update(x.strip() for x in m.group(2).split(",") if x.strip())
    return out


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    exprs.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return dash, exprs


# ---- exported metrics ----------------------------------------------------------------------------

def parse_exposition(text):
    """{sample_name: [label dicts]} and {family: type} from Prometheus text format."""
    samples, types = {}, {}
    line_re = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+\S+")
    lab_re = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for ln in text.splitlines():
        if ln.startswith("# TYPE "):
            _, _, name, typ = ln.split(None, 3)
            types[name] = typ.strip()
            continue
        if not ln or ln.startswith("#"):
            continue
        m = line_re.match(ln)
        assert m, f"bad exposition line {ln!r}"
        labels = dict(lab_re.findall(m.group(2) or ""))
        samples.setdefault(m.group(1), []).append(labels)
    return samples, types


def family_of(name, types):
    """The family a sample name belongs to: strips _bucket/_sum/_count only for histograms and
    summaries, so a gauge that happens to end in _count is not mangled."""
    if name in types:
        return name
    for suf in HIST_SUFFIXES:
        if name.endswith(suf) and types.get(name[: -len(suf)]) in ("histogram", "summary"):
            return name[: -len(suf)]
    return None


def serve_supported(exe):
    try:
        res = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and "serve" in (res.stdout + res.stderr)


def live_scrape():
    """/metrics text from a live server, or None when the binary has no `serve`."""
    exe = BUILD / "krserve"
    if not exe.exists() or not serve_supported(exe):
        return None
    import sys
    sys.path.insert(0, str(ROOT / "bench" / "serve"))
    import loadgen

    with loadgen.ServerProcess(exe, ROOT / "models" / "default.gguf",
                               log_path=CACHE / "deploy" / "serve.log") as srv:
        r = loadgen.chat_request(srv.url, "Say hi.", max_tokens=4, stream=True)
        assert r.ok, r.error
        # The engine records a request's end in the metrics just after it hands the client the
        # final event, so a scrape right after [DONE] can miss it: wait for it (<= 5 s).
        import time
        t_end = time.time() + 5
        while True:
            status, body = loadgen.http_get(srv.url + "/metrics")
            assert status == 200
            if "krserve_e2e_latency_seconds_count 1" in body.decode() or time.time() > t_end:
                return body.decode()
            time.sleep(0.05)


@pytest.fixture(scope="module")
def exposition():
    (CACHE / "deploy").mkdir(parents=True, exist_ok=True)
    text = live_scrape()
    if text is not None:
        (CACHE / "deploy" / "live.prom").write_text(text)
        return "live", text
    sample = CACHE / "metrics" / "sample.prom"
    if not sample.exists():
        exe = BUILD / "metrics_test_metrics"
        if not exe.exists():
            pytest.fail(f"{exe} not built and no server; run `make build` first")
        env = dict(os.environ, KRS_SOURCE_DIR=str(ROOT))
        res = subprocess.run([str(exe)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
    return "sample", sample.read_text()


# ---- tests --------------------------------------------------------------------------------------

def test_dashboard_shape():
    dash, exprs = dashboard_exprs()
    assert 36 <= dash["schemaVersion"] <= 41
    tvars = {v["name"]: v for v in dash["templating"]["list"]}
    assert tvars["datasource"]["type"] == "datasource"
    assert tvars["datasource"]["query"] == "prometheus"
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}", p["title"]
                assert p["targets"], p["title"]
                assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
            walk(p.get("panels", []))

    walk(dash["panels"])
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    # The panels the deployment promises, by the metric each must show.
    text = "\n".join(e for _, e in exprs)
    for name in ["mlx_throughput_tokens_per_second", "mlx_latency_p50_milliseconds",
                 "mlx_latency_p95_milliseconds", "mlx_latency_p99_milliseconds",
                 "krserve_ttft_seconds_bucket", "krserve_inter_token_latency_seconds_bucket",
                 "krserve_e2e_latency_seconds_bucket", "mlx_batch_size_current",
                 "krserve_batch_limit", "mlx_queue_depth", "krserve_queue_depth",
                 "mlx_gpu_scheduler_mode", "mlx_auto_tuning_adjustments_total",
                 "krserve_degradation_events_total", "mlx_mode_transitions_total",
                 "krserve_kv_blocks", "krserve_requests_total"]:
        assert re.search(rf"\b{name}\b", text), f"no panel shows {name}"


def test_selector_parser():
    """The lexer itself, on cases with known answers (so a lexer bug cannot pass silently)."""
    got = selectors('histogram_quantile(0.95, sum by (le) (rate(a_b_bucket{job=~"x", le!="1"}[5m])))'
                    ' / ignoring(state) sum without (instance) (c:d offset 5m) > bool 2e-3')
    assert got == [("a_b_bucket", [("job", "=~", "x"), ("le", "!=", "1")]), ("c:d", [])]
    assert grouping_labels("sum by (le, mode) (x) / on(instance) y") == {"le", "mode", "instance"}
    types = {"h": "histogram", "g_count": "gauge", "c_total": "counter"}
    assert family_of("h_bucket", types) == "h" and family_of("h_sum", types) == "h"
    assert family_of("g_count", types) == "g_count" and family_of("x_count", types) is None


def test_exprs_parse_with_promtool(tmp_path):
    _, exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    res = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_metric_is_exported(exposition):
    source, text = exposition
    samples, types = parse_exposition(text)
    _, exprs = dashboard_exprs()
    checked = set()
    for title, expr in exprs:
        sub = substitute(expr)
        sels = selectors(sub)
        assert sels, f"{title}: no metric in {expr!r}"
        for name, matchers in sels:
            fam = family_of(name, types)
            assert fam, f"{title}: {name} is not exported by the server ({source})"
            assert name in samples, f"{title}: no sample named {name} ({source})"
            exported_labels = set().union(*[set(d) for d in samples[name]])
            for label, op, value in matchers:
                if label in ("job", "instance"):
                    continue  # added by Prometheus at scrape time
                assert label in exported_labels, f"{title}: {name} has no label {label}"
                if op == "=":
                    values = {d.get(label) for d in samples[name]}
                    assert value in values, f"{title}: {name}{{{label}={value!r}}} not exported"
            checked.add(name)
        for label in grouping_labels(sub) - {"job", "instance"}:
            names = [nm for nm, _ in sels]
            assert any(label in d for nm in names for d in samples[nm]), \
                f"{title}: grouping label {label} not on any of {names}"
    assert len(checked) >= 15, checked


def test_histograms_have_data_when_live(exposition):
    source, text = exposition
    if source != "live":
        pytest.skip("no `krserve serve` in this build; checked against sample.prom")
    samples, _ = parse_exposition(text)
    # after one streamed request these must hold at least one observation
    for fam in ("krserve_ttft_seconds", "krserve_e2e_latency_seconds"):
        lines = [ln for ln in text.splitlines()
                 if ln.startswith(fam + "_count ") or ln.startswith(fam + "_count{")]
        assert lines and float(lines[0].split()[-1]) >= 1, fam


def test_promtool_check_config(tmp_path):
    res = subprocess.run([promtool(), "check", "config", str(PROMETHEUS_YML)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # The commented monitoring-port variant must be valid too once swapped in.
    lines = PROMETHEUS_YML.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "- job_name: kr-serve")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].strip())
    alt_start = next(i for i, ln in enumerate(lines) if ln.strip() == "# - job_name: kr-serve")
    alt = []
    for ln in lines[alt_start:]:
        if not ln.startswith("  #"):
            break
        alt.append("  " + ln[4:] if ln.startswith("  # ") else "")
    alt = [ln for ln in alt if ln.strip()]
    assert any("127.0.0.1:9090" in ln for ln in alt)
    other = lines[:start] + alt + lines[end:]
    p = tmp_path / "prometheus-9090.yml"
    p.write_text("\n".join(other) + "\n")
    res = subprocess.run([promtool(), "check", "config", str(p)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, p.read_text() + res.stdout + res.stderr


def test_prometheus_scrapes_and_every_panel_has_data(tmp_path, krserve, default_model):
    """End to end: a real Prometheus (when installed) scrapes a live `krserve serve` with the
    job of deploy/prometheus/prometheus.yml (target swapped for the test port, 1 s interval), and
    every dashboard expression, evaluated by Prometheus' query API, returns at least one series."""
    prom = shutil.which("prometheus")
    if not prom:
        pytest.skip("prometheus server not installed")
    if not serve_supported(krserve):
        pytest.skip("no `krserve serve` in this build")
    import sys
    import time
    import urllib.parse
    sys.path.insert(0, str(ROOT / "bench" / "serve"))
    import loadgen

    (CACHE / "deploy").mkdir(parents=True, exist_ok=True)
    with loadgen.ServerProcess(krserve, default_model,
                               log_path=CACHE / "deploy" / "serve-prom.log") as srv:
        cfg = PROMETHEUS_YML.read_text().replace("127.0.0.1:8080", f"127.0.0.1:{srv.port}")
        cfg = re.sub(r"scrape_interval: \S+", "scrape_interval: 1s", cfg)
        cfg = re.sub(r"scrape_timeout: \S+", "scrape_timeout: 1s", cfg)
        (tmp_path / "prometheus.yml").write_text(cfg)
        pport = loadgen.free_port()
        purl = f"http://127.0.0.1:{pport}"
        p = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp_path / 'data'}",
                              f"--web.listen-address=127.0.0.1:{pport}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def query(q):
                status, body = loadgen.http_get(
                    purl + "/api/v1/query?query=" + urllib.parse.quote(q), timeout=10)
                js = json.loads(body)
                assert status == 200 and js["status"] == "success", (q, body[:300])
                return js["data"]["result"]

            t_end = time.time() + 60
            while True:
                try:
                    if query('up{job="kr-serve"} == 1'):
                        break
                except OSError:
                    pass
                assert time.time() < t_end, "Prometheus never scraped kr-serve"
                time.sleep(0.5)
            # load spread over a few scrapes so that rate() and histogram_quantile() see change
            for i in range(3):
                rs = loadgen.run_burst(srv.url, ["Say hi.", "Name a color."], 2, 4, stream=True,
                                       priority=["urgent", "background"][i % 2])
                assert all(r.ok for r in rs), [r.error for r in rs]
                time.sleep(1.5)
            time.sleep(2.5)
            _, exprs = dashboard_exprs()
            empty = [(title, e) for title, e in exprs if not query(substitute(e))]
            assert not empty, empty
        finally:
            p.terminate()
            p.wait(30)
