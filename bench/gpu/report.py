#!/usr/bin/env python3
"""Turns the raw outputs of bench/gpu/gpu_bench.sh (one or more folders, later ones win on the
same file name) into results.json, README.md (tables with ratios and roofline fractions) and,
where matplotlib is installed, plot.png.

Usage: report.py RAW_DIR [RAW_DIR ...] OUT_DIR"""
import json
import pathlib
import re
import sys

MODELS = {"default": "Gemma 3 270M Q4_K_M shape (the default model's stand-in)",
          "llama1b": "Llama-3.2-1B shape, F16"}


def load_json(dirs, name):
    for d in reversed(dirs):
        p = d / name
        if p.exists():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:
                return None
    return None


def read_text(dirs, name):
    for d in reversed(dirs):
        p = d / name
        if p.exists():
            return p.read_text()
    return None


def batched_s_tg(text):
    """llama-batched-bench's markdown rows -> {B: S_TG tok/s}."""
    out = {}
    for line in (text or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0] or "x"):
            out[cells[2]] = float(cells[7])
    return out


def llama_bench(entries):
    """llama-bench -o json -> {"pp512": (avg, sd), "tg128": (avg, sd)}."""
    out = {}
    for e in entries or []:
        key = f"pp{e['n_prompt']}" if e.get("n_gen", 0) == 0 else f"tg{e['n_gen']}"
        out[key] = (e["avg_ts"], e.get("stddev_ts", 0.0))
    return out


def collect(dirs):
    res = {"machine": load_json(dirs, "machine.json"), "models": {}}
    for m in MODELS:
        kr = load_json(dirs, f"kr_{m}.json")
        res["models"][m] = {
            "description": MODELS[m], "krserve": kr,
            "llama_bench": llama_bench(load_json(dirs, f"llama_bench_{m}.json")),
            "llama_batched_s_tg": batched_s_tg(read_text(dirs, f"llama_batched_{m}.txt"))}
    res["transformers"] = load_json(dirs, "hf_llama1b.json")
    res["serve"] = load_json(dirs, "serve_compare.json")
    return res


def fmt(x, nd=0):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


def markdown(res):
    L = ["# GPU speed: kr-serve vs llama.cpp (and transformers), one run", ""]
    m = res.get("machine") or {}
    if m:
        L += [f"Machine: {m.get('gpu', '?')}; host CPU {m.get('cpu', '?')} ({m.get('cores', '?')} "
              f"cores); device-to-device copy bandwidth measured in the run: "
              f"{fmt(m.get('copy_bandwidth_gbs'))} GB/s (read + write), the rooflines' "
              "denominator. Models: stand-ins with the real files' shapes and types and random "
              "weights (`scripts/synth_model.py`); both engines load the same file.", ""]
    for name, mr in res["models"].items():
        kr = mr["krserve"] or {}
        s_tg = mr["llama_batched_s_tg"]
        lb = mr["llama_bench"]
        L += [f"## {mr['description']}", ""]
        if kr:
            L += [f"Weights read per token: {kr['weight_bytes_per_token'] / 1e6:,.0f} MB; "
                  f"batch-1 roofline {kr['roofline_tps']:,.0f} tok/s.", ""]
        L += ["| sequences | kr-serve decode tok/s | llama.cpp S_TG tok/s | ratio |",
              "|---|---|---|---|"]
        for b, v in (kr.get("decode") or {}).items():
            L.append(f"| {b} | {fmt(v)} | {fmt(s_tg.get(b))} | {ratio(v, s_tg.get(b))} |")
        if "tg128" in lb:
            L.append(f"| 1 (llama-bench tg128) | {fmt((kr.get('decode') or {}).get('1'))} | "
                     f"{fmt(lb['tg128'][0])} ± {fmt(lb['tg128'][1])} | "
                     f"{ratio((kr.get('decode') or {}).get('1'), lb['tg128'][0])} |")
        if kr:
            L += ["", f"Batch-1 decode: {100 * kr['batch1_roofline_fraction']:.0f} % of the "
                  "roofline."]
        if kr and "pp512" in lb:
            L += [f"Prefill of a 512-token prompt in one step: kr-serve "
                  f"{fmt(kr['prefill_tps'])} tok/s, llama-bench pp512 {fmt(lb['pp512'][0])} ± "
                  f"{fmt(lb['pp512'][1])} tok/s: {ratio(kr['prefill_tps'], lb['pp512'][0])}."]
        L.append("")
    hf = res.get("transformers")
    kr1b = (res["models"].get("llama1b") or {}).get("krserve") or {}
    if hf:
        L += ["## Hugging Face transformers generate(), Llama-3.2-1B shape, float16", "",
              f"transformers {hf['transformers']}, torch {hf['torch']}, greedy, "
              f"{hf['prompt_tokens']}-token prompts, {hf['new_tokens']} new tokens."
              + (f" {hf['note']}" if hf.get("note") else ""), "",
              "| batch | transformers tok/s | kr-serve decode tok/s | ratio |", "|---|---|---|---|"]
        for b, v in hf["tok_s"].items():
            k = (kr1b.get("decode") or {}).get(b)
            L.append(f"| {b} | {fmt(v)} | {fmt(k)} | {ratio(k, v)} |")
        L.append("")
    sv = res.get("serve")
    if sv and sv.get("krserve"):
        L += ["## Serving: `krserve serve --device cuda` vs `llama-server -ngl 999`, default "
              "model's stand-in", "",
              "bench/serve/peer_compare.py: N clients in a closed loop, 2 streamed chat "
              "completions of 128 tokens each (ignore_eos, temperature 0).", "",
              "| clients | kr-serve tok/s | llama-server tok/s | ratio | TTFT p95 ms (kr / llama) "
              "| inter-token p99 ms (kr / llama) |", "|---|---|---|---|---|---|"]
        ls = sv.get("llama-server") or [None] * len(sv["krserve"])
        for k, l_ in zip(sv["krserve"], ls):
            lt = l_["output_tok_s"] if l_ else None
            L.append(f"| {k['clients']} | {fmt(k['output_tok_s'])} | {fmt(lt)} | "
                     f"{ratio(k['output_tok_s'], lt)} | {fmt(k['ttft_ms']['p95'], 1)} / "
                     f"{fmt(l_['ttft_ms']['p95'], 1) if l_ else 'n/a'} | "
                     f"{fmt(k['itl_ms']['p99'], 2)} / "
                     f"{fmt(l_['itl_ms']['p99'], 2) if l_ else 'n/a'} |")
        L.append("")
    return "\n".join(L)


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (name, mr) in zip(axes[:2], res["models"].items()):
        kr = (mr["krserve"] or {}).get("decode") or {}
        s = mr["llama_batched_s_tg"]
        if kr:
            ax.plot([int(b) for b in kr], list(kr.values()), "o-", label="kr-serve")
        if s:
            ax.plot([int(b) for b in s], list(s.values()), "s--", label="llama.cpp")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sequences")
        ax.set_ylabel("decode tok/s (aggregate)")
        ax.set_title(mr["description"], fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    sv = res.get("serve") or {}
    ax = axes[2]
    for key, style in (("krserve", "o-"), ("llama-server", "s--")):
        rows = sv.get(key) or []
        if rows:
            ax.plot([r["clients"] for r in rows], [r["output_tok_s"] for r in rows], style,
                    label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients")
    ax.set_ylabel("served output tok/s")
    ax.set_title("serving, default model's stand-in", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    dirs = [pathlib.Path(d) for d in sys.argv[1:-1]]
    out = pathlib.Path(sys.argv[-1])
    out.mkdir(parents=True, exist_ok=True)
    res = collect(dirs)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    if plot(res, out / "plot.png"):
        md += "\n![decode and serving throughput](plot.png)\n"
    (out / "README.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
