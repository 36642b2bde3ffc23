"""Logits of one prompt on cpu and cuda, and on cuda with each listed backend switch: NMSE
against the CPU and argmax agreement per position (krserve eval-logits --all).

usage: logits_check.py KRSERVE MODEL [N_TOKENS] [VAR=VALUE ...]
The prompt is N_TOKENS (default 200) pseudo-random ids; a prompt step of that many tokens takes
the tiled attention on cuda, KRS_CUDA_ATTN_TILE=0 the per-(token, head) kernel."""
import os
import subprocess
import sys
import tempfile

import numpy as np


def logits(krs, model, toks, dev, env=None):
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        e = dict(os.environ, **(env or {}))
        r = subprocess.run([krs, "eval-logits", "-m", model, "--tokens", toks, "--all", "--out",
                            f.name, "--device", dev], capture_output=True, text=True, env=e)
        if r.returncode:
            sys.exit(f"eval-logits {dev} {env}: {r.stderr.strip()[-400:]}")
        return np.fromfile(f.name, dtype=np.float32).astype(np.float64)


def main():
    krs, model = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    rng = np.random.default_rng(7)
    toks = ",".join(str(t) for t in [2] + list(rng.integers(100, 20000, n - 1)))
    ref = logits(krs, model, toks, "cpu").reshape(n, -1)
    runs = [("cuda", {})] + [("cuda " + a, dict([a.split("=", 1)])) for a in sys.argv[4:]]
    worst = 0.0
    for name, env in runs:
        y = logits(krs, model, toks, "cuda", env).reshape(n, -1)
        e = ((y - ref) ** 2).sum() / (ref ** 2).sum()
        agree = (y.argmax(1) == ref.argmax(1)).mean()
        print(f"{os.path.basename(model)} {n} tokens, {name}: nmse vs cpu {e:.2e}, "
              f"argmax agreement {agree:.3f}, finite {np.isfinite(y).all()}")
        worst = max(worst, e)
    return 0 if np.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
