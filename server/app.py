"""The HTTP side: Starlette routes on uvicorn, the API key and Host checks, SSE.

Routes: GET /health (no key), GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions (also
without /v1), GET / and /static/* (the page: static files, no key; the page sends the key with its API calls).
Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, QueueFull
from .protocol import (ApiError, ChunkWriter, chat_params, chat_response, completion_params, completion_response,
                       error_body, parse_body)

log = logging.getLogger("dgguf.server")

MAX_BODY = 16 << 20          # bytes of a request body
KEEPALIVE_S = 10.0           # an SSE comment after this long without events (proxies; finds gone clients)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _api_error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj, event: str | None = None) -> bytes:
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return ((f"event: {event}\n" if event else "") + f"data: {data}\n\n").encode("utf-8", "replace")


class _Events:
    """A job's events, or ("disconnected",) when the client goes, or ("idle",) after `timeout` seconds; a job
    still queued past its deadline is dropped and gets the timeout error."""

    def __init__(self, engine: Engine, job, request: Request):
        self.engine, self.job = engine, job
        self._get = None
        self._gone = asyncio.ensure_future(self._watch(request))

    @staticmethod
    async def _watch(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def next(self, timeout: float | None = None):
        job = self.job
        if self._get is None:
            self._get = asyncio.ensure_future(job.events.get())
        if job.state == "queued" and job.deadline is not None:
            left = max(0.0, job.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        done, _ = await asyncio.wait({self._get, self._gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._get in done:
            ev, self._get = self._get.result(), None
            return ev
        if self._gone in done:
            return ("disconnected",)
        if job.state == "queued" and job.deadline is not None and time.monotonic() >= job.deadline \
                and self.engine.cancel(job):
            return ("error", 503, "timed out waiting in the queue (--timeout)", "server_error", "timeout")
        return ("idle",)

    def close(self) -> None:
        for t in (self._get, self._gone):
            if t is not None:
                t.cancel()


class Server:
    def __init__(self, engine: Engine, api_key: str | None = None):
        self.engine, self.api_key = engine, api_key
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="dgguf-prep")   # FIFO: keeps arrival order
        self.started = int(time.time())

    # --- plain routes ----------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.engine.model_id, "queue": self.engine.status()})

    def _model_card(self) -> dict:
        m = self.engine.model
        cfg = m.config
        return {"id": self.engine.model_id, "object": "model", "created": self.started, "owned_by": "dgguf",
                "meta": {"canvas_length": cfg.canvas_length, "ctx": m.ctx, "vocab_size": cfg.vocab_size,
                         "sampler": m.sampler_config().__dict__, "chat_template": bool(
                             m.has_tokenizer and m.tokenizer.template), "pinned_prefix": self.engine.pin}}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["id"] != self.engine.model_id:
            return _error(404, f"the model {request.path_params['id']!r} does not exist; this server has "
                               f"{self.engine.model_id!r}", code="model_not_found")
        return JSONResponse(self._model_card())

    async def static(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in STATIC:
            return _error(404, f"no such file: {name}", code="not_found")
        data = (resources.files("dgguf.server") / "static" / name).read_bytes()
        return Response(data, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    # --- generation --------------------------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"the body must be JSON with Content-Type: application/json (got {ctype or 'none'})",
                           code="unsupported_media_type")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise ApiError(413, f"the body is larger than {MAX_BODY >> 20} MiB", code="body_too_large")
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    def _prepare(self, kind: str, body: dict):
        m, mid = self.engine.model, self.engine.model_id
        return completion_params(body, m, mid) if kind == "completion" else chat_params(body, m, mid)[0]

    async def _generate(self, request: Request, kind: str) -> Response:
        try:
            body = await self._body(request)
            params = await asyncio.get_running_loop().run_in_executor(self.prep, self._prepare, kind, body)
            job = self.engine.submit(params)
        except ApiError as e:
            return _api_error(e)
        except ClientDisconnect:
            return Response(status_code=400)
        except QueueFull as e:
            return _error(429, f"the server is busy: {self.engine.queue_size} requests are waiting (--queue); retry "
                               f"after {e.retry_after} s", "rate_limit_error", None, "queue_full",
                          {"Retry-After": str(e.retry_after)})
        build = completion_response if kind == "completion" else chat_response
        if params.stream:
            return StreamingResponse(self._stream(job, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events = _Events(self.engine, job, request)
        try:
            while True:
                ev = await events.next()
                if ev[0] == "disconnected":
                    self.engine.cancel(job)
                    return Response(status_code=499)   # nobody reads it
                if ev[0] == "error":
                    return _error(ev[1], ev[2], ev[3], None, ev[4])
                if ev[0] == "done":
                    return JSONResponse(build(job, ev[1]))
        finally:
            events.close()

    async def _stream(self, job, request: Request):
        writer = ChunkWriter(job)
        events = _Events(self.engine, job, request)
        finished = False
        canvas = job.params.canvas
        try:
            for c in writer.first():
                yield _sse(c)
            while True:
                ev = await events.next(KEEPALIVE_S)
                kind = ev[0]
                if kind == "disconnected":
                    return
                if kind == "idle":
                    yield b": keep-alive\n\n"
                elif kind == "delta":
                    for c in writer.delta(ev[1]):
                        yield _sse(c)
                elif kind in ("canvas", "queue"):
                    yield _sse(ev[1], kind)
                elif kind == "start":
                    if canvas:
                        yield _sse({"canvas_length": self.engine.model.config.canvas_length,
                                    "max_tokens": job.params.max_tokens, "seed": job.params.seed}, "start")
                elif kind == "error":
                    finished = True
                    yield _sse(error_body(ev[2], ev[3], None, ev[4]))
                    return
                elif kind == "done":
                    finished = True
                    for c in writer.end(ev[1]):
                        yield _sse(c)
                    if canvas:
                        yield _sse(writer.stats(ev[1]), "stats")
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            events.close()
            if not finished:
                self.engine.cancel(job)   # the client went away: stop at the next step (or leave the queue)


class Guard:
    """ASGI middleware: the Host check (a loopback server answers only to loopback names, against DNS
    rebinding), the API key (every route but /health and the page's static files), and a last-resort
    OpenAI-style 500."""

    def __init__(self, app, api_key: str | None, loopback: bool):
        self.app, self.api_key, self.loopback = app, api_key, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.loopback:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name.lower() not in LOOPBACK_HOSTS:
                return await _error(403, f"this server listens on loopback only and does not answer for host "
                                         f"{host!r}", code="forbidden_host")(scope, receive, send)
        if self.api_key and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode(
                "latin-1")
            if not hmac.compare_digest(key.encode("utf-8", "replace"), self.api_key.encode("utf-8")):
                return await _error(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                    code="invalid_api_key")(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            log.exception("unhandled error")
            if not started:
                await _error(500, "internal server error", "server_error")(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None, loopback: bool = False):
    srv = Server(engine, api_key)

    async def http_error(request, exc: HTTPException):
        msg = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
               f"{request.url.path}"}.get(exc.status_code, exc.detail)
        return _error(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))

    routes = [Route("/health", srv.health), Route("/v1/models", srv.models), Route("/models", srv.models),
              Route("/v1/models/{id:path}", srv.model),
              Route("/v1/completions", srv.completions, methods=["POST"]),
              Route("/completions", srv.completions, methods=["POST"]),
              Route("/v1/chat/completions", srv.chat, methods=["POST"]),
              Route("/chat/completions", srv.chat, methods=["POST"]),
              Route("/", srv.static), Route("/static/{name}", srv.static)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.server = srv
    return Guard(app, api_key, loopback)
