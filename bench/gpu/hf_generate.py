#!/usr/bin/env python3
"""Hugging Face transformers generate() throughput on the GPU, the reference point of the GPU
speed issue: a LlamaForCausalLM of the Llama-3.2-1B shape (scripts/synth_model.py's LLAMA_1B),
random weights in float16, greedy decoding of --new tokens after a --prompt-token prompt, for
each batch size. Throughput depends on the shapes, not on the weights' values.

Output tok/s = batch * new tokens / the time of generate() after one warm-up call (prefill
included, as a user of generate() sees it; the prompt is short next to the generation).

Usage: hf_generate.py [--batches 1,64] [--prompt 64] [--new 64] [--json OUT]
Runs where torch with CUDA and transformers are installed (the GPU host has both)."""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from synth_model import LLAMA_1B  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LLAMA_1B
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                      intermediate_size=c["intermediate_size"],
                      num_hidden_layers=c["num_hidden_layers"],
                      num_attention_heads=c["num_attention_heads"],
                      num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                      rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    params = sum(p.numel() for p in model.parameters())
    res = {"engine": "transformers", "transformers": transformers.__version__,
           "torch": torch.__version__, "dtype": "float16", "params": params,
           "prompt_tokens": a.prompt, "new_tokens": a.new, "gpu": torch.cuda.get_device_name(0),
           "tok_s": {}}
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.randint(3, c["vocab_size"], (b, a.prompt), device="cuda")
        kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            model.generate(ids, **kw)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        new = (out.shape[1] - a.prompt) * b
        res["tok_s"][str(b)] = new / dt
        print(f"transformers generate batch {b}: {new / dt:.1f} tok/s ({new} tokens, {dt:.2f} s)",
              flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
