"""server/: the OpenAI-compatible API driven by the official `openai` client.

Oracles: streaming deltas must concatenate to the non-streaming greedy text; usage.prompt_tokens
must equal what `krserve tokenize` (an independent CLI path) counts; logprobs must be sorted
log-probabilities; stop strings must cut exactly where the greedy text contains them."""
import json
import subprocess

import openai
import pytest

from srv_helpers import BUILD, DEFAULT_MODEL, ROOT

PROMPT = "The capital of France is"


def cli_token_count(text):
    res = subprocess.run([str(BUILD / "krserve"), "tokenize", "-m", str(DEFAULT_MODEL), "--json",
                          text], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return len(json.loads(res.stdout)["ids"])


def cli_chat_count(messages, tmp_path):
    f = tmp_path / "chat.json"
    f.write_text(json.dumps(messages))
    res = subprocess.run([str(BUILD / "krserve"), "tokenize", "-m", str(DEFAULT_MODEL), "--json",
                          "--chat", str(f)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return len(json.loads(res.stdout)["ids"])


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["default"]
    assert client.models.retrieve("default").id == "default"


def test_completion_and_usage(client):
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == cli_token_count(PROMPT)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # model omitted routes to the default model too (raw request: the client requires model)
    r2 = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_chat_multiturn(client, tmp_path):
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=10,
                                       temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == cli_chat_count(msgs, tmp_path)


def test_chat_content_parts(client):
    """Content given as OpenAI's list of text parts is the parts joined: the same prompt and the
    same greedy reply as the plain string. Non-text parts are refused, naming the field."""
    kw = dict(model="default", max_tokens=8, temperature=0)
    plain = client.chat.completions.create(
        messages=[{"role": "user", "content": "Name a color. Then another."}], **kw)
    parts = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name a color."},
                                               {"type": "text", "text": " Then another."}]}],
        **kw)
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
            **kw)
    assert "only text parts" in str(e.value)


def test_stream_equals_nonstream_completion(client):
    kw = dict(model="default", prompt=PROMPT, max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    fins = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert fins == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stream_equals_nonstream_chat(client):
    kw = dict(model="default", messages=[{"role": "user", "content": "Count to five."}],
              max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stop_string(client):
    base = client.completions.create(model="default", prompt=PROMPT, max_tokens=12,
                                     temperature=0).choices[0].text
    assert len(base) > 6
    stop = base[4:7]
    cut = base.find(stop)
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0,
                                  stop=[stop, "zzzz-never"])
    assert r.choices[0].text == base[:cut]
    assert r.choices[0].finish_reason == "stop"
    # streaming gives the same cut
    s = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert s == base[:cut]


def test_seed_reproducible(client):
    def run(seed):
        return client.completions.create(model="default", prompt="Once upon a time",
                                         max_tokens=12, temperature=0.8, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    a, b = run(42), run(42)
    assert a == b
    others = {run(s) for s in (1, 2, 3)}
    assert any(o != a for o in others)


def test_completion_logprobs(client):
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        vals = list(top.values())
        assert 1 <= len(vals) <= 3
        assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
        assert abs(vals[0] - tok_lp) < 1e-4  # greedy: the chosen token is the top one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="default",
                                       messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=4, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert abs(tops[0] - item.logprob) < 1e-4
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token or item.bytes
    joined = b"".join(bytes(i.bytes) for i in content).decode("utf-8", "replace")
    assert joined == r.choices[0].message.content


def test_extras_accepted(client):
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=4,
                                  temperature=0.7, top_p=0.9, presence_penalty=0.5,
                                  frequency_penalty=0.5, logit_bias={"1": -100}, seed=3,
                                  extra_body={"top_k": 20, "min_p": 0.05,
                                              "repetition_penalty": 1.1,
                                              "priority": "urgent", "timeout": 30,
                                              "some_unknown_field": {"x": 1}})
    assert r.usage.completion_tokens >= 1


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model="default",
                                       messages=[{"role": "user", "content": "Tell a story"}],
                                       max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
