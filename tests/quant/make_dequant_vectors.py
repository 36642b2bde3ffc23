#!/usr/bin/env python3
"""Writes dequantization test vectors for tests/quant/test_dequant_vectors.c.

The oracle is the gguf PyPI package (gguf.quants.dequantize, numpy). For each type, random
blocks (random payload bytes; fp16 scale fields either sane random values or arbitrary finite
fp16 bit patterns, subnormals included) plus, where gguf can quantize, blocks quantized from
random floats. F16/BF16 vectors hold all 65536 bit patterns. A last vector checks
float32 -> fp16 rounding against numpy's astype(float16).

File format (little endian), one file per vector, <out>/<NAME>.qvec:
    char magic[4] = "QVEC"; u32 ggml_type (0xFFFFFFFF for the fp16 encode vector);
    u32 n_elems; u32 n_bytes; u8 data[n_bytes]; f32 expected[n_elems]
For the encode vector data is n_elems float32 inputs and expected is n_elems uint16 results
(followed by padding to 4 bytes).

Usage: make_dequant_vectors.py OUT_DIR [--blocks N] [--seed S]
"""
import argparse
import pathlib
import struct

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

# type -> offsets of fp16 scale fields inside a block
SCALES = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def write(path, qtype, n_elems, data, expected):
    with open(path, "wb") as f:
        f.write(b"QVEC" + struct.pack("<III", qtype, n_elems, len(data)))
        f.write(data)
        f.write(expected)


def random_blocks(rng, qtype, n_blocks):
    bsize, tsize = quants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    for off in SCALES[qtype]:
        sane = (rng.uniform(-0.2, 0.2, size=n_blocks)).astype(np.float16).view(np.uint16)
        # arbitrary finite halves: any sign/mantissa, exponent 0..30
        wild = rng.integers(0, 65536, size=n_blocks, dtype=np.uint32).astype(np.uint16)
        wild = np.where((wild & 0x7C00) == 0x7C00, wild & 0x83FF, wild).astype(np.uint16)
        h = np.where(np.arange(n_blocks) % 2 == 0, sane, wild).astype(np.uint16)
        raw[:, off] = (h & 0xFF).astype(np.uint8)
        raw[:, off + 1] = (h >> 8).astype(np.uint8)
    if qtype in QUANTIZABLE:
        x = rng.standard_normal((n_blocks, bsize)).astype(np.float32)
        x[::3] *= 10.0
        raw = np.concatenate([raw, quants.quantize(x, qtype).reshape(n_blocks, tsize)])
    return raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)

    for qtype in SCALES:
        raw = random_blocks(rng, qtype, a.blocks)
        bsize = quants.GGML_QUANT_SIZES[qtype][0]
        ref = quants.dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
        assert ref.size == raw.shape[0] * bsize
        write(out / f"{qtype.name}.qvec", int(qtype), ref.size, raw.tobytes(), ref.tobytes())

    allh = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    for qtype in (T.F16, T.BF16):
        ref = quants.dequantize(allh.view(np.uint8), qtype).astype(np.float32).reshape(-1)
        write(out / f"{qtype.name}.qvec", int(qtype), ref.size, allh.tobytes(), ref.tobytes())
    f32 = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    ref = quants.dequantize(f32.view(np.uint8), T.F32).astype(np.float32).reshape(-1)
    write(out / "F32.qvec", int(T.F32), ref.size, f32.tobytes(), ref.tobytes())

    # float32 -> fp16 rounding: random bit patterns, values near the fp16 range, exact ties
    parts = [
        rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        (rng.standard_normal(20000) * np.exp2(rng.integers(-30, 17, size=20000))).astype(np.float32),
        ((np.arange(4096, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0**-24)),
        (np.float32(1.0) + np.arange(4096, dtype=np.float32) * np.float32(2.0**-11)),
        np.array([65504, 65519, 65520, 1e9, -1e9, 0.0, -0.0, np.inf, -np.inf], dtype=np.float32),
    ]
    xs = np.concatenate(parts).astype(np.float32)
    with np.errstate(all="ignore"):
        hs = xs.astype(np.float16).view(np.uint16)
    pad = b"\0\0" if hs.size % 2 else b""
    write(out / "F16ENC.qvec", 0xFFFFFFFF, xs.size, xs.tobytes(), hs.tobytes() + pad)


if __name__ == "__main__":
    main()
