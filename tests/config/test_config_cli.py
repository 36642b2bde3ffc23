"""`krserve config --print|--json`: the effective value and its source for file, env and flags,
and exit code 1 with the key named for an invalid configuration. Runs in a temporary directory
with a scrubbed environment so that neither the repo's config/runtime.yaml nor the caller's
KRSERVE_* / MLX_* variables leak in."""
import json
import os
import re
import subprocess

import pytest


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KRSERVE_", "MLX_"))}
    env.update(extra)
    return env


def run(krserve, args, cwd, **env):
    return subprocess.run([str(krserve), "config", *args], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=30)


def parse_dump(text):
    """{key: (value, source)} from the `key = value # source` lines."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(\S+)\s+= (.*?)\s+# (.*)$", line)
        assert m, line
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


def test_defaults_without_file(krserve, workdir):
    r = run(krserve, ["--print"], workdir)
    assert r.returncode == 0, r.stderr
    d = parse_dump(r.stdout)
    assert "# config file: none" in r.stdout
    assert len(d) == 45
    assert d["model.device"] == ("cpu", "default")
    assert d["performance.prefixCache.enabled"] == ("true", "default")
    assert d["performance.prefixCache.maxTokens"] == ("0", "default")
    assert d["performance.dedup"] == ("false", "default")
    assert d["server.port"] == ("8080", "default")
    assert d["performance.gpuScheduler.mode"] == ("auto", "default")
    assert d["monitoring.metrics.windowsSec"] == ("[5, 30, 60]", "default")
    assert all(src == "default" for _, src in d.values())


def test_file_env_flag_precedence(krserve, workdir):
    cfg = workdir / "my.yaml"
    cfg.write_text("server:\n  port: 9001\n  host: 0.0.0.0\n"
                   "performance:\n  gpuScheduler:\n    batchSize: 8\n    autoTune:\n"
                   "      maxBatch: 16\n")
    r = run(krserve, ["--print", "--config", str(cfg), "--port", "9003",
                      "--set", "performance.gpuScheduler.autoTune.maxBatch=12"], workdir,
            KRSERVE_PORT="9002", MLX_GPU_SCHEDULER_BATCH_SIZE="6", MLX_GPU_SCHEDULER="off",
            KRSERVE_DEDUP="1")
    assert r.returncode == 0, r.stderr
    d = parse_dump(r.stdout)
    assert d["server.port"] == ("9003", "flag --port")
    assert d["server.host"] == ("0.0.0.0", f"file {cfg}:3:9")
    assert d["performance.gpuScheduler.batchSize"] == ("6", "env MLX_GPU_SCHEDULER_BATCH_SIZE")
    assert d["performance.gpuScheduler.enabled"] == ("false", "env MLX_GPU_SCHEDULER")
    assert d["performance.gpuScheduler.autoTune.maxBatch"] == ("12", "flag --set")
    assert d["server.threads"] == ("8", "default")
    assert d["performance.dedup"] == ("true", "env KRSERVE_DEDUP")


def test_default_file_in_cwd_and_krserve_config(krserve, workdir):
    (workdir / "config").mkdir()
    (workdir / "config" / "runtime.yaml").write_text("logging:\n  level: debug\n")
    r = run(krserve, ["--print"], workdir)
    assert r.returncode == 0, r.stderr
    assert parse_dump(r.stdout)["logging.level"] == ("debug", "file config/runtime.yaml:2:10")
    other = workdir / "other.yaml"
    other.write_text("logging:\n  level: warn\n")
    r = run(krserve, ["--print"], workdir, KRSERVE_CONFIG=str(other))
    assert parse_dump(r.stdout)["logging.level"] == ("warn", f"file {other}:2:10")
    r = run(krserve, ["--print", "--log-level", "error"], workdir, KRSERVE_LOG_LEVEL="off")
    assert parse_dump(r.stdout)["logging.level"] == ("error", "flag --log-level")


def test_api_key_redacted_and_json(krserve, workdir):
    r = run(krserve, ["--json", "-m", "models/a.gguf"], workdir, KRSERVE_API_KEY="hunter2")
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout
    j = json.loads(r.stdout)
    assert j["server"]["apiKey"] == "<redacted>"
    assert j["model"]["path"] == "models/a.gguf"
    assert j["model"]["name"] is None
    assert j["performance"]["adaptiveBatching"]["windowMinMs"] == 0.75
    assert j["sources"]["server.apiKey"] == "env KRSERVE_API_KEY"
    assert j["sources"]["model.path"] == "flag -m"
    r = run(krserve, ["--print"], workdir, KRSERVE_API_KEY="hunter2")
    assert "hunter2" not in r.stdout
    assert parse_dump(r.stdout)["server.apiKey"] == ("<redacted>", "env KRSERVE_API_KEY")


@pytest.mark.parametrize("yaml_text,env,flags,expect", [
    ("performance:\n  gpuScheduler:\n    autoTune:\n      maxBatch: lots\n", {}, [],
     "{file}:4:17: performance.gpuScheduler.autoTune.maxBatch: expected an integer in "
     "[1, 1024], got \"lots\""),
    ("server:\n  prot: 80\n", {}, [],
     "{file}:2:3: server.prot: unknown key (did you mean server.port?)"),
    ("performance:\n  gpuScheduler:\n    mode: turbo\n", {}, [],
     "{file}:3:11: performance.gpuScheduler.mode: expected one of auto|fixed|off"),
    ("performance:\n  adaptiveBatching:\n    windowMinMs: 4\n", {}, [],
     "{file}:3:18: performance.adaptiveBatching.windowMinMs: must be <= "
     "performance.adaptiveBatching.windowMaxMs"),
    ("", {"MLX_AUTO_TUNE": "perhaps"}, [],
     "env MLX_AUTO_TUNE: performance.gpuScheduler.autoTune.enabled: expected a boolean"),
    ("", {}, ["--kv-tokens", "-5"],
     "flag --kv-tokens: model.kvCacheTokens: expected an integer in [0, 16777216], got \"-5\""),
    ("", {}, ["--set", "logging.colour=on"],
     "flag --set: logging.colour: unknown key"),
])
def test_invalid_config_exits_1(krserve, workdir, yaml_text, env, flags, expect):
    cfg = workdir / "bad.yaml"
    cfg.write_text(yaml_text)
    r = run(krserve, ["--print", "--config", str(cfg), *flags], workdir, **env)
    assert r.returncode == 1
    assert r.stdout == ""
    assert expect.format(file=cfg) in r.stderr, r.stderr


def test_missing_explicit_file_and_usage(krserve, workdir):
    r = run(krserve, ["--print", "--config", "nope.yaml"], workdir)
    assert r.returncode == 1
    assert "nope.yaml: cannot open config file" in r.stderr
    r = run(krserve, [], workdir)
    assert r.returncode == 2
    r = run(krserve, ["--print", "--bogus"], workdir)
    assert r.returncode == 2 and "unknown option '--bogus'" in r.stderr
    r = run(krserve, ["--help"], workdir)
    assert r.returncode == 0 and "--set key.path=value" in r.stdout


def test_repo_config_file_is_the_defaults(krserve, root, workdir):
    r = run(krserve, ["--print", "--config", str(root / "config" / "runtime.yaml")], workdir)
    assert r.returncode == 0, r.stderr
    with_file = {k: v for k, (v, _) in parse_dump(r.stdout).items()}
    r = run(krserve, ["--print"], workdir)
    assert with_file == {k: v for k, (v, _) in parse_dump(r.stdout).items()}
