"""The C tokenizer against independent oracles, through `krserve tokenize`.

- Gemma 3 (SPM, the default model): Hugging Face `tokenizers`, built from the same GGUF with
  transformers' own GGUF converter (transformers.integrations.gguf.gguf_tokenizer_mapping), with
  the vocabulary read by gguf.GGUFReader (transformers' reader needs torch).
- Byte-level BPE (llama-bpe, qwen2, gpt-2 pre-tokenizers): a small BPE trained here with
  `tokenizers`, exported to a GGUF with gguf.GGUFWriter; the trained tokenizer is the oracle.
- SPM with add_space_prefix (Llama 2 style): a small sentencepiece BPE model with byte fallback
  trained here, exported to GGUF; sentencepiece itself is the oracle.
- Chat templates: rendered with transformers' render_jinja_template (the code behind
  apply_chat_template) from the reference Jinja templates below; C output must be byte-identical.
"""
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "a  b   c    d     e",
    "tabs\tand\t\tdouble\t\t\ttabs",
    "line one\nline two\n\nline four\n\n\n",
    "\n\nleading newlines",
    "windows\r\nline\r\nendings\r\n",
    "mixed \t \n \r\n whitespace \u00a0 nbsp \u3000 ideographic",
    "emoji: 🙂😀👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "CJK: 你好，世界！日本語のテキスト。한국어 텍스트",
    "accents: café naïve résumé Ångström façade Øresund",
    "combining: e\u0301 a\u0308 n\u0303",
    "Greek Αλφάβητο and Cyrillic Кириллица",
    "Arabic العربية and Hebrew עברית",
    "Devanagari हिन्दी and Thai ภาษาไทย",
    "digits 0 12 345 6789 1234567890 3.14159 1,000,000",
    "numbers like ١٢٣ and ⅣⅫ and ²³",
    "don't can't won't I'm you're we've they'll he'd IT'S I'LL",
    "code: def f(x):\n    return x ** 2  # square\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "<html><body><table><tr><td>cell</td></tr></table></body></html>",
    "<start_of_turn>user\nHi<end_of_turn>",
    "text with <start_of_turn> inside and <end_of_turn> too",
    "<bos>fake bos<eos> and <pad> <unk> <mask>",
    "<|im_start|>system<|im_end|> <|endoftext|> <|eot_id|>",
    "[INST] not a token [/INST] <<SYS>>",
    "<0x41> looks like a byte token",
    "▁ literal U+2581 ▁▁ twice",
    "punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^",
    "URL https://example.com/path?q=1&r=2#frag and email a.b@c.de",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "a",
    " ",
    "\n",
    "\t",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ﬁ ligature ﬀ and full-width ＡＢＣ１２３",
    "zero\u200bwidth\u200cjoiners\u200d",
    "soft\u00adhyphen and\u2028line sep\u2029para sep",
    "control chars \x01\x02\x1b[0m\x7f",
]

# Text with a literal U+2581: llama.cpp (and so this tokenizer) keeps it apart from the spaces it
# escapes to U+2581 (Gemma stores whitespace-run tokens as real spaces, reachable only from real
# spaces), while HF/sentencepiece cannot tell them apart; decode also maps it back to ' '. Known,
# documented difference: excluded from the HF comparisons and the round trip.
LITERAL_2581 = {t for t in CORPUS if "\u2581" in t}

# ---------------------------------------------------------------------------------------------
# helpers


def run_batch(krserve, model, texts, *flags):
    """Tokenizes every text (bytes or str) in one krserve process; returns the JSON records."""
    data = "".join(
        (t.encode() if isinstance(t, str) else t).hex() + "\n" for t in texts
    ).encode()
    out = subprocess.run(
        [str(krserve), "tokenize", "-m", str(model), "--batch", *flags],
        input=data,
        capture_output=True,
        check=True,
        timeout=300,
    )
    recs = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(recs) == len(texts)
    return recs


def render_c(krserve, model, messages, gen, template=None, expect_rc=0, tmp=None):
    path = tmp / "chat.json"
    path.write_text(json.dumps({"messages": messages, "add_generation_prompt": gen}))
    cmd = [str(krserve), "tokenize", "-m", str(model), "--chat", str(path), "--render"]
    if template:
        cmd += ["--template", template]
    out = subprocess.run(cmd, capture_output=True, timeout=60)
    assert out.returncode == expect_rc, out.stderr.decode()
    return out.stdout.decode()


# ---------------------------------------------------------------------------------------------
# Gemma 3 (default model) against Hugging Face


def gguf_tokenizer_dict(path):
    r = gguf.GGUFReader(str(path))
    f = r.fields

    def get(key, default=None):
        return f[key].contents() if key in f else default

    d = {
        "tokenizer_type": get("tokenizer.ggml.model"),
        "pre_tokenizer_type": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_type": get("tokenizer.ggml.token_type"),
    }
    for key, name in [
        ("scores", "scores"),
        ("merges", "merges"),
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("unknown_token_id", "unk_token_id"),
        ("padding_token_id", "pad_token_id"),
        ("add_space_prefix", "add_prefix_space"),
    ]:
        v = get("tokenizer.ggml." + key)
        if v is not None:
            d[name] = v
    arch = get("general.architecture")
    return arch, d


@pytest.fixture(scope="session")
def hf_gemma(default_model, cache_dir):
    """HF tokenizer built from the default GGUF by transformers' GGUF converter (cached)."""
    st = default_model.stat()
    cache = cache_dir / f"hf_tok_{st.st_size}_{int(st.st_mtime)}.json"
    if not cache.exists():
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

        arch, d = gguf_tokenizer_dict(default_model)
        tok, _ = convert_gguf_tokenizer(arch, d)
        tok.save(str(cache))
    return tokenizers.Tokenizer.from_file(str(cache))


def hf_ids(tok, text, parse_special, add_special=False):
    tok.encode_special_tokens = not parse_special
    return tok.encode(text, add_special_tokens=add_special).ids


def test_gemma_ids_match_hf(krserve, default_model, hf_gemma):
    recs = run_batch(krserve, default_model, CORPUS, "--no-special")
    bad = []
    for text, rec in zip(CORPUS, recs):
        if text in LITERAL_2581:
            continue
        want = hf_ids(hf_gemma, text, parse_special=False)
        if rec["ids"] != want:
            bad.append((text, rec["ids"], want))
    assert not bad, "\n".join(f"{t!r}:\n  C  {c}\n  HF {h}" for t, c, h in bad[:5])


def test_gemma_parse_special_matches_hf(krserve, default_model, hf_gemma):
    recs = run_batch(krserve, default_model, CORPUS, "--no-special", "--parse-special")
    for text, rec in zip(CORPUS, recs):
        if text not in LITERAL_2581:
            assert rec["ids"] == hf_ids(hf_gemma, text, parse_special=True), text


def test_gemma_special_lookalikes_stay_text(krserve, default_model):
    text = "<start_of_turn>user\nhi<end_of_turn><bos><eos>"
    off = run_batch(krserve, default_model, [text], "--no-special")[0]["ids"]
    on = run_batch(krserve, default_model, [text], "--no-special", "--parse-special")[0]["ids"]
    for special in (1, 2, 105, 106):
        assert special not in off
    assert on[0] == 105 and 106 in on and 2 in on and 1 in on


def test_gemma_add_special_bos(krserve, default_model, hf_gemma):
    recs = run_batch(krserve, default_model, ["Hello world", ""])
    assert recs[0]["ids"][0] == 2
    assert recs[0]["ids"][1:] == hf_ids(hf_gemma, "Hello world", False)
    assert recs[1]["ids"] == [2]


def test_gemma_random_text_matches_hf(krserve, default_model, hf_gemma):
    rng = random.Random(1234)
    alphabet = list("abcdefghij ABC  \n\t.,;'!?0123456789") + ["é", "ß", "世", "界", "🙂", "\u00a0"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    recs = run_batch(krserve, default_model, texts, "--no-special")
    for text, rec in zip(texts, recs):
        assert rec["ids"] == hf_ids(hf_gemma, text, False), repr(text)


def test_gemma_decode_roundtrip(krserve, default_model):
    texts = [t for t in CORPUS if t not in LITERAL_2581] + [b"invalid \xff\xfe utf8 \xc3", b"\x80\x81 stray continuation", b"trunc \xe4\xb8"]
    recs = run_batch(krserve, default_model, texts, "--no-special")
    for text, rec in zip(texts, recs):
        raw = text.encode() if isinstance(text, str) else text
        assert bytes.fromhex(rec["decoded_hex"]) == raw, repr(text)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE: a trained vocabulary exported to GGUF

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def training_text():
    """Deterministic training text: the corpus plus some stdlib source and docs."""
    import json as j
    import textwrap

    parts = list(CORPUS) * 3
    for mod in (j, textwrap, random):
        parts.append(pathlib.Path(mod.__file__).read_text(encoding="utf-8"))
    return parts


def build_bpe(cache_dir, pre):
    from tokenizers import Regex, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        split = LLAMA3_SPLIT if pre == "llama-bpe" else QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    spec = json.loads(tok.to_str())
    # llama.cpp skips merging for llama-bpe when the whole word is a token (as Llama 3's own
    # tokenizer.json does with ignore_merges); the oracle must do the same.
    spec["model"]["ignore_merges"] = pre == "llama-bpe"
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))

    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [3 if t in BPE_SPECIALS else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    path = cache_dir / f"bpe_{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tok, path


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_bpe_ids_match_hf(krserve, cache_dir, pre):
    tok, path = build_bpe(cache_dir, pre)
    rng = random.Random(7)
    alphabet = list("abcdefghij ABC  \n\r\t.,;'!?0123456789") + ["é", "世", "🙂", "\u00a0", "'s", "'LL"]
    texts = CORPUS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(150)]
    recs = run_batch(krserve, path, texts, "--no-special")
    bad = []
    for text, rec in zip(texts, recs):
        want = hf_ids(tok, text, parse_special=False)
        if rec["ids"] != want:
            bad.append((text, rec["ids"], want))
        assert bytes.fromhex(rec["decoded_hex"]) == text.encode()
    assert not bad, "\n".join(f"{t!r}:\n  C  {c}\n  HF {h}" for t, c, h in bad[:5])
    # specials: only with --parse-special
    text = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    off = run_batch(krserve, path, [text], "--no-special")[0]["ids"]
    on = run_batch(krserve, path, [text], "--no-special", "--parse-special")[0]["ids"]
    assert on == hf_ids(tok, text, parse_special=True)
    assert off == hf_ids(tok, text, parse_special=False)
    assert not set(off) & {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# SPM with add_space_prefix (Llama 2 style) against sentencepiece itself


def test_spm_space_prefix_matches_sentencepiece(krserve, cache_dir):
    spm = pytest.importorskip("sentencepiece")
    prefix = cache_dir / "spm_small"
    if not (cache_dir / "spm_small.model").exists():
        text = cache_dir / "spm_train.txt"
        text.write_text("\n".join(t.replace("\n", " ") for t in training_text()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), vocab_size=800, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, add_dummy_prefix=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            split_digits=True, minloglevel=2,
        )
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1)
    path = cache_dir / "spm_small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_bool("tokenizer.ggml.add_space_prefix", True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # sentencepiece collapses nothing (identity normalization) but its BPE differs from
    # llama.cpp's on no input here; texts with leading spaces / newlines are included.
    texts = [t for t in CORPUS if "\r" not in t and t not in LITERAL_2581]
    recs = run_batch(krserve, path, texts, "--no-special")
    bad = []
    for text, rec in zip(texts, recs):
        want = sp.encode(text)
        if rec["ids"] != want:
            bad.append((text, rec["ids"], want))
        assert bytes.fromhex(rec["decoded_hex"]) == text.encode(), repr(text)
    assert not bad, "\n".join(f"{t!r}:\n  C  {c}\n  SP {h}" for t, c, h in bad[:5])
    recs = run_batch(krserve, path, ["Hello world"])
    assert recs[0]["ids"] == [sp.bos_id()] + sp.encode("Hello world")


# ---------------------------------------------------------------------------------------------
# Chat templates against transformers' Jinja rendering

GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "  You are terse.  \n"},
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4\n\n"},
        {"role": "user", "content": "And 3+3?\u3000"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": " answer "},
        {"role": "user", "content": "tabs\tinside\t"},
        {"role": "assistant", "content": "émoji 🙂 and 世界"},
        {"role": "user", "content": "<start_of_turn>not special"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
]


def jinja_render(template, messages, gen, bos, eos):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=gen,
        bos_token=bos, eos_token=eos,
    )
    return rendered[0]


def test_chat_gemma_default_model(krserve, default_model, tmp_path):
    # the default GGUF has no chat template: the family comes from <start_of_turn> in the vocab
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            want = jinja_render(GEMMA3_TEMPLATE, msgs, gen, "<bos>", "<eos>")
            assert render_c(krserve, default_model, msgs, gen, tmp=tmp_path) == want


def test_chat_gemma_rejects_bad_roles(krserve, default_model, tmp_path):
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError):
        jinja_render(GEMMA3_TEMPLATE, msgs, True, "<bos>", "<eos>")
    render_c(krserve, default_model, msgs, True, expect_rc=3, tmp=tmp_path)


@pytest.mark.parametrize(
    "name,template,bos,eos",
    [
        ("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>"),
        ("chatml", CHATML_TEMPLATE, None, None),
        ("qwen2", QWEN2_TEMPLATE, None, None),
        ("llama2", LLAMA2_TEMPLATE, "<s>", "</s>"),
    ],
)
def test_chat_templates_match_jinja(krserve, cache_dir, tmp_path, name, template, bos, eos):
    # a vocabulary that has these BOS/EOS texts, with the template stored in the GGUF so that
    # family detection from tokenizer.chat_template is exercised too
    path = tmp_path / f"chat_{name}.gguf"
    tokens = ["<unk>", bos or "<|endoftext|>", eos or "<|im_end|>", "a", "b"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3, 1, 1])
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            want = jinja_render(template, msgs, gen, tokens[1], tokens[2])
            assert render_c(krserve, path, msgs, gen, tmp=tmp_path) == want, (name, msgs, gen)
            assert render_c(krserve, path, msgs, gen, template=name, tmp=tmp_path) == want


def test_chat_unknown_family_is_an_error(krserve, cache_dir, tmp_path):
    path = tmp_path / "nochat.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msgs = [{"role": "user", "content": "hi"}]
    path_json = tmp_path / "m.json"
    path_json.write_text(json.dumps(msgs))
    out = subprocess.run(
        [str(krserve), "tokenize", "-m", str(path), "--chat", str(path_json), "--render"],
        capture_output=True, timeout=60,
    )
    assert out.returncode != 0 and b"chat template" in out.stderr
    assert render_c(krserve, path, msgs, True, template="chatml", tmp=tmp_path) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_gemma_large_text_matches_hf(krserve, default_model, hf_gemma, tmp_path):
    """~200 KB of source code and prose in one piece (long fragments, many merges)."""
    import re

    text = "\n".join(training_text()).replace("\u2581", "")  # see LITERAL_2581
    text = re.sub(" {32,}", " " * 31, text)  # see test_gemma_long_space_runs_follow_llama_cpp
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode())
    out = subprocess.run(
        [str(krserve), "tokenize", "-m", str(default_model), "--no-special", "--json", "-f", str(path)],
        capture_output=True, check=True, timeout=300,
    )
    rec = json.loads(out.stdout)
    want = hf_ids(hf_gemma, text, parse_special=False)
    assert len(rec["ids"]) == len(want)
    assert rec["ids"] == want
    assert bytes.fromhex(rec["decoded_hex"]) == text.encode()


def test_gemma_long_space_runs_follow_llama_cpp(krserve, default_model, hf_gemma):
    """Known difference: Gemma's whitespace-run tokens (2..31 spaces) are USER_DEFINED in the GGUF,
    so llama.cpp (and this tokenizer) cut a longer run longest-first before merging: 34 spaces ->
    [31 spaces][3 spaces]. HF's GGUF conversion respells them as U+2581 runs and merges by BPE
    rank instead ([16][18]). Runs of up to 31 spaces agree."""
    text = "x" + " " * 34 + "y"
    ids = run_batch(krserve, default_model, [text], "--no-special")[0]["ids"]
    assert ids == [236781, 167, 139, 236762]
    assert hf_ids(hf_gemma, text, False) != ids
    text = "x" + " " * 31 + "y"
    assert run_batch(krserve, default_model, [text], "--no-special")[0]["ids"] == hf_ids(hf_gemma, text, False)


def test_unicode_table_is_generated(root):
    """src/tokenizer/unicode_tables.c is exactly what scripts/gen_unicode_tables.py writes."""
    import unicodedata

    committed = (root / "src/tokenizer/unicode_tables.c").read_text()
    if f"(Unicode {unicodedata.unidata_version})" not in committed.splitlines()[0]:
        pytest.skip("this Python has another Unicode version than the committed table")
    out = subprocess.run(
        [sys.executable, str(root / "scripts/gen_unicode_tables.py")], capture_output=True, check=True, text=True
    )
    assert out.stdout == committed
