#!/usr/bin/env python3
"""Plain numpy float32 reference forward pass reading a GGUF file (gemma3; also llama, qwen2).

Independent of the C engine: weights are read with gguf.GGUFReader and dequantized with
gguf.quants.dequantize (lazily, cached per tensor); the math follows MODEL-FORMATS.md:
  gemma3 (4.7): embedding * sqrt(n_embd); pre-norm attention with per-head q/k RMSNorm before
    NEOX RoPE (theta rope.freq_base_swa, default 10000, on sliding layers il % 6 < 5; theta
    rope.freq_base on the others), q scaled by 1/sqrt(head_dim) after RoPE, causal mask plus
    the sliding window p_q - p_k < n_swa on sliding layers, post-attention norm, GEGLU FFN with
    tanh GELU on the gate, post-FFN norm; final norm; tied output (token_embd) if no output.
    Norm weights in GGUF already include the +1.
  llama (5.1, 5.3): NORMAL RoPE (adjacent pairs, rows already permuted by the converter),
    optional rope_freqs factors, SwiGLU, no embedding scale.
  qwen2 (5.1, 5.4): NEOX RoPE, q/k/v biases, optional output.bias.
GQA: query head h uses kv head h // (n_head / n_head_kv).  Everything is float32 except
RMSNorm's mean of squares and the RoPE angles (float64, then rounded).

CLI: ref_gemma3_numpy.py [-m MODEL.gguf] --tokens 2,818,5279 [--greedy N] prints the greedy
continuation (ids and text).  Python: `Model(path).logits(tokens)` (all positions) and
`Model(path).greedy(tokens, n)`.
"""
import argparse
import pathlib
import sys
import time

import numpy as np

import gguf
import gguf.quants

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class Model:
    def __init__(self, path, act_quant=False):
        """act_quant: round every matmul input to int8 blocks of 32 (fp16 scale), as ggml's
        CPU backend does for quantized weights (Q8_0/Q8_K activations); only used to estimate
        how far an engine that does so may move the logits."""
        self.act_quant = act_quant
        self.path = pathlib.Path(path)
        self.r = gguf.GGUFReader(str(self.path))
        self.arch = _field(self.r, "general.architecture")
        if self.arch not in ("gemma3", "llama", "qwen2"):
            raise ValueError(f"unsupported architecture {self.arch}")
        a = self.arch

        def hp(key, default=None):
            return _field(self.r, f"{a}.{key}", default)

        self.n_embd = int(hp("embedding_length"))
        self.n_layer = int(hp("block_count"))
        self.n_head = int(hp("attention.head_count"))
        self.n_head_kv = int(hp("attention.head_count_kv", self.n_head))
        self.head_dim = int(hp("attention.key_length", self.n_embd // self.n_head))
        self.n_rot = int(hp("rope.dimension_count", self.head_dim))
        self.eps = float(hp("attention.layer_norm_rms_epsilon"))
        self.freq_base = float(hp("rope.freq_base", 10000.0))
        self.freq_base_swa = float(hp("rope.freq_base_swa", 10000.0))
        self.n_swa = int(hp("attention.sliding_window", 0) or 0) if a == "gemma3" else 0
        self.swa_period = int(hp("attention.sliding_window_pattern", 6)) if a == "gemma3" else 0
        scaling_type = hp("rope.scaling.type", "linear")
        factor = float(hp("rope.scaling.factor", 0.0) or 0.0)
        self.freq_scale = 1.0 / factor if (factor and scaling_type == "linear") else 1.0
        self.softcap = float(hp("final_logit_softcapping", 0.0) or 0.0)
        self.tensors = {t.name: t for t in self.r.tensors}
        self.tokens = _field(self.r, "tokenizer.ggml.tokens")
        self._w = {}

    # -- weights ---------------------------------------------------------------------------
    def w(self, name):
        """float32 array in numpy order (a GGUF [ne0, ne1] matrix is [ne1][ne0]); None if absent."""
        if name not in self._w:
            t = self.tensors.get(name)
            if t is None:
                self._w[name] = None
            else:
                a = gguf.quants.dequantize(t.data, t.tensor_type)
                shape = tuple(int(x) for x in reversed(t.shape))
                self._w[name] = np.ascontiguousarray(a, dtype=np.float32).reshape(shape)
        return self._w[name]

    def is_swa(self, il):
        return self.n_swa > 0 and il % self.swa_period < self.swa_period - 1

    # -- building blocks -------------------------------------------------------------------
    def rms(self, x, w):
        ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
        return (x * (1.0 / np.sqrt(ms + self.eps)).astype(np.float32)) * w

    def rope(self, x, pos, base, scale, neox, factors=None):
        """x: [n_tok, n_heads, D]; rotates the first n_rot dims in place of a copy."""
        d = self.n_rot
        i = np.arange(d // 2, dtype=np.float64)
        theta = scale * pos[:, None].astype(np.float64) * base ** (-2.0 * i / d)[None, :]
        if factors is not None:
            theta = theta / factors[None, :].astype(np.float64)
        c = np.cos(theta).astype(np.float32)[:, None, :]
        s = np.sin(theta).astype(np.float32)[:, None, :]
        y = x.copy()
        if neox:
            a, b = x[..., : d // 2], x[..., d // 2 : d]
            y[..., : d // 2] = a * c - b * s
            y[..., d // 2 : d] = a * s + b * c
        else:
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            y[..., 0:d:2] = a * c - b * s
            y[..., 1:d:2] = a * s + b * c
        return y

    @staticmethod
    def gelu_tanh(x):
        return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608) * (x + np.float32(0.044715) * x**3)))

    @staticmethod
    def silu(x):
        return x / (1.0 + np.exp(-x))

    @staticmethod
    def q8(x):
        xb = x.reshape(*x.shape[:-1], -1, 32)
        d = (np.abs(xb).max(axis=-1, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)
        q = np.where(d > 0, np.rint(xb / np.where(d > 0, d, 1)), 0)
        return (q * d).reshape(x.shape).astype(np.float32)

    def lin(self, name, x):
        if self.act_quant and self.tensors[name + ".weight"].tensor_type not in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                gguf.GGMLQuantizationType.BF16):
            x = self.q8(x)
        y = x @ self.w(name + ".weight").T
        b = self.w(name + ".bias")
        return y if b is None else y + b

    # -- forward -----------------------------------------------------------------------------
    def new_cache(self):
        return dict(pos=0, k=[None] * self.n_layer, v=[None] * self.n_layer)

    def forward(self, tokens, cache=None):
        """Logits [len(tokens), n_vocab] for tokens appended after the cache's positions."""
        if cache is None:
            cache = self.new_cache()
        toks = np.asarray(tokens, dtype=np.int64)
        n = len(toks)
        p0 = cache["pos"]
        pos = np.arange(p0, p0 + n)
        H, Hkv, D = self.n_head, self.n_head_kv, self.head_dim
        g = self.arch == "gemma3"
        h = self.w("token_embd.weight")[toks].astype(np.float32)
        if g:
            h = h * np.float32(np.sqrt(self.n_embd))
        for il in range(self.n_layer):
            p = f"blk.{il}."
            x = self.rms(h, self.w(p + "attn_norm.weight"))
            q = self.lin(p + "attn_q", x).reshape(n, H, D)
            k = self.lin(p + "attn_k", x).reshape(n, Hkv, D)
            v = self.lin(p + "attn_v", x).reshape(n, Hkv, D)
            if g:
                q = self.rms(q, self.w(p + "attn_q_norm.weight"))
                k = self.rms(k, self.w(p + "attn_k_norm.weight"))
                swa = self.is_swa(il)
                base = self.freq_base_swa if swa else self.freq_base
                scale = 1.0 if swa else self.freq_scale
                q = self.rope(q, pos, base, scale, True)
                k = self.rope(k, pos, base, scale, True)
                q = q * np.float32(1.0 / np.sqrt(D))
                kq_scale = np.float32(1.0)
            else:
                swa = False
                neox = self.arch == "qwen2"
                ff = self.w("rope_freqs.weight")
                q = self.rope(q, pos, self.freq_base, self.freq_scale, neox, ff)
                k = self.rope(k, pos, self.freq_base, self.freq_scale, neox, ff)
                kq_scale = np.float32(1.0 / np.sqrt(D))
            K = k if cache["k"][il] is None else np.concatenate([cache["k"][il], k], axis=0)
            V = v if cache["v"][il] is None else np.concatenate([cache["v"][il], v], axis=0)
            cache["k"][il], cache["v"][il] = K, V
            kpos = np.arange(K.shape[0])
            masked = kpos[None, :] > pos[:, None]
            if swa:
                masked |= (pos[:, None] - kpos[None, :]) >= self.n_swa
            rep = H // Hkv
            o = np.empty((n, H, D), dtype=np.float32)
            for hh in range(H):
                kv = hh // rep
                s = (q[:, hh, :] @ K[:, kv, :].T) * kq_scale
                s = np.where(masked, -np.inf, s)
                s = s - s.max(axis=1, keepdims=True)
                e = np.exp(s)
                a = e / e.sum(axis=1, keepdims=True)
                o[:, hh, :] = a @ V[:, kv, :]
            attn = self.lin(p + "attn_output", o.reshape(n, H * D))
            if g:
                attn = self.rms(attn, self.w(p + "post_attention_norm.weight"))
            h = h + attn
            x = self.rms(h, self.w(p + "ffn_norm.weight"))
            gate = self.lin(p + "ffn_gate", x)
            up = self.lin(p + "ffn_up", x)
            f = (self.gelu_tanh(gate) if g else self.silu(gate)) * up
            f = self.lin(p + "ffn_down", f)
            if g:
                f = self.rms(f, self.w(p + "post_ffw_norm.weight"))
            h = h + f
        cache["pos"] = p0 + n
        h = self.rms(h, self.w("output_norm.weight"))
        out = self.w("output.weight")
        if out is None:
            out = self.w("token_embd.weight")
        logits = h @ out.T
        if self.w("output.bias") is not None:
            logits = logits + self.w("output.bias")
        if self.softcap:
            logits = self.softcap * np.tanh(logits / self.softcap)
        return logits.astype(np.float32)

    def logits(self, tokens):
        return self.forward(tokens)

    def greedy(self, prompt, n):
        """Greedy continuation: (ids, margins) where margins[i] = top1 - top2 logit at step i."""
        cache = self.new_cache()
        last = self.forward(prompt, cache)[-1]
        ids, margins = [], []
        for i in range(n):
            top2 = np.partition(last, -2)[-2:]
            t = int(np.argmax(last))
            ids.append(t)
            margins.append(float(abs(top2[1] - top2[0])))
            if i + 1 < n:
                last = self.forward([t], cache)[-1]
        return ids, margins

    def detok(self, ids):
        """SPM detokenization for display (▁ -> space, <0xNN> byte pieces)."""
        out = bytearray()
        for i in ids:
            t = self.tokens[i]
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                out.append(int(t[3:5], 16))
            else:
                out += t.replace("\u2581", " ").encode()
        return out.decode("utf-8", errors="replace")

    def lookup(self, pieces):
        """Ids of exact vocabulary pieces (for hand-built prompts)."""
        index = {t: i for i, t in enumerate(self.tokens)}
        return [index[p] for p in pieces]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "default.gguf"))
    ap.add_argument("--tokens", required=True, help="comma-separated prompt ids")
    ap.add_argument("--greedy", type=int, default=16)
    a = ap.parse_args(argv)
    m = Model(a.model)
    prompt = [int(x) for x in a.tokens.split(",")]
    t0 = time.time()
    ids, margins = m.greedy(prompt, a.greedy)
    print(",".join(map(str, ids)))
    print(repr(m.detok(prompt)), "->", repr(m.detok(ids)))
    print("min top-2 margin %.4f; %.1f s" % (min(margins), time.time() - t0), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
