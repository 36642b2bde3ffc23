"""Structured output through the official openai client on the default model: response_format
json_object and json_schema (chat and completions, streaming and not), the GBNF `grammar`
parameter, JSON-RPC generate with response_format, and unsupported schema features refused with
a 400 that names them."""
import json

import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 24},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de", "es"]},
                      "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}

MSG = [{"role": "user", "content": "Describe a fictional person as JSON."}]


def person_format(schema=PERSON):
    return {"type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("seed", [1, 2])
def test_chat_json_schema(client, seed):
    r = client.chat.completions.create(model="default", messages=MSG, max_tokens=120, seed=seed,
                                       response_format=person_format())
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    obj = json.loads(c.message.content)
    jsonschema.validate(obj, PERSON)


def test_chat_json_schema_stream(client):
    s = client.chat.completions.create(model="default", messages=MSG, max_tokens=120, seed=3,
                                       response_format=person_format(), stream=True)
    text, fin = "", None
    for ch in s:
        if ch.choices and ch.choices[0].delta.content:
            text += ch.choices[0].delta.content
        if ch.choices and ch.choices[0].finish_reason:
            fin = ch.choices[0].finish_reason
    assert fin == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_chat_json_object(client):
    for stream in (False, True):
        kw = dict(model="default", max_tokens=200, seed=4, temperature=0.7,
                  messages=[{"role": "user",
                             "content": "Return a JSON object with your name and age."}],
                  response_format={"type": "json_object"})
        if stream:
            text, fin = "", None
            for ch in client.chat.completions.create(stream=True, **kw):
                if ch.choices and ch.choices[0].delta.content:
                    text += ch.choices[0].delta.content
                if ch.choices and ch.choices[0].finish_reason:
                    fin = ch.choices[0].finish_reason
        else:
            c = client.chat.completions.create(**kw).choices[0]
            text, fin = c.message.content, c.finish_reason
        assert fin == "stop", text
        assert isinstance(json.loads(text), dict)


def test_completions_json_schema(client):
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}},
              "required": ["answer"]}
    r = client.completions.create(model="default", prompt="Is the sky blue? Answer in JSON: ",
                                  max_tokens=30, extra_body={"response_format": {
                                      "type": "json_schema", "json_schema": {"schema": schema}}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_grammar_parameter(client):
    g = 'root ::= ("yes" | "no") ", because " [a-z ]{1,20} "."'
    r = client.completions.create(model="default", prompt="Is water wet?", max_tokens=40,
                                  seed=5, extra_body={"grammar": g})
    t = r.choices[0].text
    assert r.choices[0].finish_reason == "stop", t
    head, _, rest = t.partition(", because ")
    assert head in ("yes", "no") and rest.endswith(".") and 2 <= len(rest) <= 21, t
    assert all(ch.islower() or ch == " " for ch in rest[:-1]), t


@pytest.mark.parametrize("fmt,word", [
    (person_format({"type": "string", "pattern": "^a+$"}), "pattern"),
    (person_format({"type": "object", "properties": {"a": {"type": "string"}},
                    "minProperties": 1}), "minProperties"),
    (person_format({"oneOf": [{"type": "string"}]}), "oneOf"),
    (person_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
    ({"type": "xml"}, "xml"),
])
def test_unsupported_named(client, fmt, word):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MSG, max_tokens=5,
                                       response_format=fmt)
    err = e.value.body
    assert err["param"] == "response_format"
    assert word in err["message"]


def test_bad_grammar_named(server):
    st, _, b = server.post("/v1/completions", {"prompt": "x", "grammar": "root ::= foo"})
    assert st == 400
    e = json.loads(b)["error"]
    assert e["param"] == "grammar" and "foo" in e["message"]


def test_rpc_generate_json_schema(server):
    st, _, b = server.post("/rpc", {"jsonrpc": "2.0", "id": 9, "method": "generate", "params": {
        "messages": MSG, "max_tokens": 120, "seed": 6, "stream": False,
        "response_format": person_format()}})
    assert st == 200, b
    res = json.loads(b)["result"]
    assert res["finish_reason"] == "stop", res
    jsonschema.validate(json.loads(res["text"]), PERSON)
    st, _, b = server.post("/rpc", {"jsonrpc": "2.0", "id": 10, "method": "generate", "params": {
        "prompt": "x", "response_format": person_format({"not": {}})}})
    err = json.loads(b)["error"]
    assert "'not'" in err["message"]
