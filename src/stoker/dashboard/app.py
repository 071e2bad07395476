"""The dashboard's HTTP side: a JSON API over run directories, the job store and `stoker serve`
servers, and the static page that draws it (static/: no build step, no CDN).

It keeps no state of its own: every answer is read afresh from the runs directory, the job
store, or the servers. Security as `stoker serve`: 127.0.0.1 by default; with an API key every
/api path but /api/info needs `Authorization: Bearer KEY`; cancel and resubmit need a key to be
set at all; a POST must be JSON (a page on another site cannot send one without the browser
asking first, and it is never allowed); the Host header must name this server when it listens
on a loopback address (a DNS-rebinding page is refused); no path outside the runs directory
is ever read.
"""

from __future__ import annotations

import hmac
import math
import time
import urllib.error
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from stoker.config import ConfigError
from stoker.jobs.policy import DONE, WAITING
from stoker.runs import RunDir, find_runs, is_run_dir

LOG_TAIL_BYTES = 64 << 10
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SERVE_TIMEOUT_S = 5.0


class DashboardError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Playground(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=2)


class Settings:
    """What one dashboard shows: a runs directory, a jobs home, and `stoker serve` URLs."""

    def __init__(self, runs: str | Path = "runs", jobs_home: str | Path | None = None, servers: list[str] = (),
                 api_key: str | None = None, serve_api_key: str | None = None):
        from stoker.jobs.store import default_home

        self.runs = Path(runs).resolve()
        self.jobs_home = Path(jobs_home) if jobs_home is not None else default_home()
        self.servers = [s.rstrip("/") for s in servers]
        for s in self.servers:
            if not s.startswith(("http://", "https://")):
                raise ConfigError(f"--serve: expected a URL such as http://127.0.0.1:8000, got {s!r}")
        if api_key is not None and not api_key:
            raise ConfigError("--api-key (or $STOKER_API_KEY) is empty; give a key, or unset it to run without one")
        self.api_key = api_key
        self.serve_api_key = serve_api_key if serve_api_key is not None else api_key


# --- runs ----------------------------------------------------------------------------------

def run_at(settings: Settings, name: str) -> RunDir:
    """The run `name` (a path relative to the runs directory), or 404: never a path outside it,
    through `..`, an absolute path or a symbolic link, never a hidden folder, never a folder
    that is not a run."""
    missing = DashboardError(404, f"no run {name[:200]!r} under the runs directory")
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or "\0" in name \
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise missing
    try:
        path = (settings.runs / name).resolve()
        if not path.is_relative_to(settings.runs) or not path.is_dir() or not is_run_dir(path):
            raise missing
    except (OSError, ValueError):  # a name too long for the file system, say
        raise missing from None
    return RunDir(path, name)


def run_detail(run: RunDir) -> dict:
    return {**run.summary(), "config": run.config(), "model_config": run.model(), "layout_detail": run.layout(),
            "checkpoint_list": run.checkpoints(), "adapter_list": run.adapters()}


# --- jobs ----------------------------------------------------------------------------------

def _client(settings: Settings, write: bool = False):
    """The job store's client, or None while there is none (viewing never creates one)."""
    from stoker.jobs.client import Client

    if not write and not (settings.jobs_home / "jobs.db").exists():
        return None
    return Client(settings.jobs_home, autostart=write)


def jobs_overview(settings: Settings) -> dict:
    c = _client(settings)
    if c is None:
        return {"home": str(settings.jobs_home), "exists": False, "queues": [], "jobs": []}
    try:
        try:
            queues = [dict(vars(q), borrowed=q.borrowed) for q in c.queues()]
        except ConfigError as e:  # queues.toml as it is now cannot be read: say so, as `stoker jobs` does
            raise DashboardError(409, str(e)) from None
        jobs = [_job_row(info) for info in c.store.list()]
        waiting = [j["id"] for j in jobs if j["state"] in WAITING]
        try:
            why = {i: w.reasons for i, w in c.explain(waiting).items()}
        except ConfigError:  # a cluster that cannot be asked: each job alone, the error on its own
            why = {i: _why(c, i) for i in waiting}
        for j in jobs:
            if j["id"] in why:
                j["why"] = why[j["id"]]
        return {"home": str(settings.jobs_home), "exists": True, "queues": queues, "jobs": jobs}
    finally:
        c.close()


def _job_row(info) -> dict:
    d = info.to_dict()
    d.pop("history", None)
    return d


def _why(client, job_id: int) -> list[str]:
    try:
        return client.why(job_id).reasons
    except ConfigError as e:
        return [str(e)]


def job_detail(settings: Settings, job_id: int) -> dict:
    c = _client(settings)
    if c is None:
        raise DashboardError(404, f"no job store at {settings.jobs_home}")
    try:
        info = c.store.get(job_id)
    except ConfigError as e:
        raise DashboardError(404, str(e)) from None
    try:
        return {**info.to_dict(), "why": _why(c, job_id), "workdir": info.spec.workdir if info.spec else None}
    finally:
        c.close()


def job_log(settings: Settings, job_id: int, tail: int = LOG_TAIL_BYTES) -> dict:
    c = _client(settings)
    if c is None:
        raise DashboardError(404, f"no job store at {settings.jobs_home}")
    try:
        info = c.store.get(job_id, history=False)
        path = c.log_path(job_id)
        if info.backend != "local" and info.remote_id:  # the cluster may keep them (Kubernetes: the pods')
            data = "".join(c.logs(job_id)).encode()
            return {"text": data[-tail:].decode(errors="replace"), "bytes": len(data), "truncated": len(data) > tail}
    except ConfigError as e:
        raise DashboardError(404, str(e)) from None
    finally:
        c.close()
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - tail))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return {"text": "", "bytes": 0, "truncated": False}
    return {"text": text, "bytes": size, "truncated": size > tail}


def job_action(settings: Settings, job_id: int, action: str) -> dict:
    c = _client(settings, write=True)
    try:
        try:
            info = c.store.get(job_id, history=False)
        except ConfigError as e:
            raise DashboardError(404, str(e)) from None
        try:
            if action == "cancel":
                return {"id": job_id, "state": c.cancel(job_id)}
            if info.backend == "local":  # this machine's queue requeues by itself: run the same spec anew
                if info.state not in DONE:
                    raise ConfigError(f"job {job_id} is {info.state}: only a finished job is submitted again")
                return {"id": c.submit(info.spec), "was": job_id}
            return {"id": c.resubmit(job_id), "was": job_id}
        except ConfigError as e:  # the job is in the wrong state for it
            raise DashboardError(409, str(e)) from None
    finally:
        c.close()


# --- served models -------------------------------------------------------------------------

def _server(settings: Settings, index: int):
    from stoker.serve.client import Client

    if not 0 <= index < len(settings.servers):
        raise DashboardError(404, f"no server {index}; this dashboard watches {len(settings.servers)}")
    return Client(settings.servers[index], api_key=settings.serve_api_key or "", timeout=SERVE_TIMEOUT_S)


def _reach(call) -> tuple[Any, str | None]:
    from stoker.serve.client import ServeError

    try:
        return call(), None
    except ServeError as e:
        return None, e.message
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"cannot reach the server ({getattr(e, 'reason', None) or e})"


def servers(settings: Settings) -> list[dict]:
    out = []
    for i, url in enumerate(settings.servers):
        c = _server(settings, i)
        models, error = _reach(lambda: c._json("/v1/models")["data"])
        out.append({"index": i, "url": url, "ok": error is None, "error": error, "models": models or []})
    return out


def server_metrics(settings: Settings, index: int) -> dict:
    c = _server(settings, index)

    def text() -> str:
        with c._open("/metrics") as r:
            return r.read().decode()

    body, error = _reach(text)
    if error is not None:
        return {"ok": False, "error": error, "time": time.time(), "models": {}}
    return {"ok": True, "error": None, "time": time.time(), "models": parse_metrics(body)}


def parse_metrics(text: str) -> dict[str, dict]:
    """Per model: tokens/s, queue depth, running sequences, tokens generated, requests finished,
    and time-to-first-token and request-latency percentiles (p50, p90, p99, since the server
    started, interpolated within histogram buckets as Prometheus' histogram_quantile does)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}

    def model(name: str) -> dict:
        return out.setdefault(name, {"tokens_per_s": 0.0, "queue_depth": 0.0, "running": 0.0, "generated_tokens": 0.0,
                                     "requests": 0.0, "memory_bytes": 0.0})

    gauges = {"stoker_tokens_per_second": "tokens_per_s", "stoker_queue_depth": "queue_depth",
              "stoker_running_sequences": "running", "stoker_generated_tokens_total": "generated_tokens",
              "stoker_request_latency_seconds_count": "requests", "stoker_model_memory_bytes": "memory_bytes"}
    hists = {"stoker_time_to_first_token_seconds_bucket": "ttft", "stoker_request_latency_seconds_bucket": "latency"}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.labels.get("model")
            if name is None:
                continue
            if s.name in gauges:
                model(name)[gauges[s.name]] += s.value
            elif s.name in hists:
                b = buckets.setdefault((name, hists[s.name]), {})
                le = float(s.labels["le"])
                b[le] = b.get(le, 0.0) + s.value  # summed over finish reasons
    for (name, kind), b in buckets.items():
        for q in (0.5, 0.9, 0.99):
            model(name)[f"{kind}_p{round(q * 100)}"] = quantile(q, sorted(b.items()))
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram [(upper bound, count)], None without counts."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: that bound is all that is known
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = upper, count
    return lower


def playground(settings: Settings, index: int, req: Playground):
    """The server's streamed completion, passed through as server-sent events."""
    from stoker.serve.client import ServeError

    c = _server(settings, index)
    c.timeout = 600.0
    body = {"model": req.model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": req.temperature, "stream": True}
    try:
        upstream = c._open("/v1/completions", body)
    except ServeError as e:  # the request's fault passes through; the server's, or a key it refuses, is a 502
        client_fault = 400 <= e.status < 500 and e.status not in (401, 403)
        raise DashboardError(e.status if client_fault else 502, f"the server answered {e.status}: {e.message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DashboardError(502, f"cannot reach the server ({getattr(e, 'reason', None) or e})") from None

    def lines():
        with upstream:
            for line in upstream:
                yield line

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


# --- the app -------------------------------------------------------------------------------

JOB_ID = PathParam(ge=1, le=2**63 - 1)  # SQLite's integers
SERVER = PathParam(ge=0, le=1 << 16)


def create_app(settings: Settings, allowed_hosts: set[str] | None = None) -> FastAPI:
    """The dashboard's ASGI app. `allowed_hosts`: Host header names accepted (default: any,
    which `dashboard()` narrows to loopback names when it listens on a loopback address)."""
    app = FastAPI(title="stoker dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(DashboardError)
    async def refused(request: Request, e: DashboardError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    def authorized(request: Request) -> bool:
        if settings.api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), settings.api_key.encode())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        header = request.headers.get("host", "")
        host = header.split("]")[0] + "]" if header.startswith("[") else header.rsplit(":", 1)[0]
        if allowed_hosts is not None and host not in allowed_hosts:
            return JSONResponse({"error": f"Host {host!r} is not this dashboard's; open it as "
                                          f"http://127.0.0.1:PORT"}, status_code=421)
        path = request.url.path
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] != "application/json":
            return JSONResponse({"error": "a POST must send Content-Type: application/json"}, status_code=415)
        if path.startswith("/api/") and path != "/api/info" and not authorized(request):
            return JSONResponse({"error": "missing or wrong API key; send 'Authorization: Bearer KEY'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self'; script-src 'self'")
        return response

    def static(name: str) -> Response:
        body = resources.files("stoker.dashboard").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/")
    def index() -> Response:
        return static("index.html")

    @app.get("/static/{name}")
    def asset(name: str) -> Response:
        if name not in STATIC:
            raise DashboardError(404, f"no file {name!r}")
        return static(name)

    @app.get("/api/info")
    def info(request: Request) -> dict:
        """Whether a key is needed (for anyone); where the data comes from (for those with it)."""
        public = {"auth": settings.api_key is not None, "actions": settings.api_key is not None}
        if not authorized(request):
            return public
        return {**public, "runs": str(settings.runs), "jobs_home": str(settings.jobs_home), "servers": settings.servers}

    @app.get("/api/runs")
    def runs() -> list[dict]:
        return [r.summary() for r in find_runs(settings.runs)] if settings.runs.is_dir() else []

    @app.get("/api/runs/{name:path}/metrics")
    def metrics(name: str, offset: int = Query(0, ge=0), inode: int | None = Query(None, ge=0)) -> dict:
        return run_at(settings, name).metrics(offset, inode)

    @app.get("/api/runs/{name:path}")
    def run(name: str) -> dict:
        return run_detail(run_at(settings, name))

    @app.get("/api/jobs")
    def jobs() -> dict:
        return jobs_overview(settings)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int = JOB_ID) -> dict:
        return job_detail(settings, job_id)

    @app.get("/api/jobs/{job_id}/log")
    def log(job_id: int = JOB_ID) -> dict:
        return job_log(settings, job_id)

    @app.post("/api/jobs/{job_id}/{action}")
    def act(action: str, job_id: int = JOB_ID) -> dict:
        if action not in ("cancel", "resubmit"):
            raise DashboardError(404, f"no action {action!r}; cancel or resubmit")
        if settings.api_key is None:
            raise DashboardError(403, "cancel and resubmit need the dashboard started with --api-key "
                                      "(or $STOKER_API_KEY)")
        return job_action(settings, job_id, action)

    @app.get("/api/serve")
    def serve_list() -> list[dict]:
        return servers(settings)

    @app.get("/api/serve/{index}/metrics")
    def serve_metrics(index: int = SERVER) -> dict:
        _server(settings, index)
        return server_metrics(settings, index)

    @app.post("/api/serve/{index}/completions")
    def complete(req: Playground, index: int = SERVER):
        return playground(settings, index, req)

    return app


def dashboard(runs: str | Path = "runs", host: str = "127.0.0.1", port: int = 8050, jobs_home: str | None = None,
              servers: list[str] = (), api_key: str | None = None, serve_api_key: str | None = None,
              log_level: str = "warning") -> None:
    """Serve the dashboard until interrupted (what `stoker dashboard` runs)."""
    import uvicorn

    from stoker.serve.server import bind, url_of

    settings = Settings(runs, jobs_home, list(servers), api_key, serve_api_key)
    if not settings.runs.is_dir():
        raise ConfigError(f"--runs: {settings.runs} is not a directory")
    sock = bind(host, port)
    hosts = LOOPBACK if host in LOOPBACK else None
    app = create_app(settings, allowed_hosts=hosts)
    print(f"stoker dashboard: runs {settings.runs}, jobs {settings.jobs_home}"
          + (f", servers {', '.join(settings.servers)}" if settings.servers else "")
          + f" on {url_of(sock)}" + (" (API key required)" if api_key else ""), flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()

