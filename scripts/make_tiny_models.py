#!/usr/bin/env python3
"""Tiny random-weight test models (gemma3, llama, qwen2) + independent reference logits.

For each model this writes, under a cache folder keyed by the hash of this script and of
scripts/convert_hf_to_gguf.py (and the mlx-lm / gguf versions):

  <name>/hf/                      Hugging Face checkpoint (config.json, model.safetensors,
                                  tiny_vocab.json) with random float32 weights
  <name>/<VARIANT>.gguf           the same model converted by scripts/convert_hf_to_gguf.py,
                                  VARIANT in F32 F16 BF16 Q8_0 Q4_0 Q5_0 MIXED (see VARIANTS)
  <name>/ref_<VARIANT>_<seq>.npy  float32 logits [n_tokens, n_vocab] for every position,
                                  computed by mlx-lm (an implementation independent of this
                                  project) on the HF checkpoint; for every variant but F32 the
                                  checkpoint fed to mlx-lm is the GGUF file's weights
                                  dequantized back to float32 (so only forward-pass error
                                  remains when comparing against the C engine)
  manifest.json                   what is where (models, variants, token sequences, configs)

Usage: make_tiny_models.py [--out DIR]  (default tests/.cache/models); from Python:
`ensure(cache_root) -> (model_dir, manifest)` generates only when missing.
"""
import argparse
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convert_hf_to_gguf as conv  # noqa: E402

VARIANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "MIXED"]
VOCAB_SIZE = 384

# Configs follow the real models' conventions (theta, eps, GQA/MQA, biases, tying) at toy size.
# gemma3: 7 layers => layer 5 global, the others sliding (pattern 6); query_pre_attn_scalar =
# head_dim so that mlx-lm's scale equals llama.cpp's 1/sqrt(head_dim); hidden 64 so that the
# embedding scale sqrt(64) = 8 is exact in bfloat16 (mlx-lm rounds it to bf16, llama.cpp not).
# head_dim*n_head = 256 and intermediate 256 make attn_output/ffn_down eligible for K-quants
# (as in gemma-3-270m, where only those two tensors are K-quants).
_GEMMA3 = dict(
    model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64,
    num_hidden_layers=7, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1,
    head_dim=64, rms_norm_eps=1e-6, vocab_size=VOCAB_SIZE, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, query_pre_attn_scalar=64, sliding_window=16,
    sliding_window_pattern=6, max_position_embeddings=32768, rope_scaling=None,
    hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
    attn_logit_softcapping=None, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
    pad_token_id=0,
)
CONFIGS = {
    "gemma3": dict(_GEMMA3),
    # The real sliding window: the sequence of 640 tokens goes past it.
    "gemma3_swa512": dict(_GEMMA3, sliding_window=512),
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
        num_hidden_layers=3, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, vocab_size=VOCAB_SIZE,
        rope_theta=500_000.0, max_position_embeddings=8192, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=2,
        eos_token_id=1,
    ),
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
        num_hidden_layers=3, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB_SIZE,
        rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=True,
        hidden_act="silu", bos_token_id=2, eos_token_id=1,
    ),
}
SEQUENCES = {  # name -> (length, models using it)
    "s40": (40, ["gemma3", "llama", "qwen2"]),
    "s640": (640, ["gemma3_swa512"]),
}
# mlx-lm's CPU attention is slow at 640 tokens (~1.5 s a run): fewer variants for that model.
VARIANTS_OF = {"gemma3_swa512": ["F32", "Q8_0", "MIXED"]}
SEED = 1234

WORDS = """the of and to in is was for that on with as by at from it his an are be this which
or had not but have one were they their all has been its who new more after first two other
time when can would she there also he we you what about up out so said some city state world
capital france paris model token test river house small large""".split()


def build_vocab(n=VOCAB_SIZE):
    """SentencePiece-style vocabulary like Gemma's: controls, byte fallback, then pieces.

    Pieces: single letters, "▁", and every prefix of "▁word" for each word, so that the SPM
    merge algorithm can build each word from characters.  Scores decrease with the id."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n"]
    types = [3, 3, 3, 2, 3, 3, 1]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    for w in WORDS:
        for i in range(2, len(w) + 2):
            p = "\u2581" + w[: i - 1]
            if p not in pieces:
                pieces.append(p)
    pieces = pieces[: n - len(tokens)]
    if len(tokens) + len(pieces) < n:
        raise ValueError("word list too short for the vocab size")
    tokens += pieces
    types += [1] * len(pieces)
    scores = [-1000.0 if t in (2, 3) else 0.0 for t in types]
    for i in range(len(tokens) - len(pieces), len(tokens)):
        scores[i] = -float(i)
    return dict(tokens=tokens, scores=scores, types=types, bos=2, eos=1, unk=3, pad=0)


def random_state(cfg, rng):
    """Random float32 weights in HF naming. Norm multipliers are ~1 (gemma3 stores w with the
    multiplier 1 + w, so w ~ 0.1 N(0,1)); projections ~ N(0, 1/fan_in)."""
    arch = conv.ARCH_OF_MODEL_TYPE[cfg["model_type"]]
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    V = cfg["vocab_size"]

    def lin(n_out, n_in, gain=1.0):
        return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)

    def normw(n):
        w = 0.1 * rng.standard_normal(n)
        return (w if arch == "gemma3" else 1.0 + w).astype(np.float32)

    s = {"model.embed_tokens.weight": (0.3 * rng.standard_normal((V, h))).astype(np.float32)}
    for il in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{il}."
        s[p + "input_layernorm.weight"] = normw(h)
        s[p + "post_attention_layernorm.weight"] = normw(h)
        s[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        s[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        s[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        s[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        s[p + "mlp.gate_proj.weight"] = lin(ff, h)
        s[p + "mlp.up_proj.weight"] = lin(ff, h)
        s[p + "mlp.down_proj.weight"] = lin(h, ff)
        if arch == "gemma3":
            s[p + "self_attn.q_norm.weight"] = normw(hd)
            s[p + "self_attn.k_norm.weight"] = normw(hd)
            s[p + "pre_feedforward_layernorm.weight"] = normw(h)
            s[p + "post_feedforward_layernorm.weight"] = normw(h)
        if arch == "qwen2":
            for n, width in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                s[p + f"self_attn.{n}_proj.bias"] = (0.1 * rng.standard_normal(width)).astype(
                    np.float32)
    s["model.norm.weight"] = normw(h)
    if not cfg["tie_word_embeddings"]:
        s["lm_head.weight"] = (0.3 * rng.standard_normal((V, h))).astype(np.float32)
    return s


def token_sequence(length, vocab, rng):
    """<bos> followed by random ordinary tokens (byte tokens and pieces, no controls)."""
    first = 7  # after the control tokens and "\n"
    return [vocab["bos"]] + [int(t) for t in rng.integers(first, len(vocab["tokens"]),
                                                          size=length - 1)]


def write_hf(dirpath, cfg, state, vocab):
    from safetensors.numpy import save_file

    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "config.json").write_text(json.dumps(cfg, indent=1))
    (dirpath / "tiny_vocab.json").write_text(json.dumps(vocab))
    save_file(state, str(dirpath / "model.safetensors"))


def mlx_logits(hf_dir, tokens):
    """All-position logits [n, vocab] float32 from mlx-lm on the CPU."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu)
    model, _ = load_model(pathlib.Path(hf_dir))
    out = model(mx.array([tokens], dtype=mx.int32))[0].astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def cache_key():
    import gguf  # noqa: F401
    import importlib.metadata as md

    h = hashlib.sha256()
    for f in (HERE / "make_tiny_models.py", HERE / "convert_hf_to_gguf.py"):
        h.update(f.read_bytes())
    for pkg in ("mlx", "mlx-lm", "gguf", "numpy"):
        h.update(f"{pkg}={md.version(pkg)}".encode())
    return h.hexdigest()[:16]


def generate(out_dir):
    """Build every model, GGUF variant and reference into out_dir (which must not exist)."""
    t0 = time.time()
    vocab = build_vocab()
    rng = np.random.default_rng(SEED)
    seqs = {name: token_sequence(n, vocab, rng) for name, (n, _) in SEQUENCES.items()}
    manifest = dict(variants=VARIANTS, sequences=seqs, models={})
    for name, cfg in CONFIGS.items():
        mdir = out_dir / name
        state = random_state(cfg, np.random.default_rng(SEED + len(manifest["models"]) + 1))
        write_hf(mdir / "hf", cfg, state, vocab)
        my_seqs = [s for s, (_, models) in SEQUENCES.items() if name in models]
        entry = dict(config=cfg, arch=conv.ARCH_OF_MODEL_TYPE[cfg["model_type"]],
                     sequences=my_seqs, variants=VARIANTS_OF.get(name, VARIANTS), files={},
                     refs={})
        for var in entry["variants"]:
            gg = mdir / f"{var}.gguf"
            conv.convert(mdir / "hf", gg, var)
            entry["files"][var] = gg.name
            if var == "F32":
                ref_dir = mdir / "hf"
                back = conv.gguf_to_hf_state(gg, cfg)
                # The inverse conversion must reproduce the checkpoint bit for bit.
                for k, v in state.items():
                    if k == "lm_head.weight" and cfg["tie_word_embeddings"]:
                        continue
                    a, b = back[k], v
                    if entry["arch"] == "gemma3" and k.endswith("norm.weight"):
                        # (1 + w) - 1 need not give w back; the multiplier 1 + w must match.
                        a, b = a + np.float32(1), b + np.float32(1)
                    if not np.array_equal(a, b):
                        raise AssertionError(f"{name}: F32 round trip differs at {k}")
            else:
                ref_dir = mdir / f"hf_{var}"
                write_hf(ref_dir, cfg, conv.gguf_to_hf_state(gg, cfg), vocab)
            for s in my_seqs:
                ref = mlx_logits(ref_dir, seqs[s])
                fn = f"ref_{var}_{s}.npy"
                np.save(mdir / fn, ref.astype(np.float32))
                entry["refs"][f"{var}/{s}"] = fn
            if ref_dir != mdir / "hf":
                shutil.rmtree(ref_dir)
        manifest["models"][name] = entry
    manifest["generation_seconds"] = round(time.time() - t0, 2)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def ensure(cache_root):
    """Return (model_dir, manifest), generating the models once per script version."""
    cache_root = pathlib.Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / cache_key()
    with open(cache_root / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not (target / "manifest.json").exists():
            tmp = cache_root / f".tmp-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            generate(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    return target, json.loads((target / "manifest.json").read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE.parent / "tests" / ".cache" / "models"))
    a = ap.parse_args(argv)
    d, m = ensure(a.out)
    print(f"{d} (generated in {m['generation_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
