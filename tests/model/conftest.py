"""Fixtures for the model-correctness oracles: tiny generated models and the C CLI contract.

Contract (implemented by the C side, src/cli):
  krserve eval-logits -m MODEL.gguf --tokens 2,17,33 --out OUT.f32 [--all]
      writes raw little-endian float32 logits, [n_tokens, n_vocab] with --all, else [1, n_vocab]
  krserve eval-logits -m MODEL.gguf --tokens 2,17,33 --greedy N
      prints N greedily generated token ids, comma-separated, on one line of stdout
"""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import oracle_util  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _write_report():
    yield
    oracle_util.flush_report()


@pytest.fixture(scope="session")
def tiny_models(cache_dir):
    """(folder, manifest) of the generated tiny models and their mlx-lm references."""
    return oracle_util.make_tiny_models.ensure(cache_dir / "models")
