"""The CUDA backend on whole models (tests/backend/cuda_model_check.py) under pytest: skipped,
with the reason printed, where the build has no CUDA backend or the machine no GPU."""
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "model"))


def test_cuda_matches_cpu_and_references(krserve, cache_dir, default_model):
    import oracle_util

    d, _ = oracle_util.make_tiny_models.ensure(cache_dir / "models")
    p = subprocess.run([sys.executable, HERE / "cuda_model_check.py", "--krserve", krserve,
                        "--models", d, "--model", default_model],
                       capture_output=True, text=True, timeout=1800)
    print(p.stdout)
    if p.returncode == 77:
        pytest.skip(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
