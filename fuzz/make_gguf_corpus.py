#!/usr/bin/env python3
"""Writes the seed corpus of fuzz/fuzz_gguf.c into fuzz/corpus/gguf/ (deterministic; every file
< 4 KB). Valid files come from the gguf package's GGUFWriter; invalid ones are valid files with
one defect (truncation, duplicate key, nested array, tensor past EOF, bad type id, ...).

Usage: .venv/bin/python fuzz/make_gguf_corpus.py [OUT_DIR]"""
import pathlib
import struct
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

OUT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else \
    pathlib.Path(__file__).resolve().parent / "corpus" / "gguf"


def writer_file(fill, alignment=None):
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "f.gguf"
        w = gguf.GGUFWriter(str(path), arch="gemma3")
        if alignment:
            w.add_custom_alignment(alignment)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def fill_minimal(w):
    w.add_block_count(1)


def fill_types(w):
    rng = np.random.default_rng(7)
    w.add_key_value("t.u8", 7, V.UINT8)
    w.add_key_value("t.i8", -7, V.INT8)
    w.add_key_value("t.u16", 700, V.UINT16)
    w.add_key_value("t.i16", -700, V.INT16)
    w.add_key_value("t.u32", 70000, V.UINT32)
    w.add_key_value("t.i32", -70000, V.INT32)
    w.add_key_value("t.f32", 0.5, V.FLOAT32)
    w.add_key_value("t.bool", True, V.BOOL)
    w.add_key_value("t.str", "text", V.STRING)
    w.add_key_value("t.u64", 2**40, V.UINT64)
    w.add_key_value("t.i64", -(2**40), V.INT64)
    w.add_key_value("t.f64", 0.25, V.FLOAT64)
    w.add_array("t.strs", ["a", "", "ccc"])
    w.add_key_value("t.i32s", [1, -2, 3], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("t.f32s", [1.0, 2.0], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("t.bools", [True, False], V.ARRAY, sub_type=V.BOOL)
    w.add_tensor("a.f32", rng.standard_normal((2, 3), dtype=np.float32))
    w.add_tensor("b.f16", np.ones(5, dtype=np.float16))
    w.add_tensor("c.q8_0", gguf.quants.quantize(rng.standard_normal((1, 64), dtype=np.float32),
                                                Q.Q8_0), raw_dtype=Q.Q8_0)


def fill_kquant(w):
    rng = np.random.default_rng(8)
    w.add_tensor("k.q4_k", rng.integers(0, 255, (1, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.add_tensor("k.q6_k", rng.integers(0, 255, (2, 210), dtype=np.uint8), raw_dtype=Q.Q6_K)
    w.add_tensor("k.q5_0", rng.integers(0, 255, (1, 22), dtype=np.uint8), raw_dtype=Q.Q5_0)


def fill_tokenizer(w):
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>", "\u2581hi", "<0x0A>"])
    w.add_token_scores([0.0, 0.0, 0.0, 0.0, -1.5, -2.0])
    w.add_token_types([3, 3, 3, 2, 1, 6])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def header(nt, nkv, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, nt, nkv)


def tensor_info(name, dims, ttype, off):
    return gguf_str(name) + struct.pack("<I", len(dims)) + \
        b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, off)


def pad32(b):
    return b + b"\0" * (-len(b) % 32)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    types = writer_file(fill_types)
    files = {
        "valid_minimal.gguf": writer_file(fill_minimal),
        "valid_types.gguf": types,
        "valid_kquant_align64.gguf": writer_file(fill_kquant, alignment=64),
        "valid_tokenizer.gguf": writer_file(fill_tokenizer),
        "valid_v2.gguf": types[:4] + struct.pack("<I", 2) + types[8:],
        "valid_empty.gguf": header(0, 0),
        "invalid_truncated.gguf": types[: len(types) // 2],
        "invalid_v1.gguf": types[:4] + struct.pack("<I", 1) + types[8:],
        "invalid_nested.gguf": header(0, 1) + gguf_str("k") +
        struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 0, 1) + b"\1",
        "invalid_dup_key.gguf": header(0, 2) + (gguf_str("a") + struct.pack("<II", 4, 1)) * 2,
        "invalid_past_eof.gguf": pad32(header(1, 0) + tensor_info("w", [64], 0, 0)) + b"\0" * 100,
        "invalid_type.gguf": pad32(header(1, 0) + tensor_info("w", [32], 77, 0)) + b"\0" * 128,
        "invalid_align.gguf": header(0, 1) + gguf_str("general.alignment") +
        struct.pack("<II", 4, 48),
        "invalid_huge_count.gguf": header(2**40, 2**40),
    }
    for name, data in files.items():
        assert len(data) < 4096, (name, len(data))
        (OUT / name).write_bytes(data)
    # the valid files must read back with the reference reader
    for name in files:
        if name.startswith("valid_") and name != "valid_v2.gguf":
            gguf.GGUFReader(str(OUT / name))
    print(f"wrote {len(files)} files to {OUT}")


if __name__ == "__main__":
    main()
