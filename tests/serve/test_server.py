import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from stoker.generate import load_trained
from stoker.serve.client import Client, ServeError
from stoker.serve.engine import Engine, SamplingParams
from stoker.serve.models import ModelPool, parse_models
from stoker.serve.server import MAX_BODY_BYTES, BackgroundServer, create_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(serve_runs):
    """Both models, an API key, room for 4 sequences."""
    pool = ModelPool(parse_models([str(serve_runs[0]), str(serve_runs[1])]), max_loaded=2, max_batch=4,
                     batch_invariant=True)
    with BackgroundServer(create_app(pool, api_key=KEY)) as url:
        yield url
    pool.close()


@pytest.fixture(scope="module")
def reference(serve_runs):
    """Completions from an engine driven directly, same settings as the server: what a right answer is
    (batch-invariant, so that it holds whatever else the server runs at the same time)."""
    model, tok, _ = load_trained(serve_runs[0])
    engine = Engine(model, tok, max_batch=4, batch_invariant=True)

    def complete(prompt: str, **kw) -> str:
        return engine.generate(tok.encode(prompt), SamplingParams(**kw)).text

    yield complete, tok
    engine.close()


def sse_text(url: str, body: dict) -> tuple[str, list[dict]]:
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunks.append(json.loads(line[6:]))
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks


def test_openai_completions_over_plain_http(server, reference):
    complete, tok = reference
    body = {"model": "alpha", "prompt": "import os\n", "max_tokens": 12, "temperature": 0.8, "top_p": 0.95, "seed": 3}
    r = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "alpha" and out["id"].startswith("cmpl-")
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop")
    assert choice["text"] == complete("import os\n", max_tokens=12, temperature=0.8, top_p=0.95, seed=3)
    n_prompt = len(tok.encode("import os\n"))
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert 1 <= out["usage"]["completion_tokens"] <= 12
    assert out["usage"]["total_tokens"] == n_prompt + out["usage"]["completion_tokens"]
    listed = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["alpha", "beta"]


def test_streaming_returns_the_same_text_as_non_streaming(server):
    for i, body in enumerate([
        {"prompt": "def ", "max_tokens": 30, "temperature": 1.0, "seed": 1},
        {"prompt": "class A:\n", "max_tokens": 30, "temperature": 1.0, "seed": 2, "stop": ["e", "\n\n"]},
        {"prompt": "x", "max_tokens": 8, "temperature": 0},
    ]):
        plain = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=60).json()
        streamed, chunks = sse_text(server, {**body, "stream_options": {"include_usage": True}})
        assert streamed == plain["choices"][0]["text"]
        assert len(chunks) > 2  # it did arrive in pieces
        assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert chunks[-1]["usage"] == plain["usage"]
    assert plain["choices"][0]["finish_reason"] == "length"


def test_task_api(server, reference):
    complete, tok = reference
    c = Client(server, api_key=KEY)
    text = "for key, value in items():"
    t = c.tokenize(text, model="alpha")
    assert t["token_ids"] == tok.encode(text) and t["token_count"] == len(t["token_ids"])
    assert "".join(t["tokens"]) == text
    g = c.generate(text, model="alpha", max_new_tokens=10, temperature=0.7, top_k=20, seed=5)
    assert g["generated_text"] == complete(text, max_tokens=10, temperature=0.7, top_k=20, seed=5)
    assert g["input_token_count"] == t["token_count"] and 1 <= g["generated_token_count"] <= 10
    assert "".join(c.stream(text, model="alpha", max_tokens=10, temperature=0.7, top_k=20, seed=5)) == g["generated_text"]


def test_errors_name_the_problem_and_the_server_keeps_answering(server, reference):
    complete, _ = reference
    good = {"model": "alpha", "prompt": "import ", "max_tokens": 6, "temperature": 0.9, "seed": 4}
    expected = complete("import ", max_tokens=6, temperature=0.9, seed=4)
    cases = [
        ({**good, "max_tokens": 0}, AUTH, 422, "max_tokens"),
        ({**good, "temperature": "hot"}, AUTH, 422, "temperature"),
        ({"model": "alpha"}, AUTH, 422, "prompt"),
        ({**good, "prompt": "x = 1\n" * 40}, AUTH, 400, "context"),
        ({**good, "model": "gamma"}, AUTH, 404, "alpha, beta"),
        (good, {}, 401, "API key"),
        (good, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ]
    for body, headers, status, needle in cases:
        r = httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"]
        ok = httpx.post(f"{server}/v1/completions", json=good, headers=AUTH, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected
    bad_json = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert bad_json.status_code == 422
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # open, for load balancers
    with pytest.raises(ServeError) as e:
        Client(server, api_key=KEY).complete("x", model="gamma")
    assert e.value.status == 404


def test_a_flood_beyond_the_queue_gets_429_then_service_resumes(serve_runs, reference):
    complete, _ = reference
    pool = ModelPool(parse_models([str(serve_runs[0])]), max_batch=1, max_queue=1, batch_invariant=True)
    body = {"prompt": "def ", "max_tokens": 40, "temperature": 1.0, "seed": 8}

    async def flood(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for _ in range(12)))

    with BackgroundServer(create_app(pool)) as url:
        httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 1})  # load the model first
        answers = asyncio.run(flood(url))
        codes = [r.status_code for r in answers]
        assert 429 in codes and 200 in codes, codes
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and "retry" in r.json()["error"]["message"]
        expected = complete("def ", max_tokens=40, temperature=1.0, seed=8)
        assert all(r.json()["choices"][0]["text"] == expected for r in answers if r.status_code == 200)
        after = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == expected
        metrics = httpx.get(f"{url}/metrics").text
    pool.close()
    assert re.search(r'stoker_requests_total\{endpoint="/v1/completions",status="429"\} [1-9]', metrics)


def test_metrics_report_traffic(server):
    httpx.post(f"{server}/v1/completions", json={"prompt": "a", "max_tokens": 3}, headers=AUTH, timeout=60)
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert re.search(r'^stoker_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text, re.M)
    for name in ("stoker_queue_depth", "stoker_batch_size_bucket", "stoker_generated_tokens_total",
                 "stoker_tokens_per_second", "stoker_time_to_first_token_seconds_bucket",
                 "stoker_request_latency_seconds_bucket", "stoker_model_loaded"):
        assert re.search(rf'^{name}\{{.*model="alpha".*\}} ', text, re.M), name
    assert re.search(r'^stoker_model_loaded\{model="alpha"\} 1\.0$', text, re.M)
    generated = float(re.search(r'^stoker_generated_tokens_total\{model="alpha"\} (\S+)$', text, re.M).group(1))
    assert generated >= 3


def test_cli_generate_asks_the_server(server, reference):
    complete, _ = reference
    cmd = [sys.executable, "-m", "stoker", "generate", "alpha", "--server", server, "--prompt", "import ",
           "--max-new-tokens", "8", "--temperature", "0.5", "--top-k", "30", "--seed", "11"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "STOKER_API_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "import " + complete("import ", max_tokens=8, temperature=0.5, top_k=30, seed=11) + "\n"
    r = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "STOKER_API_KEY"})
    assert r.returncode == 2 and "401" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def alpha(serve_runs):
    """Model alpha alone, with a key, room for 4 sequences as `reference`: (url, pool), for tests
    that reach into the engine (each undoes what it changes there)."""
    pool = ModelPool(parse_models([str(serve_runs[0])]), max_batch=4, batch_invariant=True)
    with BackgroundServer(create_app(pool, api_key=KEY)) as url:
        yield url, pool
    pool.close()


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


def poison_seed_666(monkeypatch, engine: Engine) -> None:
    """Make the sampler fail at the 3rd token of requests seeded 666: an internal fault of one request."""
    real = engine._pick

    def pick(seq, logits):
        if seq.params.seed == 666 and seq.sampled == 3:
            raise RuntimeError("poisoned")
        return real(seq, logits)

    monkeypatch.setattr(engine, "_pick", pick)


def test_a_poisoned_request_never_fails_the_others(alpha, reference, monkeypatch):
    url, pool = alpha
    complete, _ = reference
    poison_seed_666(monkeypatch, pool.engine("alpha"))
    prompts = ["def ", "import os\n", "class A:\n", "x = ", "for i in", "if x:\n    ", "return ", "# "]
    good = [{"prompt": p, "max_tokens": 12, "temperature": 0.9, "seed": i} for i, p in enumerate(prompts)]
    odd = [({"temperature": 1e-300}, {"temperature": 0}), ({"top_p": 5e-324}, {"temperature": 0}),
           ({"seed": 2**64 - 1}, {"seed": -1})]  # valid extremes, and what each must equal
    invalid = [({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"temperature": -1e-9}, "temperature"),
               ({"top_p": 0}, "top_p")]
    want = [complete(b["prompt"], max_tokens=12, temperature=0.9, seed=b["seed"]) for b in good]
    want_odd = [complete("def ", max_tokens=12, **same) for _, same in odd]

    async def all_at_once():
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            async def post(body):
                return await client.post(f"{url}/v1/completions", json=body)

            async def stream(body):
                async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                    return [line async for line in r.aiter_lines() if line]

            poisoned = {"prompt": "def ", "max_tokens": 12, "seed": 666}
            return await asyncio.gather(
                post(poisoned), stream(poisoned), *map(post, good),
                *(post({"prompt": "def ", "max_tokens": 12, **o}) for o, _ in odd),
                *(post({"prompt": "def ", **b}) for b, _ in invalid))

    plain, streamed, *rest = asyncio.run(all_at_once())
    assert [r.status_code for r in rest[:len(good) + len(odd)]] == [200] * (len(good) + len(odd))
    assert [r.json()["choices"][0]["text"] for r in rest[:len(good)]] == want
    assert [r.json()["choices"][0]["text"] for r in rest[len(good):len(good) + len(odd)]] == want_odd
    for r, (_, field) in zip(rest[len(good) + len(odd):], invalid):
        assert openai_error(r, 422)["param"] == field
    assert "poisoned" in openai_error(plain, 500)["message"]
    # The stream began, then tells what went wrong instead of breaking off.
    assert streamed[-1] == "data: [DONE]" and json.loads(streamed[0][6:])["choices"]
    err = json.loads(streamed[-2][6:])["error"]
    assert err["code"] == 500 and err["type"] == "server_error" and "poisoned" in err["message"]


def test_large_bodies_get_413_unread_and_long_prompts_400_untokenized(alpha, monkeypatch):
    url, pool = alpha
    model = pool.models["alpha"]
    tokenized: list[int] = []
    real = model.tokenizer.encode_batch
    monkeypatch.setattr(model.tokenizer, "encode_batch", lambda texts: (tokenized.extend(map(len, texts)), real(texts))[1])
    latencies: list[float] = []
    stop = threading.Event()

    def watch():  # another client, all along
        while not stop.is_set():
            t = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - t)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        big = json.dumps({"prompt": "x" * 10_000_000}).encode()
        t = time.perf_counter()
        as_json = {**AUTH, "Content-Type": "application/json"}
        err = openai_error(httpx.post(f"{url}/v1/completions", content=big, headers=as_json, timeout=60), 413)
        refused_s = time.perf_counter() - t
        assert str(MAX_BODY_BYTES) in err["message"]
        chunked = (big[i: i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: counted as it comes
        openai_error(httpx.post(f"{url}/v1/completions", content=chunked, headers=as_json, timeout=60), 413)
        under = {"prompt": "y = 1; " * 500_000, "max_tokens": 1}  # 3.5 MB: under the limit, far over the context
        err = openai_error(httpx.post(f"{url}/v1/completions", json=under, headers=AUTH, timeout=60), 400)
        assert err["type"] == "context_length_exceeded" and "at least" in err["message"]
        err = openai_error(httpx.post(f"{url}/api/v1/task/text-generation", json={"text": under["prompt"]},
                                      headers=AUTH, timeout=60), 400)
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "y = 1\n" * 5, "max_tokens": 2}, headers=AUTH)
        assert ok.status_code == 200
    finally:
        stop.set()
        watcher.join()
    assert refused_s < 2 and max(latencies) < 2, (refused_s, max(latencies))
    assert tokenized and max(tokenized) <= model.context * model.max_token_bytes  # the 3.5 MB never was


def test_a_client_that_hangs_up_stops_its_generation(alpha, monkeypatch):
    url, pool = alpha
    engine = pool.engine("alpha")
    body = {"prompt": "def ", "max_tokens": 63, "temperature": 0}
    full = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["usage"]["completion_tokens"]
    assert full >= 50  # this model does not stop early on this prompt

    def generated() -> float:
        text = httpx.get(f"{url}/metrics", headers=AUTH).text
        return float(re.search(r'^stoker_generated_tokens_total\{model="alpha"\} (\S+)$', text, re.M).group(1))

    real = engine._decode_padded
    monkeypatch.setattr(engine, "_decode_padded", lambda seqs: (time.sleep(0.05), real(seqs))[1])  # 63 tokens: >3 s
    before = generated()
    with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection: the client is gone
        httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    deadline = time.monotonic() + 2
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and engine.queue_depth == 0
    assert generated() - before < full / 2
    assert re.search(r'stoker_requests_total\{endpoint="/v1/completions",status="499"\} 1', httpx.get(
        f"{url}/metrics", headers=AUTH).text)


def test_every_answer_has_the_openai_error_shape_and_only_health_is_open(alpha):
    url, _ = alpha
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/nowhere"):
        openai_error(httpx.get(f"{url}{path}"), 401)
        assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer"}).status_code == 401
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{path}", headers=AUTH).status_code == 200
    head = httpx.head(f"{url}/health")
    assert head.status_code == 200 and head.content == b""
    assert openai_error(httpx.get(f"{url}/nowhere", headers=AUTH), 404)["type"] == "not_found_error"
    r = httpx.get(f"{url}/v1/completions", headers=AUTH)
    openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    post = lambda path, **kw: httpx.post(f"{url}{path}", headers={**AUTH, **kw.pop("headers", {})}, **kw)
    assert openai_error(post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
                        422)["param"] == "body"
    openai_error(post("/v1/completions", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}), 422)
    openai_error(post("/v1/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 422)
    lone = "\ud800"  # a lone surrogate, which JSON can carry and UTF-8 cannot
    for path, body, field in [("/v1/completions", {"prompt": f"a{lone}"}, "prompt"),
                              ("/v1/completions", {"prompt": ["ok", lone]}, "prompt"),
                              ("/v1/completions", {"prompt": "a", "stop": [lone]}, "stop"),
                              ("/v1/completions", {"prompt": "a", "model": lone}, "model"),
                              ("/api/v1/task/text-generation", {"text": lone}, "text"),
                              ("/api/v1/task/tokenization", {"text": lone}, "text")]:
        raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
        err = openai_error(post(path, content=raw, headers={"Content-Type": "application/json"}), 422)
        assert err["param"] == field and "surrogate" in err["message"]


def test_an_empty_api_key_is_refused(alpha):
    _, pool = alpha
    with pytest.raises(ValueError, match="api_key"):
        create_app(pool, api_key="")


TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def throughput(serve_runs, tmp_path_factory):
    """Model alpha in the default (throughput) mode, and 'chatty': the same run with a chat template."""
    import shutil

    chatty = tmp_path_factory.mktemp("chat") / "chatty"
    shutil.copytree(serve_runs[0], chatty)
    (chatty / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    pool = ModelPool(parse_models([str(serve_runs[0]), str(chatty)]), max_batch=4, max_loaded=2)
    with BackgroundServer(create_app(pool)) as url:
        yield url, pool
    pool.close()


def test_chat_completions_render_the_models_template(throughput):
    url, _ = throughput
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "def "}]}]
    rendered = "<system>Be brief.\n<user>def \n<assistant>"
    want = httpx.post(f"{url}/v1/completions", json={"model": "chatty", "prompt": rendered, "max_tokens": 10,
                                                     "temperature": 0}, timeout=60).json()
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "chatty", "messages": messages, "max_tokens": 10,
                                                       "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want["choices"][0]["text"]}
    assert choice["finish_reason"] == want["choices"][0]["finish_reason"]
    assert body["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    # Streaming: the role first, then content deltas that add up to the same text, then [DONE].
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "chatty", "messages": messages, "max_tokens": 10, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as s:
        lines = [l for l in s.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(d["delta"].get("content", "") for d in deltas) == choice["message"]["content"]
    assert deltas[-1]["finish_reason"] == choice["finish_reason"] and chunks[-1]["usage"] == body["usage"]
    # A model without a template, a role that does not exist, no messages: the client's fault.
    err = openai_error(httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": messages}), 400)
    assert "chat template" in err["message"] and err["param"] == "messages"
    bad_role = [{"role": "wizard", "content": "hi"}]
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={"model": "chatty", "messages": bad_role}), 422)
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={"model": "chatty", "messages": []}), 422)


def test_a_client_that_leaves_mid_stream_frees_its_row_and_cache(throughput, monkeypatch):
    url, pool = throughput
    engine = pool.engine("alpha")

    def gauge(text: str, name: str, **labels) -> float:
        sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus_client orders them
        return float(re.search(rf"^{name}\{{{sel}\}} (\S+)$", text, re.M).group(1))

    real = engine._decode_rows
    monkeypatch.setattr(engine, "_decode_rows", lambda: (time.sleep(0.05), real())[1])  # 60 tokens: >3 s
    monkeypatch.setattr(engine, "keep_slots_s", 0.0)  # the batch buffer is not kept for a next burst
    body = {"model": "alpha", "prompt": "def ", "max_tokens": 60, "temperature": 0, "stream": True}
    other = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json={**body, "stream": False,
                                                                                      "max_tokens": 20}, timeout=60))
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        next(l for l in lines if l.startswith("data: {"))  # generating now
        other.start()
        time.sleep(0.3)
        busy = httpx.get(f"{url}/metrics").text
    # The stream is closed: the server notices within its poll period and drops the request.
    deadline = time.monotonic() + 5
    while (engine.running or engine._slots is not None) and time.monotonic() < deadline:
        time.sleep(0.05)
    other.join()
    idle = httpx.get(f"{url}/metrics").text
    assert gauge(busy, "stoker_running_sequences", model="alpha") == 2
    assert gauge(busy, "stoker_model_memory_bytes", model="alpha", kind="kv_cache") > 0
    assert gauge(busy, "stoker_model_memory_bytes", model="alpha", kind="weights") > 0
    assert gauge(idle, "stoker_running_sequences", model="alpha") == 0
    assert gauge(idle, "stoker_model_memory_bytes", model="alpha", kind="kv_cache") == 0
    assert engine._slots is None and engine._rows == []
