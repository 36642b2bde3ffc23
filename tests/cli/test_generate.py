"""`krserve generate` end to end on the default model: greedy text, seeded sampling, batch files,
the chat template, and the errors of the command line (exit status and message)."""
import subprocess

import pytest


def generate(krserve, *args, check=True):
    r = subprocess.run([str(krserve), "generate", *args], capture_output=True, text=True,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_greedy_is_deterministic_and_reports(krserve, default_model):
    args = ("-m", str(default_model), "-p", "The capital of France is", "-n", "6",
            "--temperature", "0")
    a, b = generate(krserve, *args), generate(krserve, *args)
    assert a.stdout.startswith("The capital of France is")
    assert len(a.stdout) > len("The capital of France is")
    assert a.stdout == b.stdout
    assert "[max tokens]" in a.stderr and "generated 6 tokens" in a.stderr


def test_seeded_sampling_repeats_and_seeds_differ(krserve, default_model):
    def run(seed):
        return generate(krserve, "-m", str(default_model), "-p", "Once upon a time", "-n", "12",
                        "--temperature", "1.2", "--top-k", "50", "--top-p", "0.95", "--min-p",
                        "0.01", "--repeat-penalty", "1.1", "--seed", str(seed),
                        "--ignore-eos").stdout
    outs = {seed: run(seed) for seed in (1, 2, 3)}
    assert run(1) == outs[1]
    assert len(set(outs.values())) > 1  # three seeds, not all the same text


def test_batch_file_one_line_per_prompt(krserve, default_model, tmp_path):
    prompts = ["The capital of France is", "One plus one is", "Water is made of"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    r = generate(krserve, "-m", str(default_model), "--batch", str(f), "-n", "4",
                 "--temperature", "0")
    lines = r.stdout.splitlines()
    assert len(lines) == len(prompts) and all(lines)
    assert f"{len(prompts)} prompts" in r.stderr
    # each line is what the prompt alone gives (batching does not change greedy text)
    alone = generate(krserve, "-m", str(default_model), "-p", prompts[1], "-n", "4",
                     "--temperature", "0").stdout
    assert alone.rstrip("\n") == prompts[1] + lines[1]


def test_chat_template_and_system(krserve, default_model):
    r = generate(krserve, "-m", str(default_model), "-p", "Say hi.", "--chat", "--system",
                 "You are terse.", "-n", "4", "--temperature", "0", "--threads", "1")
    assert r.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (("-m", "/nonexistent.gguf", "-p", "x"), "model not found"),
    (("-p", "x", "--temperature", "-1"), "'temperature' must be between 0 and 2"),
    (("-p", "x", "-n", "zero"), "-n must be an integer > 0"),
    (("-p", "x", "--priority", "asap"), "--priority must be urgent"),
    (("-p", "x", "-n", "100000"), "exceeds the context length"),
    (("-p", "x", "--device", "tpu"), "tpu"),
    (("--batch", "/nonexistent/prompts.txt"), "nonexistent"),
    ((), "give exactly one of -p"),
])
def test_errors_exit_nonzero_with_a_message(krserve, default_model, args, message):
    full = list(args)
    if "-m" not in full:
        full = ["-m", str(default_model)] + full
    r = generate(krserve, *full, check=False)
    assert r.returncode != 0
    assert message in (r.stderr + r.stdout).lower()


def test_help(krserve):
    r = generate(krserve, "--help", check=False)
    assert r.returncode == 0 and "usage: krserve generate" in r.stdout + r.stderr
