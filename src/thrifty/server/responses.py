"""Gateway outputs -> OpenAI responses: one JSON object, or SSE chunks (text as it arrives, the usage chunk
when asked for, then [DONE]); logprobs as OpenAI shows them (token text and exact bytes)."""
from __future__ import annotations

import json
import math
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from thrifty.gateway.backends import TextLogprob
from thrifty.gateway.request import GatewayOutput
from thrifty.server import schemas as s
from thrifty.server.errors import classify
from thrifty.server.token_text import token_bytes

IsDisconnected = Callable[[], Awaitable[bool]]


class Formatter:
    """`tokenizer_of(tier)`: the vocabulary a tier's token ids belong to (None: a remote tier, which names
    its tokens by text)."""

    def __init__(self, tokenizer_of: Callable[[str], Any]) -> None:
        self.tokenizer_of = tokenizer_of
        self._token_cache: dict[tuple[int, int], tuple[str, list[int]]] = {}
        self._byte_level: dict[int, bool] = {}

    @staticmethod
    def usage(out: GatewayOutput) -> s.UsageInfo:
        u = out.usage
        return s.UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                           total_tokens=u.prompt_tokens + u.completion_tokens,
                           prompt_tokens_details=s.PromptTokensDetails(cached_tokens=u.cached_tokens),
                           draft_tokens=u.draft_tokens, accepted_tokens=u.accepted_tokens)

    # ---- logprobs ----------------------------------------------------------------------------------
    def _token(self, token: int | str, tokenizer: Any) -> tuple[str, list[int]]:
        """A token's text (undecodable bytes as U+FFFD) and its exact bytes."""
        if isinstance(token, str):
            return token, list(token.encode())
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

    def chat_logprobs(self, out: GatewayOutput, start: int, end: int, k: int) -> s.ChatLogprobs:
        content, tokenizer = [], self.tokenizer_of(out.tier)
        for lp in out.logprobs[start:end]:
            tok, raw = self._sampled(lp, tokenizer)
            top = [s.TopLogprob(token=t, logprob=_finite(v), bytes=b)
                   for (t, b), v in ((self._token(i, tokenizer), v) for i, v in (lp.top or [])[:k])]
            content.append(s.TokenLogprob(token=tok, logprob=_finite(lp.logprob), bytes=raw, top_logprobs=top))
        return s.ChatLogprobs(content=content)

    def completion_logprobs(self, out: GatewayOutput, start: int, end: int, k: int,
                            offset: int) -> s.CompletionLogprobs:
        tokens, values, tops, offsets, tokenizer = [], [], [], [], self.tokenizer_of(out.tier)
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

    # ---- whole answers -----------------------------------------------------------------------------
    def complete(self, out: GatewayOutput, request_id: str, k: int | None) -> s.CompletionResponse:
        lps = self.completion_logprobs(out, 0, len(out.logprobs), k, 0) if k is not None else None
        choice = s.CompletionChoice(index=0, text=out.text, logprobs=lps, finish_reason=out.finish_reason)
        return s.CompletionResponse(id=request_id, created=int(time.time()), model=out.tier, choices=[choice],
                                    usage=self.usage(out))

    def chat(self, out: GatewayOutput, request_id: str, k: int | None) -> s.ChatCompletionResponse:
        lps = self.chat_logprobs(out, 0, len(out.logprobs), k) if k is not None else None
        choice = s.ChatChoice(index=0, message=s.AssistantMessage(content=out.text), logprobs=lps,
                              finish_reason=out.finish_reason)
        return s.ChatCompletionResponse(id=request_id, created=int(time.time()), model=out.tier, choices=[choice],
                                        usage=self.usage(out))

    # ---- streams -----------------------------------------------------------------------------------
    async def stream(self, outputs: AsyncIterator[GatewayOutput], request_id: str, model: str, chat: bool,
                     k: int | None, include_usage: bool) -> AsyncIterator[str]:
        """SSE lines; `model`: what the chunks show (the tier, when known before the first output)."""
        common = dict(id=request_id, created=int(time.time()), model=model)
        sent_lp, offset = 0, 0
        try:
            if chat:
                first = s.ChatChunkChoice(index=0, delta=s.DeltaMessage(role="assistant", content=""))
                yield _sse(s.ChatCompletionChunk(**common, choices=[first]))
            last = None
            async for out in outputs:
                last = out
                if not out.delta_text and not out.finished:
                    continue        # text held back (stop-string candidate, partial UTF-8): send it later
                reason = out.finish_reason if out.finished else None
                n = len(out.logprobs)
                if chat:
                    lps = self.chat_logprobs(out, sent_lp, n, k) if k is not None else None
                    choice = s.ChatChunkChoice(index=0, delta=s.DeltaMessage(content=out.delta_text),
                                               logprobs=lps, finish_reason=reason)
                    yield _sse(s.ChatCompletionChunk(**common, choices=[choice]))
                else:
                    lps = self.completion_logprobs(out, sent_lp, n, k, offset) if k is not None else None
                    choice = s.CompletionChoice(index=0, text=out.delta_text, logprobs=lps, finish_reason=reason)
                    yield _sse(s.CompletionChunk(**common, choices=[choice]))
                if isinstance(lps, s.CompletionLogprobs) and lps.tokens:
                    offset = lps.text_offset[-1] + len(lps.tokens[-1])
                sent_lp = n
            if include_usage and last is not None:
                chunk = s.ChatCompletionChunk if chat else s.CompletionChunk
                yield _sse(chunk(**common, choices=[], usage=self.usage(last)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 -- headers are sent: the error travels as an SSE event
            _, body, _ = classify(e)
            yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await outputs.aclose()


async def run_to_end(outputs: AsyncIterator[GatewayOutput], is_disconnected: IsDisconnected) -> GatewayOutput | None:
    """The final output, or None when the client went away (the request is then aborted)."""
    try:
        async for out in outputs:
            if out.finished:
                return out
            if await is_disconnected():
                return None
    finally:
        await outputs.aclose()
    return None


def _finite(logprob: float) -> float:
    """JSON has no -inf or NaN; OpenAI writes an impossible token's logprob as -9999.0."""
    return logprob if math.isfinite(logprob) else -9999.0


def _sse(model: s.BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"
