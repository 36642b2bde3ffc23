"""Cross-checks the Python oracles against each other (no C code involved).

mlx-lm running the Hugging Face checkpoint and scripts/ref_gemma3_numpy.py running the GGUF
file written by scripts/convert_hf_to_gguf.py are independent implementations; agreement to
float32 rounding validates the converter's conventions (llama Q/K permutation, gemma3 norm +1,
tensor names, metadata) and both references. Negative controls show the checks can fail:
dropping the sliding window or using the wrong RoPE pairing changes the logits.
"""
import numpy as np
import pytest

from oracle_util import make_tiny_models, nerr, report
from ref_gemma3_numpy import Model

CASES = [(name, var) for name in make_tiny_models.CONFIGS
         for var in make_tiny_models.VARIANTS_OF.get(name, make_tiny_models.VARIANTS)]


@pytest.mark.parametrize("name,variant", CASES)
def test_numpy_gguf_matches_mlx(tiny_models, name, variant):
    d, man = tiny_models
    e = man["models"][name]
    m = Model(d / name / e["files"][variant])
    for s in e["sequences"]:
        toks = man["sequences"][s]
        ref = np.load(d / name / e["refs"][f"{variant}/{s}"])
        got = m.logits(toks)
        err = nerr(got, ref)
        report(f"crosscheck numpy-gguf vs mlx-lm  {name:14s} {variant:5s} {s}: nerr {err:.2e}")
        assert err < 1e-5


def test_control_sliding_window_matters(tiny_models):
    d, man = tiny_models
    for name in ("gemma3", "gemma3_swa512"):
        e = man["models"][name]
        s = e["sequences"][0]
        toks = man["sequences"][s]
        ref = np.load(d / name / e["refs"][f"F32/{s}"])
        m = Model(d / name / "F32.gguf")
        w = m.n_swa
        assert w == e["config"]["sliding_window"] and len(toks) > w
        m.n_swa = 10**9  # sliding layers keep their RoPE base but see every position
        got = m.logits(toks)
        assert nerr(got[:w], ref[:w]) < 1e-5  # identical while the window covers everything
        err = nerr(got[w:], ref[w:])
        report(f"control: {name} without sliding window, positions >= {w}: nerr {err:.2e}")
        assert err > 1e-2


def test_control_llama_rope_pairing_matters(tiny_models):
    d, man = tiny_models
    e = man["models"]["llama"]
    toks = man["sequences"]["s40"]
    ref = np.load(d / "llama" / e["refs"]["F32/s40"])
    m = Model(d / "llama" / "F32.gguf")
    m.arch = "qwen2"  # NEOX pairing on llama-permuted rows (and no biases exist anyway)
    err = nerr(m.logits(toks), ref)
    report(f"control: llama with NEOX instead of NORMAL rope: nerr {err:.2e}")
    assert err > 1e-2
