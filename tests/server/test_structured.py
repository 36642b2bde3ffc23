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


def test_chat_json_object(client, server):
    # The 270M default model keeps adding members to a free-form object (measured: 200 tokens
    # without closing, greedy or T=0.7); a bias on "}" (only allowed where it closes an object)
    # makes it finish, so the reply can be checked whole.
    st, _, b = server.post("/tokenize", {"prompt": "}"})
    close = json.loads(b)["tokens"][-1]
    for stream in (False, True):
        kw = dict(model="default", max_tokens=200, seed=4, temperature=0.7,
                  messages=[{"role": "user",
                             "content": "Return a JSON object with your name and age."}],
                  response_format={"type": "json_object"}, logit_bias={str(close): 8})
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
    (person_format({"type": "string", "pattern": "^(?=a)b"}), "lookaround"),
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
    st, _, b = server.post("/rpc", {"jsonrpc": "2.0", "id": 11, "method": "generate", "params": {
        "prompt": "x", "tools": [WEATHER]}})
    assert "'tools'" in json.loads(b)["error"]["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
    "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(call, tools=(WEATHER, TIME)):
    assert call.type == "function" and call.id.startswith("call_")
    fn = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.function.name in fn
    jsonschema.validate(json.loads(call.function.arguments), fn[call.function.name])


@pytest.mark.parametrize("choice", ["required",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_tools_call(client, choice):
    r = client.chat.completions.create(model="default", messages=ASK, max_tokens=80, seed=7,
                                       tools=[WEATHER, TIME], tool_choice=choice)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None and len(c.message.tool_calls) == 1
    check_call(c.message.tool_calls[0])
    if isinstance(choice, dict):
        assert c.message.tool_calls[0].function.name == "get_weather"


def test_tools_call_stream(client):
    s = client.chat.completions.create(model="default", messages=ASK, max_tokens=80, seed=8,
                                       tools=[WEATHER, TIME], tool_choice="required", stream=True)
    calls, fin, content = {}, None, ""
    for ch in s:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            e = calls.setdefault(tc.index, {"id": tc.id, "name": "", "args": ""})
            e["name"] += tc.function.name or ""
            e["args"] += tc.function.arguments or ""
        fin = ch.choices[0].finish_reason or fin
    assert fin == "tool_calls" and content == "" and len(calls) == 1
    c = calls[0]
    assert c["id"].startswith("call_")
    jsonschema.validate(json.loads(c["args"]),
                        {"get_weather": WEATHER, "get_time": TIME}[c["name"]]["function"][
                            "parameters"])


def test_tools_auto_and_round_trip(client):
    r = client.chat.completions.create(model="default", messages=ASK, max_tokens=80, seed=9,
                                       tools=[WEATHER, TIME])
    c = r.choices[0]
    if c.finish_reason == "tool_calls":
        check_call(c.message.tool_calls[0])
    else:  # plain text: never a half JSON call
        assert c.message.content and not c.message.content.startswith("{")
    # the conversation goes on with the call and its result (OpenAI's shapes)
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=20, seed=9,
                                       tools=[WEATHER, TIME], tool_choice="none")
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_tools_errors(server):
    def post(body):
        st, _, b = server.post("/v1/chat/completions", dict({"messages": ASK}, **body))
        return st, json.loads(b).get("error", {})
    st, e = post({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                      "function": {"name": "nope"}}})
    assert st == 400 and e["param"] == "tool_choice" and "nope" in e["message"]
    st, e = post({"tool_choice": "required"})
    assert st == 400 and e["param"] == "tool_choice"
    st, e = post({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}}}]})
    assert st == 400 and e["param"] == "tools" and "lookaround" in e["message"]
    st, e = post({"tools": [WEATHER], "response_format": {"type": "json_object"}})
    assert st == 400 and e["param"] == "tools"
    st, _, b = server.post("/v1/completions", {"prompt": "x", "tools": [WEATHER]})
    assert st == 400 and json.loads(b)["error"]["param"] == "tools"
