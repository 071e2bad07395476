"""The HTTP server: an OpenAI-compatible completions endpoint and a stable task-level API.

Errors follow the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`:
401 no or wrong API key, 404 unknown model, 400 prompt longer than the context, 422 a
malformed request (the field named), 429 queue full (with Retry-After).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from stoker.serve.engine import EngineClosed, Event, Handle, QueueFull, SamplingParams
from stoker.serve.metrics import ServeMetrics
from stoker.serve.models import Model, ModelPool, UnknownModel

RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error(status: int, message: str, type_: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Body(BaseModel):
    # Fields of the public APIs that stoker does not implement (user, logprobs...) are ignored.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="stoker extension: sample from the K most likely tokens (0: all)")
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one completion per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None


class TextGenerationRequest(_Body):
    model: str | None = None
    text: str
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
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
        ids = self.model.tokenizer.encode(text) or [self.model.tokenizer.eot_id]
        if len(ids) >= self.model.context:
            raise APIError(400, f"prompt is {len(ids)} tokens; the context of model {self.model.name!r} is "
                                f"{self.model.context} tokens, so a prompt may hold at most {self.model.context - 1}",
                           param="prompt", type_="context_length_exceeded")
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

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        pending = len(self.handles)
        while pending:
            i, ev = await self.queue.get()
            if ev.error:
                raise RuntimeError(ev.error)
            pending -= ev.finish_reason is not None
            yield i, ev

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


def _params(max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
            stop: tuple[str, ...]) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)


def create_app(pool: ModelPool, api_key: str | None = None) -> FastAPI:
    """The ASGI app over a model pool; `api_key` set: every route but /health needs `Authorization: Bearer KEY`."""
    metrics: ServeMetrics = pool.metrics

    async def check_key(request: Request) -> None:
        if api_key is None or request.url.path == "/health":
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", "authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="stoker", description="Text in, text out, from stoker checkpoints.",
                  dependencies=[Depends(check_key)])

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        fields = [".".join(str(p) for p in err["loc"] if p != "body") or "body" for err in errs]
        msg = "; ".join(f"{f}: {err['msg']}" for f, err in zip(fields, errs))
        return _error(422, msg, "invalid_request_error", fields[0] if fields else None)

    def model_or_404(name: str | None) -> Model:
        try:
            return pool.get(name)
        except UnknownModel:
            raise APIError(404, f"model {name!r} not found; available: {', '.join(pool.names)}", param="model",
                           type_="not_found_error") from None

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": pool.names,
                "loaded": [m.name for m in pool.models.values() if m.engine is not None]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "stoker",
             "context_length": m.context, "loaded": m.engine is not None} for m in pool.models.values()]}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> dict | StreamingResponse:
        model = model_or_404(req.model)
        run = _Run(pool, model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        ids = [run.prompt_ids(p) for p in prompts]
        params = _params(req.max_tokens, req.temperature, req.top_k, req.top_p, req.seed, _stops(req.stop))
        await run.start(ids, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        usage = {"prompt_tokens": sum(map(len, ids)), "completion_tokens": 0, "total_tokens": 0}

        def add_usage(ev: Event) -> None:
            if ev.finish_reason:
                usage["completion_tokens"] += ev.completion_tokens
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

        if req.stream:
            async def sse() -> AsyncIterator[str]:
                try:
                    async for i, ev in run.events():
                        add_usage(ev)
                        if ev.text or ev.finish_reason:
                            choice = {"text": ev.text, "index": i, "logprobs": None, "finish_reason": ev.finish_reason}
                            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                    if req.stream_options and req.stream_options.include_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    run.cancel()  # the client went away: stop generating for it

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts, reasons = [""] * len(ids), [None] * len(ids)
        try:
            async for i, ev in run.events():
                texts[i] += ev.text
                reasons[i] = ev.finish_reason or reasons[i]
                add_usage(ev)
        finally:
            run.cancel()
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": usage}

    @app.post("/api/v1/task/text-generation")
    async def text_generation(req: TextGenerationRequest) -> dict:
        model = model_or_404(req.model)
        run = _Run(pool, model)
        ids = run.prompt_ids(req.text)
        await run.start([ids], _params(req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed,
                                       _stops(req.stop)))
        text, last = "", None
        try:
            async for _, ev in run.events():
                text, last = text + ev.text, ev
        finally:
            run.cancel()
        return {"model": model.name, "generated_text": text, "finish_reason": last.finish_reason,
                "input_token_count": len(ids), "generated_token_count": last.completion_tokens}

    @app.post("/api/v1/task/tokenization")
    async def tokenization(req: TokenizationRequest) -> dict:
        model = model_or_404(req.model)
        ids = model.tokenizer.encode(req.text)
        return {"model": model.name, "token_count": len(ids), "token_ids": ids,
                "tokens": [model.tokenizer.decode([i]) for i in ids]}

    return _count_requests(app, metrics)


def _count_requests(app: FastAPI, metrics: ServeMetrics) -> Any:
    """ASGI wrapper counting responses by route and status (unknown paths as 'other', to bound the labels)."""
    routes = {getattr(r, "path", None) for r in app.routes}

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await app(scope, receive, counting_send)

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


def serve(run_dirs: Sequence[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_loaded: int = 1, max_queue: int = 64, kv_budget_mb: int = 1024,
          log_level: str = "info") -> None:
    """Serve `RUN_DIR` or `NAME=RUN_DIR` entries until interrupted (what `stoker serve` runs)."""
    from stoker.config import ConfigError
    from stoker.serve.models import parse_models

    for flag, value, least in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                               ("--kv-budget-mb", kv_budget_mb, 1)):
        if value < least:
            raise ConfigError(f"{flag}: must be >= {least}, got {value}")
    pool = ModelPool(parse_models(run_dirs), max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue,
                     kv_budget_bytes=kv_budget_mb << 20)
    app = create_app(pool, api_key)
    sock = bind(host, port)
    print(f"stoker serve: models {', '.join(pool.names)} on {url_of(sock)}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        pool.close()
        sock.close()

