#!/usr/bin/env python3
"""A stand-in for a GGUF model where the real file cannot go: the same bytes up to the tensor
data (metadata, tokenizer, tensor table), then random weights of the same types and shapes with
sane block scales. Throughput depends on the shapes and types, not on the values, so benchmarks
on the stand-in measure what they would on the model (the outputs are of course gibberish).

Used to run bench/ on the lent GPU host's 16-core CPU, whose working tree is limited to 64 MiB:

  synth_model.py skeleton SRC.gguf DIR    # here: DIR/header.bin (a few MB) + DIR/tensors.json
  synth_model.py llama1b DIR              # here: the same for a Llama-3.2-1B-shaped F16 model
                                          # (no source file: metadata and a synthetic 128,256-
                                          # token SentencePiece-style vocabulary are written)
  synth_model.py expand DIR OUT.gguf      # there: numpy only; writes the full-size file

Block layouts (offsets of the fp16 scale fields) follow ggml's block_* structs.
"""
import json
import pathlib
import sys

import numpy as np

# type id -> (block elements, block bytes, [(offset of an fp16 scale, value)]); F32 = 0.
BLOCKS = {
    8: (32, 34, [(0, 5e-4)]),                # Q8_0: d
    6: (32, 22, [(0, 5e-3)]),                # Q5_0: d
    7: (32, 24, [(0, 5e-3), (2, -4e-2)]),    # Q5_1: d, m
    2: (32, 18, [(0, 5e-3)]),                # Q4_0: d
    3: (32, 20, [(0, 5e-3), (2, -4e-2)]),    # Q4_1: d, m
    12: (256, 144, [(0, 2e-4), (2, 2e-4)]),  # Q4_K: d, dmin
    13: (256, 176, [(0, 1e-4), (2, 1e-4)]),  # Q5_K: d, dmin
    14: (256, 210, [(208, 2e-5)]),           # Q6_K: d (last field)
}


def skeleton(src, out_dir):
    from gguf import GGUFReader  # only needed here, where the project venv has it
    r = GGUFReader(src)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = min(int(t.data_offset) for t in r.tensors)
    with open(src, "rb") as f:
        (out / "header.bin").write_bytes(f.read(start))
    table = [{"name": t.name, "type": int(t.tensor_type), "offset": int(t.data_offset),
              "bytes": int(t.n_bytes), "elements": int(t.n_elements)} for t in r.tensors]
    (out / "tensors.json").write_text(json.dumps({"data_start": start, "tensors": table}))
    print(f"{out}/header.bin: {start} bytes; {len(table)} tensors, "
          f"{sum(t['bytes'] for t in table) / 1e6:.1f} MB of weights to synthesise")


# Llama-3.2-1B's published shape (config.json of meta-llama/Llama-3.2-1B): tied embeddings.
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "vocab_size": 128256}


def synthetic_vocab(n):
    """Controls, 256 byte-fallback tokens, "\u2581" and letters, then "\u2581" + base-26
    letter strings until n tokens (scores decrease with the id, as SentencePiece's)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    i = 0
    while len(tokens) + len(pieces) < n:
        word, k = "", i
        while True:
            word = chr(ord("a") + k % 26) + word
            k = k // 26 - 1
            if k < 0:
                break
        pieces.append("\u2581" + word)
        i += 1
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 260 + [-float(j) for j in range(len(pieces))]
    return dict(tokens=tokens, scores=scores, types=types, bos=2, eos=1, unk=3, pad=0)


def llama1b_skeleton(out_dir, cfg=LLAMA_1B):
    """header.bin + tensors.json of an F16 GGUF with cfg's shapes (norms F32), written with the
    gguf package's writer and the metadata of scripts/convert_hf_to_gguf.py."""
    import gguf
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import convert_hf_to_gguf as conv

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = [("token_embd.weight", (cfg["vocab_size"], d), 1)]
    for i in range(L):
        b = f"blk.{i}."
        shapes += [(b + "attn_norm.weight", (d,), 0), (b + "attn_q.weight", (nh * hd, d), 1),
                   (b + "attn_k.weight", (nkv * hd, d), 1), (b + "attn_v.weight", (nkv * hd, d), 1),
                   (b + "attn_output.weight", (d, nh * hd), 1), (b + "ffn_norm.weight", (d,), 0),
                   (b + "ffn_gate.weight", (f, d), 1), (b + "ffn_up.weight", (f, d), 1),
                   (b + "ffn_down.weight", (d, f), 1)]
    shapes.append(("output_norm.weight", (d,), 0))
    tmp = out / "header.tmp"
    w = gguf.GGUFWriter(str(tmp), "llama")
    conv.write_metadata(w, "llama", cfg, synthetic_vocab(cfg["vocab_size"]), "F16")
    table, offset = [], 0
    align = w.data_alignment
    for name, shape, ty in shapes:
        n = int(np.prod(shape))
        nbytes = n * (2 if ty == 1 else 4)
        dtype = np.float16 if ty == 1 else np.float32
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType.F16 if ty == 1 else None)
        table.append({"name": name, "type": ty, "offset": offset, "bytes": nbytes,
                      "elements": n})
        offset += (nbytes + align - 1) // align * align
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    head = tmp.read_bytes()
    tmp.unlink()
    start = (len(head) + align - 1) // align * align
    (out / "header.bin").write_bytes(head + b"\0" * (start - len(head)))
    for t in table:
        t["offset"] += start
    (out / "tensors.json").write_text(json.dumps({"data_start": start, "tensors": table}))
    print(f"{out}/header.bin: {start} bytes; {len(table)} tensors, "
          f"{sum(t['bytes'] for t in table) / 1e9:.2f} GB of weights to synthesise")


def expand(in_dir, dst, seed=1):
    d = pathlib.Path(in_dir)
    meta = json.loads((d / "tensors.json").read_text())
    rng = np.random.default_rng(seed)
    with open(dst, "wb") as f:
        f.write((d / "header.bin").read_bytes())
        for t in sorted(meta["tensors"], key=lambda t: t["offset"]):
            f.seek(t["offset"])
            if t["type"] == 0:  # F32 (norms, biases): small values around 0
                data = (rng.standard_normal(t["elements"]) * 0.02).astype("<f4").tobytes()
            elif t["type"] == 1:  # F16 weights: ~N(0, 0.02), in chunks to bound memory
                left = t["elements"]
                while left:
                    n = min(left, 1 << 26)
                    f.write((rng.standard_normal(n, dtype=np.float32) * 0.02).astype("<f2")
                            .tobytes())
                    left -= n
                continue
            elif t["type"] in BLOCKS:
                qk, size, scales = BLOCKS[t["type"]]
                n_blocks = t["elements"] // qk
                blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
                for off, value in scales:
                    blocks[:, off:off + 2] = np.frombuffer(
                        np.array([value], dtype="<f2").tobytes(), dtype=np.uint8)
                data = blocks.tobytes()
            else:
                sys.exit(f"{t['name']}: tensor type {t['type']} not supported by synth_model.py")
            assert len(data) == t["bytes"], t["name"]
            f.write(data)
    print(f"{dst}: {pathlib.Path(dst).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "skeleton":
        skeleton(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "llama1b":
        llama1b_skeleton(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "expand":
        expand(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
