"""The FastAPI app: OpenAI routes, the cost report, health, metrics; a guard middleware for API keys,
body size and counting.

Every generation goes cache -> gateway (route, fallback, cascade, cost ledger) -> tier. Responses carry
`x-thrifty-route: <tier>; <reason>` and, when the answer is whole before the headers go out (no
streaming), `x-thrifty-cost: <USD>`; a streamed answer's cost is in the ledger (GET /v1/thrifty/report).
"""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thrifty.config import CacheSettings, RouterSettings, ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.errors import ThriftyError
from thrifty.gateway.gateway import Gateway
from thrifty.server import schemas as s
from thrifty.server.errors import AuthenticationError, PayloadTooLargeError, error_response, validation_error
from thrifty.server.caching import ServerCache
from thrifty.server.metrics import CONTENT_TYPE
from thrifty.server.serving import EngineClient, Prepared

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorResponse, "description": text} for code, text in (
        (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
        (413, "Request body too large"), (429, "Too many waiting requests"), (500, "Server error"),
        (503, "Shutting down"))}
_STREAM_DOC = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
               "description": "JSON, or server-sent events when stream is true"}
_PUBLIC_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect")


class _Guard:
    """Pure ASGI middleware: API key (401), body-size limit (413), request counting by status."""

    def __init__(self, app: ASGIApp, client: EngineClient, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.client, self.api_key, self.max_body = app, client, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ROUTES else "other"
        status_box = [500]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            error = self._authorize(scope, path)
            if error is None:
                receive, error = await self._read_body(scope, receive)
            if error is not None:
                await error_response(error)(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.client.metrics.requests.labels(endpoint, str(status_box[0])).inc()

    def _authorize(self, scope: Scope, path: str) -> Exception | None:
        if self.api_key is None or path in _PUBLIC_PATHS:
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if not auth:
            return AuthenticationError("no API key given", "send the header 'Authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return AuthenticationError("the API key is not valid", "check the key the server was started with")
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, Exception | None]:
        """Buffer the body (at most max_body bytes) and replay it; 413 beyond the limit."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        too_large = PayloadTooLargeError(f"the request body is larger than this server's limit of {self.max_body} "
                                         "bytes", "send a smaller request")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return receive, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None  # the client left; the app will see the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/thrifty/report", "/health", "/metrics")
ROUTE_HEADER = "x-thrifty-route"
COST_HEADER = "x-thrifty-cost"


class _Stream(StreamingResponse):
    """An SSE response that releases its request's admission ticket however the stream ends."""

    def __init__(self, content, client: EngineClient, prepared: Prepared,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.client, self.prepared = client, prepared

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.client.release(self.prepared)


def create_app(engine: AsyncEngine, model_name: str, settings: ServerSettings | None = None,
               api_key: str | None = None, aliases: tuple[str, ...] = (), cache=None,
               cache_settings: CacheSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app for one engine: a gateway with one free local tier named `model_name`
    (its cost ledger in memory). `api_key` None: no authentication. `cache`: a
    thrifty.gateway.cache.ResponseCache (None: no response cache, no coalescing)."""
    from thrifty.gateway.backends import LocalBackend
    from thrifty.gateway.costs import FREE
    from thrifty.gateway.gateway import Tier
    from thrifty.gateway.router import FixedRouter

    tier = Tier(model_name, LocalBackend(model_name, engine), FREE, tuple(aliases))
    gateway = Gateway([tier], FixedRouter(model_name), RouterSettings(retries=0))
    return create_gateway_app(gateway, settings, api_key, cache, cache_settings)


async def _primed(source: AsyncIterator) -> AsyncIterator:
    """`source` with its first output already awaited: routing and fallback are done before the
    response's headers (its first bytes) go out."""
    try:
        first = await anext(source)
    except StopAsyncIteration:
        first = None

    async def chained() -> AsyncIterator:
        try:
            if first is not None:
                yield first
                async for out in source:
                    yield out
        finally:
            await source.aclose()

    return chained()


def create_gateway_app(gateway: Gateway, settings: ServerSettings | None = None, api_key: str | None = None,
                       cache=None, cache_settings: CacheSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app over a gateway's tiers (thrifty.gateway.tiers.build_gateway)."""
    settings = settings or ServerSettings()
    client = EngineClient(gateway, settings)
    client.cache = ServerCache(client, cache, cache_settings or CacheSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        client.draining = True
        await gateway.close()
        if cache is not None:
            await cache.drain()
            cache.close()

    app = FastAPI(title="thrifty", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM server (completions, chat completions, models).")
    app.state.client = client

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        detail = {404: f"no such route: {where}; see /docs for the API",
                  405: f"method not allowed: {where}"}.get(exc.status_code, exc.detail)
        return error_response(StarletteHTTPException(exc.status_code, detail, exc.headers))

    @app.exception_handler(ThriftyError)
    async def _on_thrifty(request: Request, exc: ThriftyError) -> Response:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    def route_headers(p: Prepared) -> dict[str, str]:
        out = {}
        route = p.route or gateway.static_route(p.target)
        if route:
            out[ROUTE_HEADER] = route.encode("ascii", "replace").decode()
        if p.cost is not None:
            out[COST_HEADER] = f"{p.cost:.8f}"
        return out

    async def run(prepared: Prepared, body: s.CompletionRequest | s.ChatCompletionRequest, request: Request,
                  chat: bool) -> Response:
        try:  # the cache answers, or joins an identical request in flight, or starts the generation
            source, headers = await client.cache.source(prepared, client.cache.plan(prepared, body, request, chat))
            if source is None:
                source = client.generate(prepared)
            if prepared.stream and gateway.static_route(prepared.target) is None:
                source = await _primed(source)  # several tiers: fallback must be over before the first byte
        except BaseException:
            client.release(prepared)
            raise
        if prepared.stream:
            return _Stream(client.stream(prepared, chat, source), client, prepared,
                           {**headers, **route_headers(prepared)})
        try:
            result = await (client.chat if chat else client.complete)(prepared, request.is_disconnected, source)
        finally:
            client.release(prepared)
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result.model_dump(mode="json"), headers={**headers, **route_headers(prepared)})

    @app.post("/v1/completions", response_model=s.CompletionResponse,
              responses={200: _STREAM_DOC, **_ERRORS})
    async def completions(body: s.CompletionRequest, request: Request) -> Response:
        return await run(client.prepare_completion(body), body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=s.ChatCompletionResponse,
              responses={200: _STREAM_DOC, **_ERRORS})
    async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Response:
        return await run(client.prepare_chat(body), body, request, chat=True)

    @app.get("/v1/models", response_model=s.ModelList, responses={401: _ERRORS[401]})
    async def models() -> s.ModelList:
        def context(name: str) -> int | None:
            engine = gateway.local_engine(None if name == "auto" else name)
            return engine.engine.max_model_len if engine is not None and name != "auto" else None

        return s.ModelList(data=[s.ModelCard(id=name, created=client.created, max_model_len=context(name))
                                 for name in gateway.listed_names()])

    @app.get("/v1/thrifty/report", responses={401: _ERRORS[401], 400: _ERRORS[400]})
    async def report(since: str | None = None) -> Response:
        """Cost and savings from the ledger, by tier and overall (`since`: an ISO 8601 date or time)."""
        from thrifty.errors import InvalidRequestError
        from thrifty.gateway.ledger import parse_since

        try:
            start = parse_since(since)
        except ThriftyError as e:
            raise InvalidRequestError(e.message, "use e.g. 2025-01-31 or 2025-01-31T08:00:00+00:00",
                                      param="since") from None
        result = await run_in_threadpool(gateway.ledger.report, start, gateway.names)
        return JSONResponse(result.as_dict())

    @app.get("/health", response_model=s.Health)
    async def health() -> Response:
        if client.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(client.metrics.render(), media_type=CONTENT_TYPE)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base_openapi()  # cached by FastAPI; the served model names are documented as the only ones
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = schema["components"]["schemas"][name]["properties"]
            props["model"] = {"type": "string", "title": "Model", "enum": sorted(client.accepted_names)}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_Guard, client=client, api_key=api_key, max_body_bytes=settings.max_body_bytes)
    return app
