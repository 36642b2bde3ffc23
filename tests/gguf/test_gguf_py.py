"""`krserve inspect --json` against the gguf PyPI package (an independent implementation).

Files written by gguf.GGUFWriter (every value type, string arrays, tensors of several ggml
types, custom alignment, v2 by patching the version field) must read back exactly as
gguf.GGUFReader reads them: every key's type and value, every tensor's name, type, shape, byte
size and absolute data offset. The default model must report gemma3's shape and every tensor
type as GGUFReader does. Missing or malformed files: exit 1 and one line on stderr."""
import json
import math
import os
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

TYPE_NAMES = {
    V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32",
    V.INT32: "i32", V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "string", V.ARRAY: "array",
    V.UINT64: "u64", V.INT64: "i64", V.FLOAT64: "f64",
}


def inspect_json(krserve, path, env=None):
    r = subprocess.run([str(krserve), "inspect", "--json", str(path)], capture_output=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return json.loads(r.stdout.decode("utf-8"))


def write_test_file(path, alignment=None):
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(str(path), arch="testarch")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_key_value("t.u8", 250, V.UINT8)
    w.add_key_value("t.i8", -100, V.INT8)
    w.add_key_value("t.u16", 60000, V.UINT16)
    w.add_key_value("t.i16", -32000, V.INT16)
    w.add_key_value("t.u32", 4_000_000_000, V.UINT32)
    w.add_key_value("t.i32", -2_000_000_000, V.INT32)
    w.add_key_value("t.f32", 1e-6, V.FLOAT32)
    w.add_key_value("t.bool_t", True, V.BOOL)
    w.add_key_value("t.bool_f", False, V.BOOL)
    w.add_key_value("t.str", "héllo \"wörld\"\n\ttab", V.STRING)
    w.add_key_value("t.empty", "", V.STRING)
    w.add_key_value("t.u64", 2**64 - 3, V.UINT64)
    w.add_key_value("t.i64", -(2**62) - 7, V.INT64)
    w.add_key_value("t.f64", -1.2345678901234567e-300, V.FLOAT64)
    w.add_key_value("testarch.block_count", 3, V.UINT32)
    w.add_key_value("testarch.rope.freq_base", 10000.0, V.FLOAT32)
    w.add_array("a.str", ["alpha", "", "γάμμα", "a b", "<0x0A>"])
    w.add_key_value("a.i32", [-1, 0, 1, 2**31 - 1], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("a.u8", [0, 1, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("a.i16", [-5, 5], V.ARRAY, sub_type=V.INT16)
    w.add_key_value("a.f32", [0.5, -1.25, 3.0e38], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("a.f64", [math.pi, -0.0], V.ARRAY, sub_type=V.FLOAT64)
    w.add_key_value("a.bool", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("a.u64", [2**63 + 1], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("a.i64", [-(2**63)], V.ARRAY, sub_type=V.INT64)
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "<eos>", "<bos>", "hi", " there"])
    w.add_key_value("tokenizer.ggml.model", "llama", V.STRING)
    w.add_key_value("tokenizer.ggml.bos_token_id", 2, V.UINT32)
    w.add_key_value("tokenizer.ggml.eos_token_id", 1, V.UINT32)
    w.add_key_value("tokenizer.ggml.add_bos_token", True, V.BOOL)

    w.add_tensor("f32.mat", rng.standard_normal((3, 5), dtype=np.float32))
    w.add_tensor("f16.vec", rng.standard_normal(7).astype(np.float16))
    w.add_tensor("i8.vec", np.arange(-3, 4, dtype=np.int8))
    w.add_tensor("i32.mat", np.arange(12, dtype=np.int32).reshape(3, 4))
    w.add_tensor("f64.vec", np.linspace(0, 1, 3))
    x = rng.standard_normal((4, 256), dtype=np.float32)
    for qt in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q4_1, Q.BF16):
        q = gguf.quants.quantize(x, qt)
        w.add_tensor(f"{qt.name.lower()}.mat", q, raw_dtype=qt)
    # k-quants (no Python quantizer): random blocks, 2 rows x 2 super-blocks
    for qt in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        nb = gguf.GGML_QUANT_SIZES[qt][1]
        w.add_tensor(f"{qt.name.lower()}.mat", rng.integers(0, 255, (2, 2 * nb), dtype=np.uint8),
                     raw_dtype=qt)
    # 3-D and 4-D quantized tensors: raw bytes, shapes given in numpy order
    w.add_tensor("q8_0.3d", rng.integers(0, 255, (2, 3, 68), dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.add_tensor("f32.4d", np.ones((2, 1, 3, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def value_of(field):
    """Python value of a GGUFReader field, as the JSON output should carry it."""
    t = field.types[0]
    if t == V.ARRAY:
        sub = field.types[1] if len(field.types) > 1 else None
        if sub == V.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if t == V.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def same(a, b, t):
    if t in ("f32", "f64"):
        if t == "f32":
            return np.float32(a) == np.float32(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if t == "bool":
        return bool(a) == bool(b)
    return a == b and type(a) is type(b)


def compare_with_reader(js, path):
    rd = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in rd.fields.items() if not k.startswith("GGUF.")}
    meta = {m["key"]: m for m in js["metadata"]}
    assert list(meta) == list(fields)  # same keys, same order
    for key, f in fields.items():
        m = meta[key]
        assert m["type"] == TYPE_NAMES[f.types[0]], key
        if m["type"] == "array":
            sub = TYPE_NAMES[f.types[1]] if len(f.types) > 1 else "i32"
            if len(f.types) > 1:
                assert m["elem"] == sub, key
            assert m["count"] == len(f.data), key
            if len(f.data) <= 1024:
                want = value_of(f)
                assert len(m["value"]) == len(want), key
                for a, b in zip(m["value"], want):
                    assert same(a, b, sub), (key, a, b)
        else:
            want = value_of(f)
            assert same(m["value"], want, m["type"]), (key, m["value"], want)
    assert len(js["tensors"]) == len(rd.tensors)
    for jt, rt in zip(js["tensors"], rd.tensors):
        assert jt["name"] == rt.name
        assert jt["type"] == rt.tensor_type.name, rt.name
        assert jt["type_id"] == int(rt.tensor_type)
        assert jt["shape"] == [int(n) for n in rt.shape], rt.name
        assert jt["nbytes"] == int(rt.n_bytes), rt.name
        assert js["data_offset"] + jt["offset"] == int(rt.data_offset), rt.name
    assert js["totals"]["tensors"] == len(rd.tensors)
    assert js["totals"]["bytes"] == sum(int(t.n_bytes) for t in rd.tensors)
    assert js["totals"]["params"] == sum(int(t.n_elements) for t in rd.tensors)
    return rd


@pytest.mark.parametrize("alignment", [None, 8, 64, 256])
def test_writer_files_roundtrip(krserve, cache_dir, alignment):
    path = cache_dir / f"gguf_py_{alignment}.gguf"
    write_test_file(path, alignment)
    js = inspect_json(krserve, path)
    assert js["version"] == 3
    assert js["alignment"] == (alignment or 32)
    assert js["size"] == path.stat().st_size
    assert js["architecture"] == "testarch"
    assert js["hparams"] == {"block_count": 3, "rope.freq_base": 10000}
    tok = js["tokenizer"]
    assert tok["model"] == "llama" and tok["vocab_size"] == 5
    assert tok["bos_id"] == 2 and tok["bos_token"] == "<bos>"
    assert tok["eos_id"] == 1 and tok["eos_token"] == "<eos>"
    assert tok["add_bos"] is True and tok["chat_template"] is False
    compare_with_reader(js, path)


def test_v2_file(krserve, cache_dir):
    """v2 has the v3 layout: patch the version field of a writer file."""
    path3 = cache_dir / "gguf_py_v3.gguf"
    write_test_file(path3)
    data = bytearray(path3.read_bytes())
    assert data[4:8] == (3).to_bytes(4, "little")
    data[4:8] = (2).to_bytes(4, "little")
    path2 = cache_dir / "gguf_py_v2.gguf"
    path2.write_bytes(bytes(data))
    js = inspect_json(krserve, path2)
    assert js["version"] == 2
    compare_with_reader(js, path2)


def test_text_output_summarises_long_arrays(krserve, cache_dir):
    path = cache_dir / "gguf_py_long.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(3000)])
    w.add_key_value("tokenizer.ggml.scores", [0.0] * 3000, V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("tokenizer.chat_template", "{{ messages }}", V.STRING)
    w.add_tensor("w", np.zeros((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = subprocess.run([str(krserve), "inspect", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[array of 3000 string]" in r.stdout
    assert "[array of 3000 f32]" in r.stdout
    assert "chat template present" in r.stdout
    assert "vocab 3000" in r.stdout
    js = inspect_json(krserve, path)
    toks = next(m for m in js["metadata"] if m["key"] == "tokenizer.ggml.tokens")
    assert toks["count"] == 3000 and "value" not in toks
    assert js["tokenizer"]["chat_template"] is True


def test_default_model(krserve, default_model):
    js = inspect_json(krserve, default_model)
    assert js["architecture"] == "gemma3"
    hp = js["hparams"]
    assert hp["block_count"] == 18
    assert hp["embedding_length"] == 640
    assert hp["attention.head_count"] == 4
    assert hp["attention.head_count_kv"] == 1
    assert hp["attention.key_length"] == 256
    assert hp["feed_forward_length"] == 2048
    tok = js["tokenizer"]
    assert tok["vocab_size"] == 262144
    assert tok["bos_id"] == 2 and tok["bos_token"] == "<bos>"
    assert tok["eos_id"] == 1 and tok["eos_token"] == "<eos>"
    assert tok["chat_template"] is False
    assert js["totals"]["tensors"] == 236
    rd = compare_with_reader(js, default_model)
    types = {t.tensor_type.name for t in rd.tensors}
    assert types == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    emb = next(t for t in js["tensors"] if t["name"] == "token_embd.weight")
    assert emb["type"] == "Q8_0" and emb["shape"] == [640, 262144]


def test_default_model_text(krserve, default_model):
    r = subprocess.run([str(krserve), "inspect", "-m", str(default_model)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "architecture  gemma3" in out
    assert "block_count" in out and "[array of 262144 string]" in out
    assert "token_embd.weight" in out and "Q8_0" in out
    assert "tensors 236," in out


def one_line_error(r):
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_and_bad_model(krserve, cache_dir):
    r = subprocess.run([str(krserve), "inspect", "/nonexistent/model.gguf"], capture_output=True,
                       text=True, timeout=30)
    assert "/nonexistent/model.gguf" in one_line_error(r)
    env = dict(os.environ, KRSERVE_MODEL="/nonexistent/env.gguf")
    r = subprocess.run([str(krserve), "inspect", "--json"], capture_output=True, text=True,
                       timeout=30, env=env)
    assert "/nonexistent/env.gguf" in one_line_error(r)
    bad = cache_dir / "gguf_bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    r = subprocess.run([str(krserve), "inspect", str(bad)], capture_output=True, text=True,
                       timeout=30)
    assert "count" in one_line_error(r)
    # truncated writer file: the tensor data is cut
    good = cache_dir / "gguf_py_trunc_src.gguf"
    write_test_file(good)
    cut = cache_dir / "gguf_trunc.gguf"
    cut.write_bytes(good.read_bytes()[:-10])
    r = subprocess.run([str(krserve), "inspect", "--json", str(cut)], capture_output=True,
                       text=True, timeout=30)
    assert "past end of file" in one_line_error(r)
    r = subprocess.run([str(krserve), "inspect", "--bogus"], capture_output=True, text=True,
                       timeout=30)
    one_line_error(r)
