"""The two generation routes' one path: OpenAI body -> GatewayRequest -> gateway (prepare, admit, start) ->
JSON or SSE, with the gateway's tags as response headers:

    x-thrifty-cache: hit | semantic-hit | miss | coalesced     (with a response cache)
    x-thrifty-cache-similarity: 0.9312                         (cache hits; 1.0 on exact hits)
    x-thrifty-route: <tier>; <reason>
    x-thrifty-cost: <USD>                                      (when known before the headers go out)
    x-thrifty-prefill-estimate: 1.25                           (seconds to the first token, when judged)

Every check that can fail happens before the request is admitted, so bad input changes no state.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from thrifty.config import ServerSettings
from thrifty.errors import InvalidRequestError
from thrifty.gateway.gateway import Gateway
from thrifty.gateway.request import GatewayOutput, GatewayRequest, Reply
from thrifty.server import schemas as s
from thrifty.server.admission import Admission, Ticket
from thrifty.server.deadline import ESTIMATE_HEADER
from thrifty.server.key_limits import KeyLimits
from thrifty.server.metrics import ServerMetrics
from thrifty.server.requests import Caller, chat_request, completion_request, max_tokens_param
from thrifty.server.responses import Formatter, run_to_end

CACHE_HEADER = "x-thrifty-cache"
SIMILARITY_HEADER = "x-thrifty-cache-similarity"
ROUTE_HEADER = "x-thrifty-route"
COST_HEADER = "x-thrifty-cost"
_COMPUTED = (None, "bypass", "miss")      # outputs an engine computed for this request (the server counts them)


class _Stream(StreamingResponse):
    """An SSE response that releases its request's admission ticket however the stream ends."""

    def __init__(self, content, admission: Admission, ticket: Ticket, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.admission, self.ticket = admission, ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release(self.ticket)


class Generation:
    def __init__(self, gateway: Gateway, settings: ServerSettings, metrics: ServerMetrics,
                 admission: Admission, limits: KeyLimits | None = None) -> None:
        self.gateway, self.settings, self.metrics, self.admission = gateway, settings, metrics, admission
        self.limits = limits or KeyLimits(gateway.ledger.spend)   # virtual keys' rates and budgets
        self.formatter = Formatter(gateway.tokenizer)

    def _prepare(self, body: s.CompletionRequest | s.ChatCompletionRequest, caller: Caller, chat: bool):
        try:
            request = (chat_request if chat else completion_request)(body, self.settings, caller)
            return request, self.gateway.prepare(request)
        except InvalidRequestError as e:
            if e.param == "max_tokens":
                e.param = max_tokens_param(body)
            raise

    async def answer(self, body: s.CompletionRequest | s.ChatCompletionRequest, request: Request,
                     chat: bool) -> Response:
        key = request.scope.get("state", {}).get("api_key")
        gw_request, prepared = self._prepare(body, Caller.of(request.headers, key), chat)
        if key is not None:
            self.limits.admit(key)
        ticket = self.admission.admit(prepared)
        try:
            reply = await self.gateway.start(prepared)
            self.metrics.observe_reply(reply)
            outputs = self._metered(reply, ticket, gw_request.key_id)
            first = None
            if body.stream and reply.route is None:  # several tiers: fallback must be over before the first byte
                outputs, first = await _primed(outputs)
        except BaseException:
            self.admission.release(ticket)
            raise
        headers = _cache_headers(reply)
        if ticket.estimate_s is not None:
            headers[ESTIMATE_HEADER] = f"{ticket.estimate_s:.2f}"
        k = gw_request.params.logprobs
        if body.stream:
            known = first or reply
            headers.update(_route_headers(known.route, reply.cost))
            model = known.tier or self.gateway.target(gw_request.model) or gw_request.model
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            content = self.formatter.stream(outputs, gw_request.request_id, model, chat, k, include_usage)
            return _Stream(content, self.admission, ticket, headers)
        try:
            out = await run_to_end(outputs, request.is_disconnected)
        finally:
            self.admission.release(ticket)
        if out is None:  # the client left; nobody reads this
            return Response(status_code=499)
        result = (self.formatter.chat if chat else self.formatter.complete)(out, gw_request.request_id, k)
        headers.update(_route_headers(out.route, out.cost))
        return JSONResponse(result.model_dump(mode="json"), headers=headers)

    async def _metered(self, reply: Reply, ticket: Ticket, key_id: str | None) -> AsyncIterator[GatewayOutput]:
        """The reply's outputs; books metrics and the key's tokens; the request leaves the admission count when
        they end."""
        start = time.monotonic()
        last: GatewayOutput | None = None
        gen = reply.outputs
        try:
            async for out in gen:
                if last is None:
                    self.admission.started(ticket)
                last = out
                yield out
        finally:
            await gen.aclose()
            self.admission.release(ticket)
            if key_id is not None and last is not None and last.usage is not None:
                self.limits.record_tokens(key_id, last.usage.prompt_tokens + last.usage.completion_tokens)
            finished = last is not None and last.finished and last.finish_reason != "abort"
            if reply.cache not in _COMPUTED:
                if finished:
                    self.metrics.observe_served(last)
            elif finished:
                self.metrics.observe_finished(last, time.monotonic() - start)
            else:
                self.metrics.aborted.inc()


async def _primed(source: AsyncIterator[GatewayOutput]) -> tuple[AsyncIterator[GatewayOutput], GatewayOutput | None]:
    """`source` with its first output already awaited: routing and fallback are done before the
    response's headers (its first bytes) go out."""
    try:
        first = await anext(source)
    except StopAsyncIteration:
        first = None

    async def chained() -> AsyncIterator[GatewayOutput]:
        try:
            if first is not None:
                yield first
                async for out in source:
                    yield out
        finally:
            await source.aclose()

    return chained(), first


def _cache_headers(reply: Reply) -> dict[str, str]:
    if reply.cache is None:
        return {}
    out = {CACHE_HEADER: "miss" if reply.cache == "bypass" else reply.cache}
    if reply.similarity is not None:
        out[SIMILARITY_HEADER] = f"{reply.similarity:.4f}"
    return out


def _route_headers(route: str | None, cost: float | None) -> dict[str, str]:
    out: dict[str, Any] = {}
    if route:
        out[ROUTE_HEADER] = route.encode("ascii", "replace").decode()
    if cost is not None:
        out[COST_HEADER] = f"{cost:.8f}"
    return out
