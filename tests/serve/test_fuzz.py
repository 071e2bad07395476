"""Requests generated from the server's own OpenAPI schema, valid and not: none may get a 5xx."""

import json
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stoker.serve.models import ModelPool, parse_models
from stoker.serve.server import BackgroundServer, create_app

KEY = "fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Server:
    client: httpx.Client
    spec: dict = field(repr=False)  # a failing example's report shows the request, not the whole schema


@pytest.fixture(scope="module")
def fuzzed(serve_runs):
    pool = ModelPool(parse_models([str(serve_runs[0])]), max_batch=4, max_queue=4)
    app = create_app(pool, api_key=KEY)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield Server(client, app.app.openapi())
    pool.close()


# Text, with the lone surrogates that JSON can carry (json.dumps escapes them) and UTF-8 cannot.
TEXT = st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfff b"])
# Any JSON, for bodies that break the schema: wrong types, nulls, nesting, unknown fields, and the
# NaN and Infinity that Python's JSON parser takes.
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)


def from_schema(schema: dict, spec: dict) -> st.SearchStrategy:
    """Values valid by a JSON schema, for the kinds FastAPI's schemas use here."""
    if "$ref" in schema:
        return from_schema(spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], spec)
    if "anyOf" in schema:  # the alternatives share the rest of the schema (minLength, say)
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return st.one_of([from_schema({**rest, **alt}, spec) for alt in schema["anyOf"]])
    t = schema.get("type")
    if t == "object":
        props = {k: from_schema(v, spec) | (st.just("alpha") if k == "model" else st.nothing())  # a real one too
                 for k, v in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    if t == "array":
        return st.lists(from_schema(schema["items"], spec), min_size=schema.get("minLength", 0), max_size=5)
    if t == "string":
        return TEXT.filter(lambda t: len(t) >= schema.get("minLength", 0))
    lo, hi, above = schema.get("minimum"), schema.get("maximum"), schema.get("exclusiveMinimum")
    if t == "integer":
        return st.integers(None if lo is None else int(lo), None if hi is None else int(hi))
    if t == "number":
        low = lo if above is None else above
        inside = [x for x in (5e-324, 1e-300, lo, hi)  # the extremes, which once broke sampling
                  if x is not None and (low is None or x > low or x == lo) and (hi is None or x <= hi)]
        return st.floats(low, hi, exclude_min=above is not None, allow_nan=False) | st.sampled_from(inside)
    return {"boolean": st.booleans(), "null": st.none()}.get(t, JSON)


def requests_of(spec: dict) -> st.SearchStrategy:
    """(method, path, body) for every operation: bodies valid by the schema, field-wise wild ones, any JSON."""
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema is None:
                out.append(st.tuples(st.just(method), st.just(path), st.none()))
                continue
            fields = sorted(spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]["properties"])
            wild = st.dictionaries(st.sampled_from(fields), JSON)
            out.append(st.tuples(st.just(method), st.just(path), from_schema(schema, spec) | wild | JSON))
    return st.one_of(out)


# Fixed examples (derandomize), and no shrinking: a request that generates text is slow to repeat
# hundreds of times, and the failing one is reported whole anyway.
@settings(max_examples=150, derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_no_request_from_the_schema_gets_a_5xx(fuzzed, data):
    method, path, body = data.draw(requests_of(fuzzed.spec))
    r = fuzzed.client.request(method.upper(), path, content=None if body is None else json.dumps(body),
                              headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (method, path, body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif isinstance(body, dict) and body.get("stream") is True:
        lines = [line for line in r.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), r.text
    elif path != "/metrics":
        json.loads(r.text)
