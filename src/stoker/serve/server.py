"""The HTTP server: an OpenAI-compatible completions endpoint and a stable task-level API.

Every error, whatever the route, has the OpenAI shape `{"error": {"message", "type", "param",
"code"}}`: 401 no or wrong API key, 404 unknown model or path, 405 wrong method, 400 prompt
longer than the context, 413 body over the size limit, 422 a malformed request (the field
named), 429 queue full (with Retry-After), 500 a fault of the server (that request only). A
stream that fails ends with one such error as an event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from stoker.serve.engine import KEEP_SLOTS_S, EngineClosed, Event, Handle, QueueFull, SamplingParams
from stoker.serve.metrics import ServeMetrics
from stoker.serve.models import Model, ModelPool, UnknownModel

RETRY_AFTER_S = 1
MAX_BODY_BYTES = 4 << 20  # a prompt that fills a 32k context is ~130 KB; lists of prompts fit too
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


class _ASCIIJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        # Escaped to ASCII: a message that quotes the client's input renders whatever it holds.
        return json.dumps(content).encode()


def _error(status: int, message: str, type_: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return _ASCIIJSON(_error_body(status, message, type_, param), status_code=status, headers=headers)


class _Body(BaseModel):
    # Fields of the public APIs that stoker does not implement (user, logprobs...) are ignored.
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        # JSON can carry a lone surrogate ("\ud800"), which no tokenizer or UTF-8 output takes.
        for s in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if isinstance(s, str):
                try:
                    s.encode()
                except UnicodeEncodeError as e:
                    raise ValueError(f"not valid Unicode: a lone surrogate at index {e.start}") from None
        return value


class StreamOptions(_Body):
    include_usage: bool = False


TEMPERATURE = "in [0, 2]; 0 is greedy, and any value above it samples (the tiniest pick the top token)"
TOP_P = "in (0, 1]: sample from the most likely tokens that reach this probability (the top one always)"
SEED = "an integer in [-2**63, 2**64 - 1]; the same seed and request give the same text"


class _OpenAISampling(_Body):
    """The sampling and streaming fields that completions and chat completions share."""
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2, description=TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1, description=TOP_P)
    top_k: int = Field(0, ge=0, description="stoker extension: sample from the K most likely tokens (0: all)")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description=SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1, le=1, description="one completion per prompt")


class ContentPart(_Body):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] = ""

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: up to the model's context")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (newer name)")
    n: int = Field(1, ge=1, le=1, description="one completion per request")


class TextGenerationRequest(_Body):
    model: str | None = None
    text: str
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description=TEMPERATURE)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1, description=TOP_P)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description=SEED)
    stop: list[str] = Field(default_factory=list, max_length=4)


class TokenizationRequest(_Body):
    model: str | None = None
    text: str


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(422, "stop: at most 4 non-empty strings", param="stop")
    return tuple(stops)


class _Run:
    """The engine requests behind one HTTP request: events of all its prompts in one asyncio queue."""

    def __init__(self, pool: ModelPool, model: Model):
        self.pool, self.model = pool, model
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[Handle] = []
        self.loop = asyncio.get_running_loop()

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids, or APIError 400 when it cannot fit; blocking (call it from a thread)."""
        m = self.model
        fits = f"the context of model {m.name!r} is {m.context} tokens, so a prompt may hold at most {m.context - 1}"
        # No token spans more than m.max_token_bytes bytes, so a longer text than this has too many
        # tokens for sure: refused without tokenizing it, which would cost about 1 s per MB.
        n_bytes = len(text.encode())
        if n_bytes > (m.context - 1) * m.max_token_bytes:
            raise APIError(400, f"prompt is {n_bytes} bytes, so at least {-(-n_bytes // m.max_token_bytes)} tokens; "
                                f"{fits}", param="prompt", type_="context_length_exceeded")
        # encode_batch, unlike encode, lets other threads run meanwhile (the event loop's, say).
        return self._fits(m.tokenizer.encode_batch([text])[0] or [m.tokenizer.eot_id], "prompt")

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation through the model's chat template, or APIError 400; blocking."""
        m = self.model
        n_bytes = sum(len(msg.text().encode()) for msg in messages)
        if n_bytes > (m.context - 1) * m.max_token_bytes:  # as prompt_ids: too long for sure, not rendered
            raise APIError(400, f"messages hold {n_bytes} bytes, more than the context of model {m.name!r} "
                                f"({m.context} tokens) can take", param="messages", type_="context_length_exceeded")
        try:
            ids = m.tokenizer.chat_ids([{"role": msg.role, "content": msg.text()} for msg in messages])
        except ValueError as e:  # no template, or the template refused the conversation
            raise APIError(400, f"model {m.name!r}: {e}", param="messages") from None
        return self._fits(ids, "messages")

    def _fits(self, ids: list[int], param: str) -> list[int]:
        m = self.model
        if len(ids) >= m.context:
            raise APIError(400, f"{param} is {len(ids)} tokens; the context of model {m.name!r} is {m.context} "
                                f"tokens, so a prompt may hold at most {m.context - 1}", param=param,
                           type_="context_length_exceeded")
        return ids

    async def start(self, prompts: Sequence[list[int]], params: SamplingParams) -> None:
        for i, ids in enumerate(prompts):
            def on_event(ev: Event, i: int = i) -> None:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
            try:
                self.handles.append(await asyncio.to_thread(self.pool.submit, self.model.name, ids, params, on_event))
            except (QueueFull, EngineClosed) as e:
                self.cancel()
                raise APIError(429, f"server busy ({e}); retry later", "rate_limit_exceeded",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            except ValueError as e:
                self.cancel()
                raise APIError(400, str(e), param="prompt") from None

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """Events until every prompt has finished; APIError 500 if one failed, 499 if the client left."""
        pending = len(self.handles)
        get: asyncio.Future | None = None
        check_at = self.loop.time() + DISCONNECT_POLL_S
        try:
            while pending:
                get = get or asyncio.ensure_future(self.queue.get())
                await asyncio.wait([get], timeout=max(0.0, check_at - self.loop.time()))
                if self.loop.time() >= check_at:
                    # A client that hung up would otherwise keep its generation running to the end.
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the request", "client_closed_request")
                    check_at = self.loop.time() + DISCONNECT_POLL_S
                if not get.done():
                    continue
                i, ev = get.result()
                get = None
                if ev.error:
                    raise APIError(500, f"generation failed: {ev.error}", "server_error")
                pending -= ev.finish_reason is not None
                yield i, ev
        finally:
            if get is not None:
                get.cancel()

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _event_stream(run: _Run, events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, then `data: [DONE]`. A failure once the 200 has gone out is sent as
    an error event; when the stream ends for any reason (done, failed, the client went away)
    the run stops generating."""
    async def sse() -> AsyncIterator[str]:
        try:
            async for line in events:
                yield line
        except Exception as e:  # the status is sent already: the error goes in the stream
            e = e if isinstance(e, APIError) else APIError(500, f"internal error ({type(e).__name__})", "server_error")
            yield _data(_error_body(e.status, e.message, e.type, e.param))
        finally:
            run.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


def _params(max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
            stop: tuple[str, ...]) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop=stop)
    except ValueError as e:  # the request's fields are validated first; this is what they let through
        raise APIError(422, str(e), param=str(e).partition(":")[0]) from None


def create_app(pool: ModelPool, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The ASGI app over a model pool. `api_key` set: every path but /health (the API docs too)
    needs `Authorization: Bearer KEY`. Bodies over `max_body_bytes` get 413 unread."""
    if api_key is not None and not api_key:
        raise ValueError("api_key: empty; give a key, or None to serve without one")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: must be >= 1, got {max_body_bytes}")
    metrics: ServeMetrics = pool.metrics
    app = FastAPI(title="stoker", description="Text in, text out, from stoker checkpoints.")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        if errs and errs[0]["type"] == "json_invalid":  # its loc holds a character offset, not a field
            return _error(422, f"body: not valid JSON ({errs[0].get('ctx', {}).get('error', 'decode error')})",
                          "invalid_request_error", "body")
        fields = [".".join(str(p) for p in err["loc"] if p != "body") or "body" for err in errs]
        msg = "; ".join(f"{f}: {err['msg']}" for f, err in zip(fields, errs))
        return _error(422, msg, "invalid_request_error", fields[0] if fields else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type_, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(e).__name__}); the server goes on serving", "server_error")

    def model_or_404(name: str | None) -> Model:
        try:
            return pool.get(name)
        except UnknownModel:
            raise APIError(404, f"model {name!r} not found; available: {', '.join(pool.names)}", param="model",
                           type_="not_found_error") from None

    @app.head("/health", include_in_schema=False)  # load balancers' checks
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": pool.names,
                "loaded": [m.name for m in pool.models.values() if m.engine is not None]}  # base models

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        # An adapter names its base model as parent, and its directory as root (as vLLM does).
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "stoker",
             "context_length": m.context, "loaded": pool.loaded(m), "parent": m.parent,
             "root": str(m.adapter.path) if m.adapter else m.name} for m in pool.models.values()]}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> dict | StreamingResponse:
        model = model_or_404(req.model)
        run = _Run(pool, model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        params = _params(req.max_tokens, req.temperature, req.top_k, req.top_p, req.seed, _stops(req.stop))
        ids = await asyncio.to_thread(lambda: [run.prompt_ids(p) for p in prompts])
        await run.start(ids, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        usage = {"prompt_tokens": sum(map(len, ids)), "completion_tokens": 0, "total_tokens": 0}

        def add_usage(ev: Event) -> None:
            if ev.finish_reason:
                usage["completion_tokens"] += ev.completion_tokens
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

        if req.stream:
            async def events() -> AsyncIterator[str]:
                async for i, ev in run.events(request):
                    add_usage(ev)
                    if ev.text or ev.finish_reason:
                        choice = {"text": ev.text, "index": i, "logprobs": None, "finish_reason": ev.finish_reason}
                        yield _data({**head, "choices": [choice]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _data({**head, "choices": [], "usage": usage})

            return _event_stream(run, events())

        texts, reasons = [""] * len(ids), [None] * len(ids)
        try:
            async for i, ev in run.events(request):
                texts[i] += ev.text
                reasons[i] = ev.finish_reason or reasons[i]
                add_usage(ev)
        finally:
            run.cancel()
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": usage}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
        model = model_or_404(req.model)
        run = _Run(pool, model)
        ids = await asyncio.to_thread(run.chat_ids, req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens or model.context - len(ids)
        params = _params(max_tokens, req.temperature, req.top_k, req.top_p, req.seed, _stops(req.stop))
        await run.start([ids], params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}

        def add_usage(ev: Event) -> None:
            if ev.finish_reason:
                usage["completion_tokens"] = ev.completion_tokens
                usage["total_tokens"] = len(ids) + ev.completion_tokens

        if req.stream:
            def chunk(delta: dict, reason: str | None) -> str:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                return _data({**head, "object": "chat.completion.chunk", "choices": [choice]})

            async def events() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for _, ev in run.events(request):
                    add_usage(ev)
                    if ev.text or ev.finish_reason:
                        yield chunk({"content": ev.text} if ev.text else {}, ev.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield _data({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})

            return _event_stream(run, events())

        text, reason = "", None
        try:
            async for _, ev in run.events(request):
                text += ev.text
                reason = ev.finish_reason or reason
                add_usage(ev)
        finally:
            run.cancel()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}

    @app.post("/api/v1/task/text-generation")
    async def text_generation(req: TextGenerationRequest, request: Request) -> dict:
        model = model_or_404(req.model)
        run = _Run(pool, model)
        params = _params(req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed, _stops(req.stop))
        ids = await asyncio.to_thread(run.prompt_ids, req.text)
        await run.start([ids], params)
        text, last = "", None
        try:
            async for _, ev in run.events(request):
                text, last = text + ev.text, ev
        finally:
            run.cancel()
        return {"model": model.name, "generated_text": text, "finish_reason": last.finish_reason,
                "input_token_count": len(ids), "generated_token_count": last.completion_tokens}

    @app.post("/api/v1/task/tokenization")
    async def tokenization(req: TokenizationRequest) -> Response:
        model = model_or_404(req.model)

        def answer() -> bytes:  # a few MB of text take seconds: off the event loop, rendering included
            ids = model.tokenizer.encode_batch([req.text])[0]
            return json.dumps({"model": model.name, "token_count": len(ids), "token_ids": ids,
                               "tokens": [model.tokenizer.decode([i]) for i in ids]}).encode()

        return Response(await asyncio.to_thread(answer), media_type="application/json")

    return _guard(app, metrics, api_key, max_body_bytes)


def _guard(app: FastAPI, metrics: ServeMetrics, api_key: str | None, max_body_bytes: int) -> Any:
    """ASGI wrapper: checks the API key, bounds the body, counts responses by route and status
    (unknown paths as 'other', to bound the labels). Before FastAPI, so that it covers every path
    (the API docs too) and a body over the limit is never buffered whole."""
    routes = {getattr(r, "path", None) for r in app.routes}

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        async def refuse(status: int, message: str, type_: str, headers: dict | None = None) -> None:
            await _error(status, message, type_, headers=headers)(scope, receive, counting_send)

        headers = Headers(scope=scope)
        if api_key is not None and scope["path"] != "/health":
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return await refuse(401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                                    "authentication_error", {"WWW-Authenticate": "Bearer"})
        too_large = f"request body over the server's limit of {max_body_bytes} bytes"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            return await refuse(413, too_large, "invalid_request_error")
        # Read here, counting, so that a body without Content-Length (chunked) is stopped at the limit too.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before it finished sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > max_body_bytes:
                return await refuse(413, too_large, "invalid_request_error")
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return body.pop() if body else await receive()

        await app(scope, replay, counting_send)

    wrapped.app = app
    return wrapped


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """Serve an app from a thread of this process (tests, notebooks, benchmarks): `with ... as url:`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


def serve_dtype(dtype: str, rows: int = 8) -> str:
    """fp32 or bf16; auto: bf16 on a GPU; on a CPU, the faster of the two at what a decode step
    of `rows` sequences mostly does (decode_linear_speed). Not the matmul peak: on a CPU without
    native bf16 arithmetic, large square bf16 matmuls run at half the fp32 speed while the
    decode step, whose weights stream from memory, runs 1.6x faster in bf16 (measured here)."""
    if dtype not in ("fp32", "bf16", "auto"):
        from stoker.config import ConfigError

        raise ConfigError(f"--dtype: expected fp32, bf16 or auto, got {dtype!r}")
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bf16"
    return "bf16" if decode_linear_speed(torch.bfloat16, rows) > decode_linear_speed(torch.float32, rows) else "fp32"


def decode_linear_speed(dtype, rows: int, seconds: float = 0.15) -> float:
    """Calls per second of the serving path's linear layer (packed for the CPU, as
    stoker.serve.models loads a model) on `rows` rows of a 768-wide activation, cycling over
    eight 768 x 3072 weights: 75 MB in fp32, more than a CPU's cache, so that the weights
    stream from memory as a model's do in a decode step. About 0.2 s a dtype, at this
    process's thread count."""
    import torch
    from torch import nn

    from stoker.models.gpt import pack_linears

    gen = torch.Generator().manual_seed(0)  # not the process's generator: probing draws nothing from it
    layers = nn.Sequential(*(nn.utils.skip_init(nn.Linear, 768, 3072) for _ in range(8)))
    with torch.no_grad():
        for p in layers.parameters():
            p.normal_(0, 0.02, generator=gen)
    layers.to(dtype)
    pack_linears(layers)
    x = torch.randn(rows, 768, generator=gen).to(dtype)
    with torch.inference_mode():
        for layer in layers:  # warm-up: first calls pick kernels
            layer(x)
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            for layer in layers:
                layer(x)
            calls += len(layers)
    return calls / elapsed


def serve(run_dirs: Sequence[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_loaded: int = 1, max_queue: int = 64, kv_budget_mb: int = 1024,
          max_body_mb: float = MAX_BODY_BYTES / 2**20, log_level: str = "info", batch_invariant: bool = False,
          prefill_chunk: int = 256, prefix_cache_mb: int = 256, dtype: str = "auto",
          adapters: Sequence[str] = (), max_adapters: int = 8, kv_keep_s: float = KEEP_SLOTS_S) -> None:
    """Serve `RUN_DIR` or `NAME=RUN_DIR` entries, and `NAME=DIR` adapters on them, until
    interrupted (what `stoker serve` runs)."""
    from stoker.config import ConfigError
    from stoker.serve.models import parse_adapters, parse_models

    for flag, value, least in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                               ("--kv-budget-mb", kv_budget_mb, 1), ("--prefill-chunk", prefill_chunk, 1),
                               ("--prefix-cache-mb", prefix_cache_mb, 0)):
        if value < least:
            raise ConfigError(f"{flag}: must be >= {least}, got {value}")
    if not max_body_mb > 0:
        raise ConfigError(f"--max-body-mb: must be > 0, got {max_body_mb}")
    if not 0 <= kv_keep_s < math.inf:
        raise ConfigError(f"--kv-keep-s: must be a finite number >= 0, got {kv_keep_s}")
    if api_key is not None and not api_key:
        raise ConfigError("--api-key (or $STOKER_API_KEY) is empty; give a key, or unset it to serve without one")
    runs = parse_models(run_dirs)
    pool = ModelPool(runs, adapters=parse_adapters(adapters, runs), max_adapters=max_adapters,
                     max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue,
                     kv_budget_bytes=kv_budget_mb << 20, batch_invariant=batch_invariant, prefill_chunk=prefill_chunk,
                     prefix_cache_bytes=prefix_cache_mb << 20, keep_slots_s=kv_keep_s,
                     dtype=(dtype := serve_dtype(dtype, max_batch)))
    app = create_app(pool, api_key, max_body_bytes=max(1, int(max_body_mb * 2**20)))
    sock = bind(host, port)
    names = [m.name for m in pool.models.values() if m.parent is None]
    extra = [f"{m.name} on {m.parent}" for m in pool.models.values() if m.parent]
    print(f"stoker serve: models {', '.join(names)} ({dtype})" + f", adapters {', '.join(extra)}" * bool(extra)
          + f" on {url_of(sock)}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        pool.close()
        sock.close()

