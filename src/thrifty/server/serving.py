"""OpenAI requests -> gateway requests -> OpenAI responses (whole or streamed as SSE).

`EngineClient` holds the gateway (the tiers: local engines and remote APIs, thrifty.gateway.gateway) and
the server limits. `prepare_completion` / `prepare_chat` check a request and turn it into prompt ids +
SamplingParams (tokenized and checked on the local engine of the tier it names; `auto`: the cheapest
local tier; a pinned remote tier: the remote checks); `complete` / `chat` answer with one JSON object,
`stream` with SSE chunks. Every check that can fail happens before anything is queued, so bad input
changes no state.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from thrifty.config import ServerSettings
from thrifty.engine.engine import RequestOutput
from thrifty.engine.sampling import SamplingParams
from thrifty.errors import InvalidRequestError
from thrifty.server import schemas as s
from thrifty.gateway.backends import TextLogprob, prompt_ids
from thrifty.server.errors import ModelNotServedError, ServerBusyError, ShuttingDownError, classify
from thrifty.server.token_text import token_bytes

if TYPE_CHECKING:
    from thrifty.gateway.gateway import Gateway

IsDisconnected = Callable[[], Awaitable[bool]]


def _unsupported(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} is not supported by this server yet", f"remove '{param}' from the request",
                               param=param)


@dataclass(slots=True)
class Prepared:
    """A request that passed every check: what goes to the gateway and how to answer."""

    request_id: str
    prompt_ids: list[int]           # tokenized by `tokenizer` (empty for a pinned remote tier)
    params: SamplingParams
    stream: bool
    include_usage: bool
    top_logprobs: int | None        # None: no logprobs in the answer
    admitted: bool = False          # counted in the server's active requests until released
    chat: bool = False
    messages: list[dict] | None = None   # chat, as {"role", "content"}
    prompt: Any = None                   # completions: text or token ids
    tokenizer: Any = None
    forward: dict[str, Any] = field(default_factory=dict)  # the client's OpenAI fields, for remote tiers
    target: str | None = None       # the tier the request names; None: `auto`
    requested: str = ""             # the model name as sent
    model: str = ""                 # the model name the answer shows (set to the tier that answered)
    tier: str | None = None         # set by the gateway / the cache
    route: str | None = None        # "tier; reason" (x-thrifty-route)
    cost: float | None = None       # USD (x-thrifty-cost)


# OpenAI fields a remote tier is not sent from the client's body (the gateway sets or replaces them)
_NOT_FORWARDED = {"model", "stream", "stream_options", "cache", "messages", "prompt"}


class EngineClient:
    def __init__(self, gateway: Gateway, settings: ServerSettings) -> None:
        from thrifty.server.metrics import ServerMetrics

        self.gateway = gateway
        self.engine = gateway.local_engine(None)   # the cheapest local tier's AsyncEngine (None: all remote)
        self.model_name = gateway.names[0]
        self.accepted_names = gateway.accepted_names()
        self.settings = settings
        self.created = int(time.time())
        self.draining = False
        self._active = 0
        self._token_cache: dict[tuple[int, int], tuple[str, list[int]]] = {}
        self._byte_level: dict[int, bool] = {}
        self.metrics = ServerMetrics(self)

    # ---- state -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer if self.engine is not None else None

    @property
    def max_model_len(self) -> int | None:
        return self.engine.engine.max_model_len if self.engine is not None else None

    def num_waiting(self) -> int:
        """Requests this server accepted that no engine is running yet (remote ones count as waiting)."""
        running = sum(len(e.engine.scheduler.running) for e in self.gateway.local_engines())
        return max(0, self._active - running)

    # ---- checks ------------------------------------------------------------------------------------
    def check_model(self, name: str) -> str | None:
        """The tier `name` pins (None: `auto`), or ModelNotServedError."""
        served, target = self.gateway.resolve(name)
        if not served:
            raise ModelNotServedError(name, "', '".join(self.gateway.listed_names()))
        return target

    def admit(self, p: Prepared) -> None:
        """Count `p` as active, or ServerBusyError when the waiting queue is full; release() undoes it."""
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise ShuttingDownError("the server is shutting down", "retry on another replica")
        limit = self.settings.max_waiting_requests
        if self.num_waiting() >= limit:
            self.metrics.rejected.labels("queue_full").inc()
            raise ServerBusyError(f"too many requests are waiting ({limit}); the server is at capacity")
        p.admitted = True
        self._active += 1

    def release(self, p: Prepared) -> None:
        if p.admitted:
            p.admitted = False
            self._active -= 1

    def _max_tokens(self, requested: int | None, num_prompt: int, default: int | None,
                    max_model_len: int | None) -> int:
        limit = self.settings.max_output_tokens
        if max_model_len is None:  # a remote tier: it knows its own context
            max_model_len = 1 << 62
        room = max_model_len - num_prompt
        if requested is not None and requested > limit:
            raise InvalidRequestError(f"max_tokens is {requested}, above this server's limit of {limit}",
                                      f"ask for at most {limit} tokens", param="max_tokens")
        if requested is not None and requested > room:
            raise InvalidRequestError(
                f"this model's context holds {max_model_len} tokens, but {num_prompt + requested} were "
                f"requested ({num_prompt} in the prompt, {requested} for the output)",
                "shorten the prompt or lower max_tokens", param="max_tokens")
        if requested is not None:
            return requested
        return max(1, min(default or limit, limit, room))

    def _check_prompt(self, ids: list[int], param: str, max_model_len: int) -> None:
        limit = self.settings.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens, above this server's limit of {limit}",
                                      "shorten the prompt", param=param)
        if len(ids) >= max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this model's context holds {max_model_len} "
                "(prompt plus at least one output token)", "shorten the prompt", param=param)

    def _params(self, req: s._SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if req.n is not None and req.n > 1:
            raise _unsupported("n", "n > 1 (several choices per request)")
        if req.logit_bias:
            raise _unsupported("logit_bias", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise InvalidRequestError("stream_options is only allowed with stream=true", param="stream_options")
        given = {k: getattr(req, k) for k in (
            "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "top_k", "min_p",
            "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
            "include_stop_str_in_output") if getattr(req, k) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)

    def _finish_prepare(self, prefix: str, req: s._SamplingFields, ids: list[int], param: str,
                        requested_max: int | None, default_max: int | None, top_logprobs: int | None,
                        engine: Any, target: str | None, **request: Any) -> Prepared:
        """Checks on `engine` (the local engine of the tier; None: a remote tier checks for itself)."""
        max_len = engine.engine.max_model_len if engine is not None else None
        if engine is not None:
            self._check_prompt(ids, param, max_len)
        params = self._params(req, self._max_tokens(requested_max, len(ids), default_max, max_len), top_logprobs)
        if engine is not None:
            engine.engine.validate(ids, params)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        forward = {k: v for k, v in req.model_dump(exclude_unset=True).items() if k not in _NOT_FORWARDED}
        p = Prepared(f"{prefix}-{uuid.uuid4().hex}", ids, params, bool(req.stream), include_usage, top_logprobs,
                     tokenizer=engine.tokenizer if engine is not None else None, forward=forward, target=target,
                     requested=req.model, model=target or req.model, **request)
        self.admit(p)
        return p

    def prepare_completion(self, req: s.CompletionRequest) -> Prepared:
        target = self.check_model(req.model)
        engine = self.gateway.local_engine(target)
        if req.echo:
            raise _unsupported("echo", "echo")
        if req.suffix:
            raise _unsupported("suffix", "suffix")
        if req.best_of is not None and req.best_of > 1:
            raise _unsupported("best_of", "best_of > 1")
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequestError(f"{len(prompt)} prompts in one request; batched prompts are not "
                                          "supported yet", "send one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise InvalidRequestError("the prompt is empty", "send at least one token", param="prompt")
        ids = prompt_ids(engine.tokenizer, False, None, prompt) if engine is not None else []
        if engine is not None and not ids:
            raise InvalidRequestError("the prompt is empty", "send at least one token", param="prompt")
        return self._finish_prepare("cmpl", req, ids, "prompt", req.max_tokens, 16, req.logprobs, engine, target,
                                    chat=False, prompt=prompt)

    def prepare_chat(self, req: s.ChatCompletionRequest) -> Prepared:
        target = self.check_model(req.model)
        engine = self.gateway.local_engine(target)
        if req.tools or req.functions:
            raise _unsupported("tools" if req.tools else "functions", "tool / function calling")
        if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
            raise _unsupported("tool_choice", "tool / function calling")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "structured output (response_format other than text)")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", "set logprobs to true",
                                      param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        ids = prompt_ids(engine.tokenizer, True, messages, None) if engine is not None else []
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        try:
            top = (req.top_logprobs or 0) if req.logprobs else None
            return self._finish_prepare("chatcmpl", req, ids, "messages", requested, None, top, engine, target,
                                        chat=True, messages=messages)
        except InvalidRequestError as e:
            if e.param == "max_tokens":
                e.param = param
            raise

    # ---- generation --------------------------------------------------------------------------------
    async def generate(self, p: Prepared) -> AsyncIterator[RequestOutput]:
        """The gateway's outputs for `p`; books metrics; leaving early aborts the request."""
        start = time.monotonic()
        last: RequestOutput | None = None
        try:
            async for out in self.gateway.generate(p):
                last = out
                yield out
        finally:
            self.release(p)
            if last is not None and last.finished and last.finish_reason != "abort":
                self.metrics.observe_finished(last, time.monotonic() - start)
            else:
                self.metrics.aborted.inc()

    # ---- formatting --------------------------------------------------------------------------------
    def usage(self, out: RequestOutput) -> s.UsageInfo:
        u = out.usage
        return s.UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                           total_tokens=u.prompt_tokens + u.completion_tokens,
                           prompt_tokens_details=s.PromptTokensDetails(cached_tokens=u.cached_tokens))

    def _token(self, token: int | str, tokenizer: Any = None) -> tuple[str, list[int]]:
        """A token's text (undecodable bytes as U+FFFD) and its exact bytes, as OpenAI's logprobs show them.
        A remote tier names its tokens by text already."""
        if isinstance(token, str):
            return token, list(token.encode())
        tokenizer = tokenizer or self.tokenizer
        key = (id(tokenizer), token)
        cached = self._token_cache.get(key)
        if cached is None:
            byte_level = self._byte_level.get(id(tokenizer))
            if byte_level is None:  # GPT-2 byte alphabet's space
                byte_level = self._byte_level[id(tokenizer)] = tokenizer.token_to_id("\u0120") is not None
            raw = token_bytes(tokenizer, token, byte_level)
            cached = self._token_cache[key] = (raw.decode("utf-8", errors="replace"), list(raw))
        return cached

    def _sampled(self, lp: Any, tokenizer: Any) -> tuple[str, list[int]]:
        if isinstance(lp, TextLogprob):
            return lp.token, lp.bytes if lp.bytes is not None else list(lp.token.encode())
        return self._token(lp.token_id, tokenizer)

    def _tokenizer_of(self, out: RequestOutput, p: Prepared | None) -> Any:
        """The vocabulary the answer's token ids belong to: the local tier that answered."""
        tier = self.gateway.tiers.get(p.tier) if p is not None and p.tier else None
        return tier.backend.tokenizer if tier is not None and not tier.remote else None

    def chat_logprobs(self, out: RequestOutput, start: int, end: int, k: int, p: Prepared | None = None
                      ) -> s.ChatLogprobs:
        content, tokenizer = [], self._tokenizer_of(out, p)
        for lp in out.logprobs[start:end]:
            tok, raw = self._sampled(lp, tokenizer)
            top = [s.TopLogprob(token=t, logprob=_finite(v), bytes=b)
                   for (t, b), v in ((self._token(i, tokenizer), v) for i, v in (lp.top or [])[:k])]
            content.append(s.TokenLogprob(token=tok, logprob=_finite(lp.logprob), bytes=raw, top_logprobs=top))
        return s.ChatLogprobs(content=content)

    def completion_logprobs(self, out: RequestOutput, start: int, end: int, k: int,
                            offset: int, p: Prepared | None = None) -> s.CompletionLogprobs:
        tokens, values, tops, offsets, tokenizer = [], [], [], [], self._tokenizer_of(out, p)
        for lp in out.logprobs[start:end]:
            tok = self._sampled(lp, tokenizer)[0]
            tokens.append(tok)
            values.append(_finite(lp.logprob))
            top = {tok: _finite(lp.logprob)}
            top.update({self._token(i, tokenizer)[0]: _finite(v) for i, v in (lp.top or [])[:k]})
            tops.append(top)
            offsets.append(offset)
            offset += len(tok)
        return s.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    async def run_to_end(self, p: Prepared, is_disconnected: IsDisconnected,
                         source: AsyncIterator[RequestOutput] | None = None) -> RequestOutput | None:
        """The final output, or None when the client went away (the request is then aborted).
        `source`: outputs from elsewhere (the cache, a coalesced flight) instead of the engine."""
        gen = source if source is not None else self.generate(p)
        try:
            async for out in gen:
                if out.finished:
                    return out
                if await is_disconnected():
                    return None
        finally:
            await gen.aclose()
        return None

    async def complete(self, p: Prepared, is_disconnected: IsDisconnected,
                       source: AsyncIterator[RequestOutput] | None = None) -> s.CompletionResponse | None:
        out = await self.run_to_end(p, is_disconnected, source)
        if out is None:
            return None
        lps = self.completion_logprobs(out, 0, len(out.logprobs), p.top_logprobs, 0, p) \
            if p.top_logprobs is not None else None
        choice = s.CompletionChoice(index=0, text=out.text, logprobs=lps, finish_reason=out.finish_reason)
        return s.CompletionResponse(id=p.request_id, created=int(time.time()), model=p.model,
                                    choices=[choice], usage=self.usage(out))

    async def chat(self, p: Prepared, is_disconnected: IsDisconnected,
                   source: AsyncIterator[RequestOutput] | None = None) -> s.ChatCompletionResponse | None:
        out = await self.run_to_end(p, is_disconnected, source)
        if out is None:
            return None
        lps = self.chat_logprobs(out, 0, len(out.logprobs), p.top_logprobs, p) if p.top_logprobs is not None else None
        choice = s.ChatChoice(index=0, message=s.AssistantMessage(content=out.text), logprobs=lps,
                              finish_reason=out.finish_reason)
        return s.ChatCompletionResponse(id=p.request_id, created=int(time.time()), model=p.model,
                                        choices=[choice], usage=self.usage(out))

    async def stream(self, p: Prepared, chat: bool,
                     source: AsyncIterator[RequestOutput] | None = None) -> AsyncIterator[str]:
        """SSE lines: chunks as text arrives, the usage chunk when asked for, then [DONE]."""
        created = int(time.time())
        common = dict(id=p.request_id, created=created, model=p.model)
        gen = source if source is not None else self.generate(p)
        sent_lp, offset = 0, 0
        try:
            if chat:
                first = s.ChatChunkChoice(index=0, delta=s.DeltaMessage(role="assistant", content=""))
                yield _sse(s.ChatCompletionChunk(**common, choices=[first]))
            last = None
            async for out in gen:
                last = out
                if not out.delta_text and not out.finished:
                    continue        # text held back (stop-string candidate, partial UTF-8): send it later
                reason = out.finish_reason if out.finished else None
                n = len(out.logprobs)
                if chat:
                    lps = self.chat_logprobs(out, sent_lp, n, p.top_logprobs, p) if p.top_logprobs is not None else None
                    choice = s.ChatChunkChoice(index=0, delta=s.DeltaMessage(content=out.delta_text),
                                               logprobs=lps, finish_reason=reason)
                    yield _sse(s.ChatCompletionChunk(**common, choices=[choice]))
                else:
                    lps = (self.completion_logprobs(out, sent_lp, n, p.top_logprobs, offset, p)
                           if p.top_logprobs is not None else None)
                    choice = s.CompletionChoice(index=0, text=out.delta_text, logprobs=lps, finish_reason=reason)
                    yield _sse(s.CompletionChunk(**common, choices=[choice]))
                if isinstance(lps, s.CompletionLogprobs) and lps.tokens:
                    offset = lps.text_offset[-1] + len(lps.tokens[-1])
                sent_lp = n
            if p.include_usage and last is not None:
                usage_chunk = (s.ChatCompletionChunk(**common, choices=[], usage=self.usage(last)) if chat
                               else s.CompletionChunk(**common, choices=[], usage=self.usage(last)))
                yield _sse(usage_chunk)
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 -- headers are sent: the error travels as an SSE event
            _, body, _ = classify(e)
            yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()


def _finite(logprob: float) -> float:
    """JSON has no -inf or NaN; OpenAI writes an impossible token's logprob as -9999.0."""
    return logprob if math.isfinite(logprob) else -9999.0


def _sse(model: s.BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"
