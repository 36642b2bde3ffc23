"""Bit-exactness of the C dequantizers against gguf.quants.dequantize (numpy).

Generates random block vectors with make_dequant_vectors.py (the numpy oracle), then runs the
C test program quant_test_dequant_vectors on them and requires every test to pass, none
skipped."""
import os
import re
import subprocess
import sys

import pytest

from krs_paths import BUILD, ROOT


def test_dequant_bit_exact_with_gguf(cache_dir, tmp_path):
    exe = BUILD / "quant_test_dequant_vectors"
    if not exe.exists():
        pytest.fail(f"{exe} not built; run `make build` first")
    vec_dir = cache_dir / "quant"
    subprocess.run([sys.executable, str(ROOT / "tests" / "quant" / "make_dequant_vectors.py"),
                    str(vec_dir)], check=True)
    env = dict(os.environ, KRS_QUANT_VECTOR_DIR=str(vec_dir))
    r = subprocess.run([str(exe)], env=env, cwd=ROOT, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SKIPPED" not in out, out
    assert "14 test(s) run" in out and "PASSED" in out, out
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                 "Q4_K", "Q5_K", "Q6_K", "F16ENC"):
        assert re.search(rf"^{name}: \d+ \w+, 0 mismatches$", out, re.M), out
