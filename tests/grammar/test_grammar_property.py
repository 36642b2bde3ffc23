"""Property: for random JSON Schemas of the supported subset and random sampling seeds
(temperature 1, the default model), every reply parses with json and validates with the
jsonschema package. Schemas are bounded (string and array lengths, integer ranges) so that
every sentence fits max_tokens; requests run 12 at a time (the engine batches them) and no new batch starts after a time
budget of 15 s (at least 12 cases are checked)."""
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from krs_paths import ROOT

BUDGET_S = 15
MIN_CASES = 12
PARALLEL = 12
WORDS = ["red", "blue", "x", "ok", "no", "42", "a b"]
PATTERNS = ["^[a-z]{1,6}$", "^\\d{3}-\\d{4}$", "^(red|green|blue)$",
            "^[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5})?$", "^#[0-9a-f]{6}$", "^[^0-9]{1,4}!$"]


def rand_schema(rng, depth=0):
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const"]
    if depth < 2:
        kinds += ["object", "object", "array", "anyOf"]
    k = rng.choice(kinds)
    if k == "string":
        s = {"type": "string", "maxLength": rng.randint(0, 8)}
        if rng.random() < 0.3:
            s["minLength"] = rng.randint(0, s["maxLength"])
        if rng.random() < 0.2:
            s = {"type": "string", "format": rng.choice(["date", "uuid", "date-time", "time"])}
        elif rng.random() < 0.2:
            s = {"type": "string", "pattern": rng.choice(PATTERNS)}
        return s
    if k == "integer":
        s = {"type": "integer"}
        if rng.random() < 0.7:
            lo = rng.randint(-500, 500)
            s["minimum"] = lo
            s["maximum"] = lo + rng.randint(0, 2000)
        if rng.random() < 0.2:
            s.pop("maximum", None)
            s["exclusiveMinimum"] = s.pop("minimum", 0)
        return s
    if k == "number":
        s = {"type": "number"}
        if rng.random() < 0.6:
            lo = rng.randint(-20, 20)
            s["minimum"], s["maximum"] = lo, lo + rng.randint(0, 40)
        return s
    if k in ("boolean", "null"):
        return {"type": k}
    if k == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4)) + ([None] if rng.random() < .3 else [])}
    if k == "const":
        return {"const": rng.choice([1, "fixed", True, None, {"k": [1, 2]}])}
    if k == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": rand_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    if k == "anyOf":
        return {"anyOf": [rand_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    n = rng.randint(0, 4)
    props = {f"p{i}_{rng.choice(WORDS).replace(' ', '')}": rand_schema(rng, depth + 1)
             for i in range(n)}
    s = {"type": "object", "properties": props,
         "required": [p for p in props if rng.random() < 0.6]}
    if rng.random() < 0.5:
        s["additionalProperties"] = False
    if not props:  # a map would be unbounded: no properties means none at all
        s = {"type": "object", "additionalProperties": False}
    return s


@pytest.fixture(scope="module")
def srv():
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "server"))
    from srv_helpers import Server
    s = Server(args=("--kv-tokens", "16384"))
    yield s
    s.stop()


def test_random_schemas_always_valid(srv):
    import openai
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
    rng = random.Random(20261128)
    t0 = time.time()
    done, failures = [], []

    def case(i):
        schema = {"type": "object", "properties": {"v": rand_schema(rng)}, "required": ["v"]} \
            if i % 3 == 0 else rand_schema(rng)
        return schema, rng.randrange(1 << 30)

    def one(schema, seed):
        r = client.chat.completions.create(
            model="default", max_tokens=300, seed=seed, temperature=1.0,
            messages=[{"role": "user", "content": "Reply with JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "t",
                                                                    "schema": schema}})
        c = r.choices[0]
        try:
            assert c.finish_reason == "stop", f"finish_reason {c.finish_reason}"
            V = jsonschema.Draft202012Validator
            V(schema, format_checker=V.FORMAT_CHECKER).validate(json.loads(c.message.content))
        except Exception as e:  # collected: report every failing case
            failures.append((schema, seed, c.message.content, repr(e)))
        done.append(seed)

    i = 0
    with ThreadPoolExecutor(PARALLEL) as pool:
        while time.time() - t0 < BUDGET_S or len(done) < MIN_CASES:
            batch = [pool.submit(one, *case(i + k)) for k in range(PARALLEL)]
            i += PARALLEL
            for f in batch:
                f.result()
    assert not failures, json.dumps(failures[:3], indent=1)
    assert len(done) >= MIN_CASES
    print(f"{len(done)} random schemas x seeds: all parsed and validated "
          f"({time.time() - t0:.0f} s)")
