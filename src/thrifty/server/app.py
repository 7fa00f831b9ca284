"""The FastAPI app: OpenAI routes, the cost report, health, metrics, behind the guard middleware (API keys,
body size, counting).

The app only speaks HTTP: every generation goes to the gateway (thrifty.server.generation), which owns the
caches, coalescing, routing, fallback and the ledger; the app reads engine state only through the
engines' stats snapshots.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from thrifty.config import CacheSettings, RouterSettings, ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.errors import ThriftyError
from thrifty.gateway.gateway import Gateway
from thrifty.server import dashboard
from thrifty.server import schemas as s
from thrifty.server.admission import Admission
from thrifty.server.deadline import DeadlineAdmission
from thrifty.server.errors import error_response, validation_error
from thrifty.server.generation import Generation
from thrifty.server.guard import Guard
from thrifty.server.metrics import CONTENT_TYPE, ServerMetrics

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorResponse, "description": text} for code, text in (
        (400, "Invalid request"), (401, "Missing or wrong API key"), (402, "The key's budget is spent"),
        (404, "Unknown model"), (413, "Request body too large"),
        (429, "Too many waiting requests, prompts queued past the timeout, or the key's requests / tokens per minute"), (500, "Server error"),
        (503, "Shutting down"))}
_STREAM_DOC = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
               "description": "JSON, or server-sent events when stream is true"}


def create_app(engine: AsyncEngine, model_name: str, settings: ServerSettings | None = None,
               api_key: str | None = None, aliases: tuple[str, ...] = (), cache=None,
               cache_settings: CacheSettings | None = None, timeout_s: float = 120.0) -> FastAPI:
    """The OpenAI-compatible app for one engine: a gateway with one free local tier named `model_name`
    (its cost ledger in memory). `api_key` None: no authentication. `cache`: a
    thrifty.gateway.cache.ResponseCache (None: no response cache, no coalescing). `timeout_s`: the tier's
    timeout for its first token (the deadline admission judges prompts against)."""
    from thrifty.gateway.backends import LocalBackend
    from thrifty.gateway.costs import FREE
    from thrifty.gateway.gateway import Tier
    from thrifty.gateway.router import FixedRouter

    tier = Tier(model_name, LocalBackend(model_name, engine), FREE, tuple(aliases), timeout_s)
    gateway = Gateway([tier], FixedRouter(model_name), RouterSettings(retries=0), cache=cache,
                      cache_settings=cache_settings)
    return create_gateway_app(gateway, settings, api_key)


def create_gateway_app(gateway: Gateway, settings: ServerSettings | None = None, api_key: str | None = None,
                       cache=None, cache_settings: CacheSettings | None = None, keys=None) -> FastAPI:
    """The OpenAI-compatible app over a gateway (thrifty.gateway.tiers.build_gateway). `cache`: put the
    gateway's tiers behind this response cache instead of the gateway's own. `keys`: a
    thrifty.server.api_keys.KeyStore of virtual keys (each with its tenant, limits and budget); `api_key` is
    then the master key, with no limits."""
    settings = settings or ServerSettings()
    if cache is not None:
        gateway = gateway.with_cache(cache, cache_settings)
    stats = ServerMetrics(gateway, lambda: admission.num_waiting())
    admission = Admission(settings.max_waiting_requests,
                          lambda: sum(e.num_running for e in gateway.engine_snapshots()),
                          lambda reason: stats.rejected.labels(reason).inc(),
                          DeadlineAdmission(gateway.deadline_state) if settings.deadline_admission else None)
    generation = Generation(gateway, settings, stats, admission)
    created = int(time.time())
    accepted = sorted(gateway.accepted_names())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # before the port opens: /health never says ok while kernels are unbuilt or the first forward is ahead
        await gateway.warm_up()
        yield
        admission.draining = True
        await gateway.close()

    app = FastAPI(title="thrifty", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM server (completions, chat completions, models).")
    app.state.gateway = gateway

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

    @app.post("/v1/completions", response_model=s.CompletionResponse,
              responses={200: _STREAM_DOC, **_ERRORS})
    async def completions(body: s.CompletionRequest, request: Request) -> Response:
        return await generation.answer(body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=s.ChatCompletionResponse,
              responses={200: _STREAM_DOC, **_ERRORS})
    async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Response:
        return await generation.answer(body, request, chat=True)

    @app.get("/v1/models", response_model=s.ModelList, responses={401: _ERRORS[401]})
    async def models() -> s.ModelList:
        return s.ModelList(data=[s.ModelCard(id=name, created=created, max_model_len=gateway.max_model_len(name))
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
        if admission.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> Response:
        """The live dashboard: a page without data (public), polling the JSON below (which needs the key)."""
        return HTMLResponse(dashboard.page())

    @app.get("/v1/thrifty/dashboard", responses={401: _ERRORS[401]})
    async def dashboard_data() -> Response:
        """What the dashboard shows, cumulative since the start: traffic, latency percentiles, engine state,
        cache and speculation rates, cost."""
        return JSONResponse(await run_in_threadpool(dashboard.snapshot, stats))

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(stats.render(), media_type=CONTENT_TYPE)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base_openapi()  # cached by FastAPI; the served model names are documented as the only ones
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = schema["components"]["schemas"][name]["properties"]
            props["model"] = {"type": "string", "title": "Model", "enum": accepted}
        _link_models(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Guard, metrics=stats, api_key=api_key, max_body_bytes=settings.max_body_bytes, keys=keys)
    return app


def _link_models(schema: dict[str, Any]) -> None:
    """OpenAPI links from GET /v1/models to the generation routes, with the listed model's id: what a client
    does (list, then ask), and what stateful fuzzers (schemathesis) follow to chain the calls."""
    paths = schema["paths"]
    ok = paths["/v1/models"]["get"]["responses"]["200"]
    model = "$response.body#/data/0/id"
    ok["links"] = {
        "ChatWithListedModel": {"operationId": paths["/v1/chat/completions"]["post"]["operationId"],
                                "requestBody": {"model": model, "max_tokens": 4,
                                                "messages": [{"role": "user", "content": "hi"}]},
                                "description": "a chat completion with the first listed model"},
        "CompleteWithListedModel": {"operationId": paths["/v1/completions"]["post"]["operationId"],
                                    "requestBody": {"model": model, "prompt": "hi", "max_tokens": 4},
                                    "description": "a completion with the first listed model"}}
