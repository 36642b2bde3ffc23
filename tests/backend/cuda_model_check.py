#!/usr/bin/env python3
"""The CUDA backend against the CPU backend and the independent references, whole model.

For every tiny generated model (gemma3, llama, qwen2, gemma3 with a real 512 window; every
weight variant) this runs `krserve eval-logits --all` on the CPU and on the GPU and compares:
  - GPU logits vs the mlx-lm reference logits, with the bounds of tests/model's oracle
    (F32 1e-4, F16/BF16 1e-2, quantized 3e-2 normalised error);
  - GPU vs CPU logits (normalised error, reported);
  - greedy continuations of the F32 files: the same ids on both devices.
With --model FILE (a real model or a same-shape stand-in) it also compares the last-position
logits and a greedy continuation of that model on both devices.
Batch invariance on the GPU: `krserve generate --batch` of several prompts at once gives each
prompt the same greedy text as that prompt alone (the tiny gemma3 F32 and Q8_0 files, and the
--model file).

Needs numpy only, so it runs on the GPU machine as it is:
    python3 tests/backend/cuda_model_check.py --krserve build-cuda/krserve \
        --models tests/.cache/models/<hash> [--model models/standin.gguf]
Exit status 0 = all passed, 1 = a check failed, 77 = skipped (no CUDA build or no GPU; the
reason is printed). tests/backend/test_cuda_model.py runs it under pytest.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

BOUND = {"F32": 1e-4, "F16": 1e-2, "BF16": 1e-2}
QUANT_BOUND = 3e-2
SKIP = 77


def nerr(c, ref):
    return float(np.linalg.norm(c - ref) / np.linalg.norm(ref))


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def logits(krserve, model, tokens, n_vocab, device, all_positions=True):
    with tempfile.NamedTemporaryFile(suffix=".f32") as f:
        cmd = [krserve, "eval-logits", "-m", model, "--tokens", ",".join(map(str, tokens)),
               "--out", f.name, "--device", device] + (["--all"] if all_positions else [])
        rc, out, err = run(cmd)
        if rc:
            raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {rc}: {err.strip()[-500:]}")
        a = np.fromfile(f.name, dtype="<f4")
    return a.reshape(-1, n_vocab)


def greedy(krserve, model, tokens, n, device):
    cmd = [krserve, "eval-logits", "-m", model, "--tokens", ",".join(map(str, tokens)),
           "--greedy", n, "--device", device]
    rc, out, err = run(cmd)
    if rc:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {rc}: {err.strip()[-500:]}")
    return [int(x) for x in out.strip().splitlines()[-1].split(",")]


def cuda_skip_reason(krserve, model):
    """None when the GPU backend runs, else why not."""
    rc, out, err = run([krserve, "eval-logits", "-m", model, "--tokens", "1,2", "--device",
                        "cuda"])
    if rc == 0:
        return None
    return err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"


def check_tiny(krserve, models_dir, log):
    man = json.loads((models_dir / "manifest.json").read_text())
    failures = []
    for name, e in man["models"].items():
        for variant, fname in e["files"].items():
            path = models_dir / name / fname
            for s in e["sequences"]:
                toks = man["sequences"][s]
                ref_file = e["refs"].get(f"{variant}/{s}")
                if not ref_file:
                    continue
                ref = np.load(models_dir / name / ref_file)
                gpu = logits(krserve, path, toks, ref.shape[1], "cuda")
                cpu = logits(krserve, path, toks, ref.shape[1], "cpu")
                e_ref, e_cpu = nerr(gpu, ref), nerr(gpu, cpu)
                bound = BOUND.get(variant, QUANT_BOUND)
                ok = np.all(np.isfinite(gpu)) and e_ref <= bound
                log(f"{'ok  ' if ok else 'FAIL'} {name:14s} {variant:5s} {s}: cuda vs mlx-lm "
                    f"{e_ref:.2e} (bound {bound:.0e}), cuda vs cpu {e_cpu:.2e}, cpu vs mlx-lm "
                    f"{nerr(cpu, ref):.2e}")
                if not ok:
                    failures.append(f"{name} {variant} {s}")
        f32 = models_dir / name / e["files"]["F32"]
        prompt = man["sequences"][e["sequences"][0]][:10]
        g_gpu = greedy(krserve, f32, prompt, 12, "cuda")
        g_cpu = greedy(krserve, f32, prompt, 12, "cpu")
        same = g_gpu == g_cpu
        log(f"{'ok  ' if same else 'FAIL'} {name:14s} F32   greedy 12: cuda {g_gpu} cpu {g_cpu}")
        if not same:
            failures.append(f"{name} greedy")
    return failures


def check_model(krserve, model, log):
    toks = [2, 818, 5279, 529, 7001, 563, 1040, 3405, 529, 506, 1902, 236761]
    # n_vocab from the output size of a last-position run
    with tempfile.NamedTemporaryFile(suffix=".f32") as f:
        rc, _, err = run([krserve, "eval-logits", "-m", model, "--tokens", "1", "--out", f.name])
        if rc:
            raise RuntimeError(err)
        n_vocab = np.fromfile(f.name, dtype="<f4").size
    gpu = logits(krserve, model, toks, n_vocab, "cuda", all_positions=False)
    cpu = logits(krserve, model, toks, n_vocab, "cpu", all_positions=False)
    e = nerr(gpu, cpu)
    g_gpu = greedy(krserve, model, toks, 16, "cuda")
    g_cpu = greedy(krserve, model, toks, 16, "cpu")
    agree = sum(a == b for a, b in zip(g_gpu, g_cpu))
    # Quantized weights: the CPU quantizes activations to 8 bits, the GPU may not; 3e-2 is the
    # oracle's bound for quantized variants.
    ok = e <= QUANT_BOUND and g_gpu[0] == g_cpu[0]
    log(f"{'ok  ' if ok else 'FAIL'} {pathlib.Path(model).name}: last-position logits cuda vs "
        f"cpu nerr {e:.2e}; greedy 16 ids agree at {agree}/16 (first {g_gpu[0]} vs {g_cpu[0]})")
    return [] if ok else [str(model)]


PROMPTS = ["the quick brown fox", "hello world", "once upon a time there was",
           "a b c d e f g h i j k l m n o p", "1 2 3", "why is the sky blue?"]


def batch_invariance(krserve, model, device, log):
    """Each prompt's greedy continuation alone == the same prompt in a batch of all six."""
    def gen(prompts):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(prompts) + "\n")
        try:
            p = subprocess.run([str(krserve), "generate", "-m", str(model), "--batch", f.name,
                                "-n", "24", "--temperature", "0", "--ignore-eos", "--device",
                                device], capture_output=True, timeout=600)
        finally:
            pathlib.Path(f.name).unlink()
        if p.returncode:
            raise RuntimeError(f"generate --batch: {p.stderr.decode(errors='replace')[-300:]}")
        return p.stdout
    alone = b"".join(gen([q]) for q in PROMPTS)
    together = gen(PROMPTS)
    ok = alone == together
    log(f"{'ok  ' if ok else 'FAIL'} batch invariance {pathlib.Path(model).parent.name}/"
        f"{pathlib.Path(model).name} on {device}: {len(PROMPTS)} prompts alone vs together "
        f"{'identical' if ok else 'DIFFER'}")
    return [] if ok else [f"batch invariance {model}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--krserve", default="build/krserve")
    ap.add_argument("--models", help="a tiny-model cache folder (holds manifest.json)")
    ap.add_argument("--model", help="a real model or stand-in GGUF")
    a = ap.parse_args()
    probe = a.model
    if a.models:
        d = pathlib.Path(a.models)
        man = json.loads((d / "manifest.json").read_text())
        name, e = next(iter(man["models"].items()))
        probe = d / name / e["files"]["F32"]
    reason = cuda_skip_reason(a.krserve, probe)
    if reason:
        print(f"SKIP cuda model checks: {reason}")
        return SKIP
    failures = []
    if a.models:
        d = pathlib.Path(a.models)
        failures += check_tiny(a.krserve, d, print)
        for f in ("F32", "Q8_0"):
            failures += batch_invariance(a.krserve, d / "gemma3" / f"{f}.gguf", "cuda", print)
    if a.model:
        failures += check_model(a.krserve, a.model, print)
        failures += batch_invariance(a.krserve, a.model, "cuda", print)
    print(f"{'FAILED: ' + ', '.join(failures) if failures else 'all cuda model checks passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
