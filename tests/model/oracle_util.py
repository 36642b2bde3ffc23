"""Helpers for the model-correctness oracles (the C CLI contract is in conftest.py)."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import make_tiny_models  # noqa: E402

REPORT = ROOT / "tests" / ".cache" / "model_oracle_report.txt"
_report_lines = []


def report(line):
    """Print a result line (visible with pytest -s) and collect it for the report file."""
    print(line)
    _report_lines.append(line)


def nerr(c, ref):
    """Normalised error ||c - ref|| / ||ref|| over all positions."""
    return float(np.linalg.norm(c - ref) / np.linalg.norm(ref))


def top2_margin(logits):
    s = np.sort(logits, axis=-1)
    return s[..., -1] - s[..., -2]


def _run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {p.returncode}\nstdout: {p.stdout[-2000:]}"
                    f"\nstderr: {p.stderr[-2000:]}")
    return p.stdout


def eval_logits(krserve, model, tokens, n_vocab, out_path, all_positions=True):
    """Run the C engine; returns float32 logits [n_tokens or 1, n_vocab]."""
    out_path = pathlib.Path(out_path)
    if out_path.exists():
        out_path.unlink()
    cmd = [krserve, "eval-logits", "-m", model, "--tokens", ",".join(map(str, tokens)),
           "--out", out_path]
    if all_positions:
        cmd.append("--all")
    _run(cmd)
    a = np.fromfile(out_path, dtype="<f4")
    rows = len(tokens) if all_positions else 1
    assert a.size == rows * n_vocab, f"{out_path}: {a.size} floats, expected {rows}x{n_vocab}"
    return a.reshape(rows, n_vocab)


def eval_greedy(krserve, model, tokens, n):
    out = _run([krserve, "eval-logits", "-m", model, "--tokens", ",".join(map(str, tokens)),
                "--greedy", n]).strip().splitlines()
    assert out, "no output from --greedy"
    ids = [int(x) for x in out[-1].split(",") if x.strip()]
    assert len(ids) == n, f"--greedy {n} printed {len(ids)} ids: {out[-1]!r}"
    return ids


def flush_report():
    """Append the collected lines (with a timestamp header) to tests/.cache/model_oracle_report.txt."""
    import time

    if _report_lines:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        with open(REPORT, "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + "\n".join(_report_lines) + "\n")
        _report_lines.clear()
