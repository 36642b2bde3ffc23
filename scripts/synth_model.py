#!/usr/bin/env python3
"""A stand-in for a GGUF model where the real file cannot go: the same bytes up to the tensor
data (metadata, tokenizer, tensor table), then random weights of the same types and shapes with
sane block scales. Throughput depends on the shapes and types, not on the values, so benchmarks
on the stand-in measure what they would on the model (the outputs are of course gibberish).

Used to run bench/ on the lent GPU host's 16-core CPU, whose working tree is limited to 64 MiB:

  synth_model.py skeleton SRC.gguf DIR    # here: DIR/header.bin (a few MB) + DIR/tensors.json
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
    elif len(sys.argv) == 4 and sys.argv[1] == "expand":
        expand(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
