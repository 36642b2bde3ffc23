#!/usr/bin/env python3
"""Convert a (tiny) Hugging Face checkpoint directory to GGUF with llama.cpp's conventions.

Written for the test models of scripts/make_tiny_models.py (config.json + model.safetensors +
tiny_vocab.json); it follows the conventions documented in docs MODEL-FORMATS.md sections 3-5:

  * tensor names token_embd / blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
    attn_q_norm, attn_k_norm, post_attention_norm, ffn_norm, post_ffw_norm, ffn_gate, ffn_up,
    ffn_down} / output_norm / output (only if untied); qwen2 q/k/v biases as blk.N.attn_*.bias;
  * llama: rows of q_proj / k_proj permuted so that RoPE pairs are adjacent (NORMAL rope);
  * gemma3: 1.0 added to every norm weight (HF Gemma3RMSNorm multiplies by 1 + w);
  * the metadata keys llama.cpp reads for the three architectures;
  * a SentencePiece-style vocabulary (tokenizer.ggml.model = "llama").

Quantization: 1-D tensors (norms, biases) stay F32; 2-D weights get the requested type when
their row length (ne[0]) is a multiple of the type's block size, else F16, else F32.  The
"MIXED" file type assigns a different type per tensor kind (like llama-quantize's mixes).

The inverse direction (GGUF -> HF state dict, dequantized) is `gguf_to_hf_state`; tests use it
to build float32 references for quantized files.

Usage: convert_hf_to_gguf.py HF_DIR OUT.gguf [--type F32|F16|BF16|Q8_0|Q4_0|Q4_1|Q5_0|Q5_1|
       Q4_K|Q6_K|MIXED]
"""
import argparse
import json
import pathlib
import sys

import numpy as np

import gguf
import gguf.quants
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file

ARCH_OF_MODEL_TYPE = {"gemma3_text": "gemma3", "llama": "llama", "qwen2": "qwen2"}

# HF per-layer suffix -> GGUF per-layer name (weight or bias suffix appended).
LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# post_attention_layernorm is the pre-FFN norm in llama/qwen2 but a true post-attention norm
# in gemma3 (where pre_feedforward_layernorm is the pre-FFN norm).
LAYER_MAP_LLAMA = dict(LAYER_MAP, post_attention_layernorm="ffn_norm")
LAYER_MAP_GEMMA3 = dict(
    LAYER_MAP,
    post_attention_layernorm="post_attention_norm",
    pre_feedforward_layernorm="ffn_norm",
    post_feedforward_layernorm="post_ffw_norm",
)

# Per-kind types of the MIXED file type (covers the remaining 32-element block types + F16/BF16).
MIXED_TYPES = {
    "token_embd": QT.Q8_0,
    "output": QT.Q6_K,
    "attn_q": QT.Q5_0,
    "attn_k": QT.Q5_1,
    "attn_v": QT.Q8_0,
    "attn_output": QT.Q4_K,
    "ffn_gate": QT.Q4_1,
    "ffn_up": QT.F16,
    "ffn_down": QT.Q6_K,
}
# Without K-quant support for a row length, MIXED falls back like llama-quantize does.
K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0, QT.Q5_K: QT.Q5_1}
FILE_TYPE_ID = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                "Q4_K": 15, "Q6_K": 18, "BF16": 32, "MIXED": 15}


def permute_llama(w, n_head):
    """HF rotate_half row order -> llama.cpp adjacent-pair order (per head). w: [n_h*D, ...]."""
    rest = w.shape[1:]
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_llama(w, n_head):
    rest = w.shape[1:]
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _quantize(name_kind, arr, ftype):
    """Pick the tensor type for a 2-D float32 array and return (data, type)."""
    if arr.ndim == 1 or ftype == "F32":
        return arr.astype(np.float32), QT.F32
    qt = MIXED_TYPES[name_kind] if ftype == "MIXED" else QT[ftype]
    ne0 = arr.shape[-1]
    if qt in K_FALLBACK and ne0 % 256 != 0:
        qt = K_FALLBACK[qt]
    if ne0 % gguf.GGML_QUANT_SIZES[qt][0] != 0:
        qt = QT.F16
    if qt == QT.Q4_K:
        return quantize_q4_k(arr), qt
    if qt == QT.Q6_K:
        return quantize_q6_k(arr), qt
    return gguf.quants.quantize(arr.astype(np.float32), qt), qt


def _f16_round(x):
    return x.astype(np.float16).astype(np.float32)


def quantize_q4_k(arr):
    """Simple (not llama.cpp's optimal-search) Q4_K quantizer: min/max per 32-element sub-block.

    Layout per MODEL-FORMATS.md 2.6: d fp16, dmin fp16, scales[12] (6-bit sc/mn packed),
    qs[128] (per 64-element chunk: low nibbles = first 32, high nibbles = next 32)."""
    x = arr.astype(np.float32).reshape(-1, 8, 32)  # [n_blocks, sub-block, 32]
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = np.maximum(x.max(axis=2), 0.0)
    scale = (hi - lo) / 15.0  # per sub-block
    mins = -lo
    d = _f16_round(scale.max(axis=1) / 63.0)
    dmin = _f16_round(mins.max(axis=1) / 63.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin[:, None] > 0, np.rint(mins / dmin[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = d[:, None] * sc  # effective scale per sub-block
        off = dmin[:, None] * mn
        n = np.where(step[:, :, None] > 0, np.rint((x + off[:, :, None]) / step[:, :, None]), 0)
    n = n.clip(0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)  # chunk c, half, l
    qs = (n[:, :, 0, :] | (n[:, :, 1, :] << 4)).reshape(-1, 128)
    s = np.zeros((x.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    dd = np.stack([d, dmin], axis=1).astype(np.float16).view(np.uint8)
    blocks = np.concatenate([dd, s, qs], axis=1)
    return blocks.reshape(*arr.shape[:-1], arr.shape[-1] // 256 * 144)


def quantize_q6_k(arr):
    """Simple Q6_K quantizer: absmax per 16-element group, int8 group scales, 6-bit quants.

    Layout per MODEL-FORMATS.md 2.8: ql[128], qh[64], scales[16] int8, d fp16."""
    x = arr.astype(np.float32).reshape(-1, 16, 16)
    amax = np.abs(x).max(axis=2)
    gscale = amax / 31.0
    d = _f16_round(gscale.max(axis=1) / 127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(gscale / d[:, None]), 0).clip(-128, 127)
        step = d[:, None] * sc
        q = np.where(step[:, :, None] > 0, np.rint(x / step[:, :, None]), 0)
    u = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # h, k, l
    ql = np.zeros((u.shape[0], 2, 2, 32), dtype=np.uint8)  # h, k&1, l
    ql[:, :, 0, :] = (u[:, :, 0, :] & 0x0F) | ((u[:, :, 2, :] & 0x0F) << 4)
    ql[:, :, 1, :] = (u[:, :, 1, :] & 0x0F) | ((u[:, :, 3, :] & 0x0F) << 4)
    qh = ((u[:, :, 0, :] >> 4) | ((u[:, :, 1, :] >> 4) << 2) | ((u[:, :, 2, :] >> 4) << 4)
          | ((u[:, :, 3, :] >> 4) << 6))
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64),
                             sc.astype(np.int8).view(np.uint8),
                             d.astype(np.float16).view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(*arr.shape[:-1], arr.shape[-1] // 256 * 210)


def load_hf(hf_dir):
    hf_dir = pathlib.Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    vocab = json.loads((hf_dir / "tiny_vocab.json").read_text())
    return cfg, state, vocab


def hf_to_gguf_tensors(cfg, state):
    """HF state dict -> ordered list of (gguf_name, kind, float32 array) with conventions applied."""
    arch = ARCH_OF_MODEL_TYPE[cfg["model_type"]]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    lmap = LAYER_MAP_GEMMA3 if arch == "gemma3" else LAYER_MAP_LLAMA
    out = []

    def norm(a):
        return (a.astype(np.float32) + np.float32(1.0)) if arch == "gemma3" else a

    used = {"model.embed_tokens.weight", "model.norm.weight"}
    out.append(("token_embd.weight", "token_embd", state["model.embed_tokens.weight"]))
    out.append(("output_norm.weight", "norm", norm(state["model.norm.weight"])))
    if "lm_head.weight" in state and not cfg.get("tie_word_embeddings", arch == "gemma3"):
        out.append(("output.weight", "output", state["lm_head.weight"]))
        used.add("lm_head.weight")
    for il in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{il}."
        for hf_suffix, gg in lmap.items():
            for part in ("weight", "bias"):
                key = f"{pre}{hf_suffix}.{part}"
                if key not in state:
                    continue
                used.add(key)
                a = state[key].astype(np.float32)
                if arch == "llama" and gg in ("attn_q", "attn_k"):
                    a = permute_llama(a, n_head if gg == "attn_q" else n_kv)
                if gg.endswith("norm"):
                    a = norm(a)
                out.append((f"blk.{il}.{gg}.{part}", gg, a))
    left = set(state) - used - {"lm_head.weight"}
    if left:
        raise ValueError(f"unmapped HF tensors: {sorted(left)}")
    return arch, out


def write_metadata(w, arch, cfg, vocab, ftype):
    w.add_name(f"tiny-{arch}")
    w.add_uint32("general.file_type", FILE_TYPE_ID[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg["sliding_window"])
        w.add_rope_freq_base_swa(cfg["rope_local_base_freq"])
        # sliding_window_pattern is not written by the standard converter (default 6).
        if cfg.get("sliding_window_pattern", 6) != 6:
            raise ValueError("gemma3 GGUF has no pattern key; use sliding_window_pattern 6")
    else:
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(len(vocab["tokens"]))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_unk_token_id(vocab["unk"])
    w.add_pad_token_id(vocab["pad"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)


def convert(hf_dir, out_path, ftype="F32"):
    cfg, state, vocab = load_hf(hf_dir)
    arch, tensors = hf_to_gguf_tensors(cfg, state)
    w = gguf.GGUFWriter(str(out_path), arch)
    write_metadata(w, arch, cfg, vocab, ftype)
    for name, kind, arr in tensors:
        data, qt = _quantize(kind, np.ascontiguousarray(arr, dtype=np.float32), ftype)
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantize_tensor(t):
    """GGUFReader tensor -> float32 numpy array in numpy (row-major, HF) shape."""
    a = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(x) for x in reversed(t.shape))
    return np.ascontiguousarray(a, dtype=np.float32).reshape(shape)


def gguf_to_hf_state(gguf_path, cfg):
    """Dequantize a GGUF written by `convert` back into an HF float32 state dict."""
    arch = ARCH_OF_MODEL_TYPE[cfg["model_type"]]
    lmap = LAYER_MAP_GEMMA3 if arch == "gemma3" else LAYER_MAP_LLAMA
    inv = {v: k for k, v in lmap.items()}
    r = gguf.GGUFReader(str(gguf_path))
    state = {}
    for t in r.tensors:
        a = dequantize_tensor(t)
        name = t.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        else:
            _, il, gg, part = name.split(".")
            key = f"model.layers.{il}.{inv[gg]}.{part}"
            if arch == "llama" and gg in ("attn_q", "attn_k"):
                n = cfg["num_attention_heads"] if gg == "attn_q" else cfg["num_key_value_heads"]
                a = unpermute_llama(a, n)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a - np.float32(1.0)
        state[key] = np.ascontiguousarray(a, dtype=np.float32)
    return state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--type", default="F32")
    a = ap.parse_args(argv)
    convert(a.hf_dir, a.out, a.type)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    sys.exit(main())
